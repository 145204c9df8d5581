#!/usr/bin/env bash
# One phase of the GPU measurements, for one `device` call each (at most 10 minutes a call: every
# step of a phase runs under its own `timeout`, and a phase's caps and its ~20 s of start-up sum to
# at most 570 s, so that a row in flight at the limit is cut by its cap, prints what it measured,
# and the call still ends in time). Results go to $OUT: each step's stdout (JSON lines) to NAME.jsonl, its stderr to NAME.err
# next to it, both also on this script's own stdout and stderr. See bench/gpu/README.md.
#
#   bash bench/gpu/run.sh quick|tests|train-a|train-b|decode-a|decode-b|time-to-loss|scaling|finetune [ROWS]
set -uo pipefail
OUT=${OUT:-/tmp/lmforge-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
    if ! install .whl/*.whl; then  # one bad wheel must not cost the rows that do not need it (only fp8 needs torchao)
        echo "run.sh: warning: installing .whl/*.whl failed; installing them one at a time" >&2
        for w in .whl/*.whl; do install "$w" || echo "run.sh: warning: $w did not install" >&2; done
    fi
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 LMFORGE_SHARED_DATA=${LMFORGE_SHARED_DATA:-$PWD/shared/data}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; ${PY:-python3} -c "import torch; print('torch', torch.__version__)"; } | tee -a "$OUT/env.txt"
py="${PY:-python3}"
real_data() {  # `--data DIR`: the shards bench/gpu/prepare.sh built, if they came along
    local d=.bench-data/lm-v16384-val0.05
    [ -f "$d/meta.json" ] && echo "--data $d"
}
to() {  # to NAME CMD...: CMD's stdout appended to $OUT/NAME.jsonl, its stderr to $OUT/NAME.err, both still shown
    local name=$1; shift
    { "$@" 2>&1 1>&3 3>&- | tee -a "$OUT/$name.err" >&2 3>&-; } 3>&1 | tee -a "$OUT/$name.jsonl"
}
GRACE=5  # seconds between a step's SIGTERM (the benches then print what they measured) and its SIGKILL
row() {  # row CAP NAME CMD...: `to NAME CMD` with CMD under `timeout`: TERM at CAP-GRACE s, KILL at CAP s.
    # Returns CMD's status: 124 (TERM) or 137 (KILL) when the cap stopped it. `GRACE=N row ...` for
    # a step that needs longer to stop (a training run saves a checkpoint when it is stopped).
    # A step the cap stopped before it printed a line (still importing, compiling) leaves a JSON line saying so.
    local cap=$1 name=$2; shift 2
    local before rc
    before=$(cat "$OUT/$name.jsonl" 2>/dev/null | wc -l)
    to "$name" timeout -k "$GRACE" "$((cap - GRACE))" "$@"
    rc=$?
    if { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ "$(cat "$OUT/$name.jsonl" 2>/dev/null | wc -l)" -eq "$before" ]; then
        echo "{\"what\": \"stopped\", \"row\": \"$name\", \"cap\": $cap, \"status\": $rc, \"printed\": false}" | tee -a "$OUT/$name.jsonl"
    fi
    return $rc
}
SKIPPED=125  # row_if's status for a row it did not start
row_if() {  # row_if MIN CAP NAME CMD...: `row CAP NAME CMD` if CAP >= MIN s, else a JSON line saying it was skipped
    local min=$1 cap=$2 name=$3
    if [ "$cap" -lt "$min" ]; then
        echo "{\"what\": \"skipped\", \"row\": \"$name\", \"seconds_left\": $cap, \"needs\": $min}" | tee -a "$OUT/$name.jsonl"
        return $SKIPPED
    fi
    shift 2
    row "$cap" "$@"
}
cap() {  # cap NOMINAL [KEEP]: NOMINAL s, or what is left before $END less KEEP s (kept for the rows after), if less
    local left=$((END - SECONDS - ${2:-0}))
    echo $(( $1 < left ? $1 : left ))
}
stopped() {  # stopped STATUS CAP NAME: a line in $OUT/NAME.log when `timeout` stopped the step
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
        echo "$3: stopped by its cap of $2 s (status $1)" | tee -a "$OUT/$3.log"
    fi
}
case "${1:-}" in
quick)  # the headline rows of issues 4 and 5 in one call, each step capped. No CUDA tests: the `tests` phase runs them.
    # Budget: the call's limit is 600 s; every row ends by END = 570 s after this script started
    # ($SECONDS, so the start-up counts as it really went), leaving 30 s for the call's end.
    #    ~20 s  pip of .whl, nvidia-smi, torch import (before the first row)
    #    195    train: GPT-2 124M against transformers with the eager loss check, 100 steps in 4 rounds
    #           (cold compiles of two training graphs, ~2 x 50 s, then 3 runners x 113 steps, ~40 s;
    #           cut short, it reports its finished rounds)
    #    105    decode, batch 1, against transformers (imports ~10 s, the engine's compile and capture
    #           of its two spans 20-40 s cold, transformers' auto-compiled decode step ~30 s)
    #    105    decode, batch 32, the same
    #   <=145   fp8 with its loss check, 60 steps: what is left before END (skipped under 60 s)
    #   20 + 195 + 105 + 105 + 145 = 570 s at the worst, inside the call's 600.
    # The fallback, only where the engine's own CUDA graph capture failed at batch 1 (an exit status
    # other than 0, and not a cap's 124/137): the decode rows after it use torch.compile's graphs
    # (--graphs trees), and batch 1 is run again that way in the time fp8 would have had, keeping
    # batch 32's 105 s; so END still holds, and fp8 gets what is left, if 60 s.
    # Real data: shards of ../shared/data/lm prepared on the CPU machine (`bash bench/gpu/prepare.sh`)
    # and carried as .bench-data, run through GPT-2's shape; without them the rows use random tokens.
    END=570
    row_if 60 "$(cap 195)" train $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compare-hf --loss-check $(real_data)
    graphs=capture
    for b in 1 32; do
        keep=$(( b == 1 ? 105 : 0 ))  # batch 32's share, kept while batch 1 runs
        row_if 60 "$(cap 105 "$keep")" decode $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf --graphs $graphs
        rc=$?
        if [ "$graphs" = capture ] && [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ $rc -ne "$SKIPPED" ]; then
            graphs=trees  # the engine's own capture has never run on a GPU: torch.compile's graphs from here on
            row_if 60 "$(cap 105 "$keep")" decode $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf --graphs trees
        fi
    done
    row_if 60 "$(cap 145)" train $py bench/train_throughput.py --preset gpt2-124m --steps 60 --rounds 2 --compile --fp8 --loss-check $(real_data) ;;
tests)  # the CUDA tests, then the CPU suite's model/infer/train tests under torch 2.11. Caps: 20 + 300 + 250 = 570 s
    # Under `timeout` (TERM, then KILL 5 s later): a hung or slow test ends the phase in time; -v
    # logs each test as it ends, so the log shows where a cut came.
    timeout -k 5 295 $py -m pytest -v -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log"
    gpu=${PIPESTATUS[0]}
    stopped "$gpu" 300 tests-gpu
    timeout -k 5 245 $py -m pytest -q -p no:cacheprovider -x tests/model tests/infer tests/train/test_optim.py 2>&1 | tee "$OUT/tests-cpu-parts.log"
    cpu=${PIPESTATUS[0]}
    stopped "$cpu" 250 tests-cpu-parts
    exit $(( gpu ? gpu : cpu )) ;;
train-a)  # issue 4, GPT-2 124M (B 32, T 1024): against transformers, chunked loss, fp8. Caps: 240 + 150 + 110 = 500 s
    row 240 train $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compare-hf --loss-check $(real_data)
    row 150 train $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --chunked-loss 8192 --loss-check $(real_data)
    row 110 train $py bench/train_throughput.py --preset gpt2-124m --steps 100 --compile --fp8 --loss-check --rounds 2 $(real_data) ;;
train-b)  # issue 4: GPT-2 in CUDA graphs, and the Llama-3.2-1B shape (B 8, T 2048) against transformers. Caps: 200 + 300 = 500 s
    row 200 train $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compile-mode reduce-overhead --loss-check $(real_data)
    row 300 train $py bench/train_throughput.py --preset llama-3.2-1b --vocab-size 128256 --batch-size 8 --seq-len 2048 --steps 15 \
        --compile --compare-hf ;;
decode-a)  # issue 5 on random weights: bf16, prompt 128, 256 new tokens, greedy. Caps: 105 + 100 + 60 + 100 + 125 = 490 s
    # (a cold row against transformers: imports, the engine's compile and capture, transformers' compile; see quick)
    for b in 1 32; do
        row $(( b == 1 ? 105 : 100 )) decode $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf --profile 50 --trace "$OUT/decode-trace-b$b.json"
    done
    row 60 decode $py bench/decode.py --preset gpt2-124m --batch 1 --compile --graphs trees  # torch.compile's own graphs
    row 100 decode $py bench/decode.py --preset smollm2-135m --batch 1 --compile --compare-hf
    row 125 decode $py bench/decode.py --preset llama-3.2-1b --batch 1 --compile --compare-hf ;;
decode-b)  # issue 5: a server-sized cache, then the real SmolLM2 (/tmp/smollm2). Caps: 90 + 100 + 100 + 150 = 440 s
    # The CUDA graphs of the key spans 256..2048 (it compiles four graphs).
    row 90 decode $py bench/decode.py --preset smollm2-135m --batch 32 --compile --max-seq-len 2048
    # Prefix reuse and prompt-lookup speculation (the latter reads SQuAD from shared/data, if carried).
    if [ -f /tmp/smollm2/config.json ]; then
        row 100 prefix $py bench/prefix_cache.py /tmp/smollm2 --device cuda --repeat 2
        if [ -d "$LMFORGE_SHARED_DATA/qa" ]; then
            row 100 speculative $py bench/speculative.py /tmp/smollm2 --device cuda --repeat 2
            row 150 speculative $py bench/speculative.py /tmp/smollm2 --device cuda --repeat 2 --compile --no-hf
        fi
    fi ;;
time-to-loss)  # issue 4: GPT-2 recipe against the fastest, on ../shared/data/lm. Cap: 520 s (a stopped run reports its curve)
    row 520 time-to-loss $py bench/time_to_loss.py --preset gpt2-124m --target-loss 3.8 --cache .bench-data ;;
scaling)  # issue 6: the GPU variant of the study (a sweep resumes: run it again in a new call). TERM at 520 s, KILL at 540
    GRACE=20 row 540 scaling $py bench/scaling_study.py --grid bench/grids/gpu-study.yaml --out /tmp/scaling-study
    cp /tmp/scaling-study/study/*.png "$OUT/" ;;
finetune)  # issue 7: needs /tmp/smollm2 (README: the GGUF comes in two calls). TERM at 520 s: a row in training saves its steps
    GRACE=20 row 540 finetune $py bench/finetune_tasks.py --base /tmp/smollm2 --device cuda ${2:+--rows $2} ;;
*)
    echo "usage: bash bench/gpu/run.sh quick|tests|train-a|train-b|decode-a|decode-b|time-to-loss|scaling|finetune [ROWS]" >&2; exit 2 ;;
esac
