#!/usr/bin/env bash
# One phase of the GPU measurements, for one `device` call each (every phase ends well inside
# the 10-minute limit of a call). Results go to $OUT as JSON lines and logs. See bench/gpu/README.md.
#
#   bash bench/gpu/run.sh quick|tests|train|decode|time-to-loss|scaling|finetune [ROWS]
set -uo pipefail
OUT=${OUT:-/tmp/lmforge-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
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
case "${1:-}" in
quick)  # the headline rows of issues 4 and 5 in one call of at most ~9.5 minutes, each step capped.
    # Real data: shards of ../shared/data/lm prepared on the CPU machine (`bash bench/gpu/prepare.sh`)
    # and carried as .bench-data, run through GPT-2's shape; without them the rows use random tokens.
    timeout 270 $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compare-hf --loss-check \
        $(real_data) 2>&1 | tee "$OUT/train.jsonl"
    timeout 100 $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 2 --compile --fp8 --loss-check \
        $(real_data) 2>&1 | tee -a "$OUT/train.jsonl"
    # The engine's own CUDA graph capture has never run on a GPU: if it fails, torch.compile's graphs instead.
    for b in 1 32; do timeout 65 $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf \
        || timeout 65 $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf --graphs trees; done 2>&1 | tee "$OUT/decode.jsonl"
    timeout 60 $py -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log" ;;  # last: the numbers come first
tests)  # the CUDA tests, then the CPU suite's model/infer/train tests under torch 2.11
    $py -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log"
    $py -m pytest -q -p no:cacheprovider -x tests/model tests/infer tests/train/test_optim.py 2>&1 | tee "$OUT/tests-cpu-parts.log" ;;
train)  # issue 4: GPT-2 124M (B 32, T 1024) and the Llama-3.2-1B shape (B 8, T 2048), against transformers
    $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compare-hf --loss-check $(real_data) 2>&1 | tee "$OUT/train.jsonl"
    $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --chunked-loss 8192 --loss-check $(real_data) 2>&1 | tee -a "$OUT/train.jsonl"
    $py bench/train_throughput.py --preset gpt2-124m --steps 100 --compile --fp8 --loss-check --rounds 2 $(real_data) 2>&1 | tee -a "$OUT/train.jsonl"
    $py bench/train_throughput.py --preset gpt2-124m --steps 100 --rounds 4 --compile --compile-mode reduce-overhead --loss-check $(real_data) 2>&1 | tee -a "$OUT/train.jsonl"
    $py bench/train_throughput.py --preset llama-3.2-1b --vocab-size 128256 --batch-size 8 --seq-len 2048 --steps 15 \
        --compile --compare-hf 2>&1 | tee -a "$OUT/train.jsonl" ;;
decode)  # issue 5: bf16, prompt 128, 256 new tokens, greedy
    for b in 1 32; do $py bench/decode.py --preset gpt2-124m --batch $b --compile --compare-hf --profile 50 --trace "$OUT/decode-trace-b$b.json"; done 2>&1 | tee "$OUT/decode.jsonl"
    $py bench/decode.py --preset gpt2-124m --batch 1 --compile --graphs trees 2>&1 | tee -a "$OUT/decode.jsonl"  # torch.compile's own graphs
    $py bench/decode.py --preset smollm2-135m --batch 1 --compile --compare-hf 2>&1 | tee -a "$OUT/decode.jsonl"
    $py bench/decode.py --preset llama-3.2-1b --batch 1 --compile --compare-hf 2>&1 | tee -a "$OUT/decode.jsonl"
    # A server-sized cache: the CUDA graphs of the key spans 256..2048 (last: it compiles four graphs).
    $py bench/decode.py --preset smollm2-135m --batch 32 --compile --max-seq-len 2048 2>&1 | tee -a "$OUT/decode.jsonl"
    # Prefix reuse and prompt-lookup speculation on the real SmolLM2 (the latter reads SQuAD from shared/data, if carried).
    [ -f /tmp/smollm2/config.json ] && $py bench/prefix_cache.py /tmp/smollm2 --device cuda --repeat 2 2>&1 | tee "$OUT/prefix.jsonl"
    [ -f /tmp/smollm2/config.json ] && [ -d "$LMFORGE_SHARED_DATA/qa" ] && \
        $py bench/speculative.py /tmp/smollm2 --device cuda --repeat 2 2>&1 | tee "$OUT/speculative.jsonl" && \
        $py bench/speculative.py /tmp/smollm2 --device cuda --repeat 2 --compile --no-hf 2>&1 | tee -a "$OUT/speculative.jsonl" ;;
time-to-loss)  # issue 4: GPT-2 recipe against the fastest, on ../shared/data/lm
    $py bench/time_to_loss.py --preset gpt2-124m --target-loss 3.8 --cache .bench-data 2>&1 | tee "$OUT/time-to-loss.jsonl" ;;
scaling)  # issue 6: the GPU variant of the study
    $py bench/scaling_study.py --grid bench/grids/gpu-study.yaml --out /tmp/scaling-study 2>&1 | tee "$OUT/scaling.jsonl"
    cp /tmp/scaling-study/study/*.png "$OUT/" ;;
finetune)  # issue 7: needs /tmp/smollm2 (README: the GGUF comes in two calls)
    $py bench/finetune_tasks.py --base /tmp/smollm2 --device cuda ${2:+--rows $2} 2>&1 | tee -a "$OUT/finetune.jsonl" ;;
*)
    echo "usage: bash bench/gpu/run.sh quick|tests|train|decode|time-to-loss|scaling|finetune [ROWS]" >&2; exit 2 ;;
esac
