"""Generation speed of lmforge's engine, and of transformers' `generate` on the same weights.

    python bench/decode.py --preset gpt2-124m --batch 1 [--compile] [--compare-hf [--hf-mode same|eager|compile]] [--device cpu]
                           [--max-seq-len N]   # a cache sized for a longer context than the requests use, as a server's
                           [--graphs capture|trees] [--profile N [--trace FILE]]

Random weights, random prompts of --prompt-len tokens, --new-tokens greedy tokens each (no
end-of-text stop). One JSON line per measurement: {"what", "preset", "device", "dtype", "batch",
"prompt_len", "new_tokens", "tokens_per_s", "ms_per_step", "ttft_ms", "peak_memory_gb", "memory"}; with
--compare-hf a line for transformers and a last line with "ratio" = lmforge / transformers tokens/s
and how many greedy sequences came out identical. transformers runs under the engine's setting
(`--compile`: a static cache and torch.compile, its fastest documented setting; otherwise eager
with its default dynamic cache) unless `--hf-mode` says otherwise; its row's "compiled" says what
was compiled (on CUDA generate's own auto-compile of the decode step, prefill eager as in the
engine; on CPU, where generate does not auto-compile, torch.compile of forward). `--repeat N` times each side N times, taking
turns (engine, transformers, engine, ...) so that a busy machine slows both alike, and reports the
median of each; "ratios" lists the ratio of each turn.

"ttft_ms", on both sides, is a run of its own that stops at the first token: the prefill and the
first token's sampling (the engine's requests with max_tokens=1, transformers' 1-token generate).
"ms_per_step" is the time of a decode step: the engine's full run timed step by step (its first
step, "first_step_ms", prefills, samples the first token and decodes the second, as the engine
runs every step that finishes a prefill, and so when a client streaming from the engine sees
its first token; ms_per_step is the new_tokens - 2 steps after it over their number), and
transformers' full generate less its TTFT over its new_tokens - 1 decode steps.

`peak_memory_gb` (GB = 1e9 bytes), on CUDA ("memory": "own_weights_plus_peak_allocated_above_start"):
each side's own weights and buffers plus the most allocated above what was resident when its run
started, so that the other side's model, still on the device, is not counted; the max over turns
(the first turn holds the compilation and capture). On CPU ("memory": "process_peak_rss"): the
process's peak RSS, which cannot be reset (the engine's first run comes before transformers' model
is built, so the engine's number is its own and transformers' includes both).

`--profile N` adds a line on where a decode step's time goes, from torch.profiler over N steps
after the timed runs (the profiler slows the host side, so its wall time is not the speed):
on CUDA the kernels per step, the device time per step and its share of the wall time (low:
the step waits on the host, launch-bound; high: the GPU is the limit), and the kernels that take
most of it; on CPU the operators instead. `--trace FILE` also writes the Chrome trace.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.model import Transformer
from lmforge.utils.device import resolve_device
from lmforge.utils.errors import UserError

from _stop import Stopped, entry_point, stop_on_sigterm  # bench/_stop.py
from _data import print_row  # bench/_data.py

VOCAB = {"smollm2-135m": 49152, "llama-3.2-1b": 128256}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def resident_bytes(module: torch.nn.Module) -> int:
    """A model's weights and buffers on the device (tied tensors once)."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t.is_cuda}
    return sum(tensors.values())


def memory_start(device: torch.device) -> int:
    """Resets the peak counter; returns what is allocated now (both sides' models, on CUDA)."""
    reset_peak_memory(device)
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def peak_memory_gb(device: torch.device, own: torch.nn.Module, start: int) -> float:
    """GB (1e9 bytes). CUDA: `own`'s weights plus the peak allocated above `start` (memory_start's),
    which excludes the other side's model. CPU: the process's peak RSS so far (it cannot be reset,
    so the engine runs first, before transformers' model is even built)."""
    if device.type == "cuda":
        return (resident_bytes(own) + torch.cuda.max_memory_allocated() - start) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def build_engine(model, prompts, max_seq_len: int, compile_: bool, graphs: str) -> Engine:
    """One slot per prompt, each prompt prefilled in one chunk and all of them in one step. Without
    prefix reuse: the timed run's prompts are the warm-up's, and transformers prefills them anew."""
    B, T = prompts.shape
    return Engine(model, max_batch=B, max_seq_len=max_seq_len, prefill_chunk=T, prefill_budget=B * T, compile=compile_,
                  graphs=graphs, prefix_cache=False)


def run_engine(model, prompts, new_tokens, compile_: bool, device, max_seq_len: int | None = None, graphs: str = "capture") -> dict:
    """Two timed runs of the same prompts. TTFT: requests of max_tokens=1, which finish at their
    first token, so that the step that prefills them and samples it runs no decode step (as
    transformers' 1-token generate). Then the full run: its first step prefills, samples the
    first token and decodes the second (the engine decodes every running sequence in the step
    that finishes a prefill), each step after it decodes one token; ms_per_step is the time of
    those steps over their number (new_tokens - 2)."""
    B, T = prompts.shape
    start = memory_start(device)
    engine = build_engine(model, prompts, max_seq_len or T + new_tokens, compile_, graphs)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts.tolist(), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up: the timed prefill's shape
    if compile_:
        engine.generate(prompts.tolist(), params)  # compile and capture before timing
    sync(device)
    t0 = time.perf_counter()
    firsts = [engine.add(p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)) for p in prompts.tolist()]
    engine.step()
    sync(device)
    ttft = time.perf_counter() - t0
    assert not engine.has_work and all(len(r.output) == 1 for r in firsts)
    t0 = time.perf_counter()
    reqs = [engine.add(p, params) for p in prompts.tolist()]
    engine.step()
    sync(device)
    first_step = time.perf_counter() - t0
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    sync(device)
    total = time.perf_counter() - t0
    assert all(len(r.output) == new_tokens for r in reqs) and steps == new_tokens - 2
    return {"tokens": [r.output for r in reqs], "tokens_per_s": B * new_tokens / total,
            "ms_per_step": 1e3 * (total - first_step) / steps, "ttft_ms": 1e3 * ttft,
            "first_step_ms": 1e3 * first_step, "peak_memory_gb": peak_memory_gb(device, model, start)}


def profile_engine(model, prompts, steps: int, compile_: bool, device, max_seq_len: int, trace: str | None, graphs: str) -> dict:
    """torch.profiler over `steps` decode steps of an engine built as `run_engine` builds its own."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine = build_engine(model, prompts, max_seq_len, compile_, graphs)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    engine.generate(prompts.tolist(), params)  # compile and capture outside the profile
    for p in prompts.tolist():
        engine.add(p, params)
    engine.step()  # the prefill, its first token and the first decode step: not profiled
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 0
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
            steps += 1
        sync(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    on_device = device.type == "cuda"
    if on_device:  # kernels: their own time on the GPU
        # record_function ranges also appear on the GPU's timeline, spanning kernels counted already;
        # torch's own table (`_build_table`) leaves them out too (getattr: older torch has no such flag).
        events = [e for e in prof.events()
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        us = lambda e: e.time_range.elapsed_us()
    else:  # operators at the top level of the host side (not their children, counted twice otherwise)
        events = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.cpu_parent is None]
        us = lambda e: e.cpu_time_total
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(us(e))
    busy = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    unit = "kernels" if on_device else "host_ops"
    return {"steps": steps, f"{unit}_per_step": round(len(events) / steps, 1), f"{'device' if on_device else 'host_ops'}_ms_per_step": round(busy / 1e3 / steps, 4),
            "profiled_wall_ms_per_step": round(1e3 * wall / steps, 4), "busy_share": round(busy / 1e6 / wall, 3),
            "top": [{"name": name[:120], "ms_per_step": round(sum(v) / 1e3 / steps, 4), "calls_per_step": round(len(v) / steps, 2)}
                    for name, v in top]}


def build_hf(model, device):
    import transformers

    from lmforge.interop.hf import config_to_hf, state_dict_to_hf

    c = model.config
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config_to_hf(c).items() if k != "architectures"},
                                                   bos_token_id=None, eos_token_id=None)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(device=device, dtype=model.tok_embeddings.weight.dtype)
    hf.load_state_dict(state_dict_to_hf(c, model.state_dict()), strict=False)
    return hf.eval()


def hf_compile_how(hf, device) -> str:
    """What `run_hf` compiles of transformers' side, for its row."""
    if device.type == "cuda" and not getattr(hf, "_bench_compiled", False):
        # transformers' own setting: with a static cache on CUDA, generate compiles the model's call
        # for the decode steps (`_valid_auto_compile_criteria`, CompileConfig's defaults); prefill
        # stays eager, as the engine's does.
        return "generate's auto-compile of the decode step (CompileConfig defaults: mode reduce-overhead); prefill eager"
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return f"torch.compile(forward, mode={mode}): prefill and decode steps"


def run_hf(hf, prompts, new_tokens, compile_: bool, device) -> dict:
    """TTFT: a 1-token generate (prefill and the first token). ms_per_step: the full generate less
    that TTFT, over its new_tokens - 1 decode steps."""
    start = memory_start(device)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    if compile_:
        kwargs["cache_implementation"] = "static"
        # On CUDA generate compiles the decode step itself with a static cache (transformers
        # 5.17's `_valid_auto_compile_criteria`); compiling forward on top would compile the prefill too, and nest one compiled
        # call in another. On CPU generate does not auto-compile: forward is compiled here.
        if device.type != "cuda" and not hasattr(hf, "_bench_compiled"):
            hf.forward, hf._bench_compiled = torch.compile(hf.forward, mode="default"), True
    with torch.inference_mode():
        # Compiled: one warm-up at the timed length. The static cache is sized for the longest
        # generate so far, so a shorter first one (4 tokens: prompt + 4 positions) would make the
        # timed length's cache a new shape, compiled again; the 1-token TTFT run below reuses it.
        warm = new_tokens if compile_ else 4
        hf.generate(prompts, max_new_tokens=warm, min_new_tokens=warm, **kwargs)
        if compile_ and device.type == "cuda" and not hasattr(hf, "_compiled_call") and not hasattr(hf, "_bench_compiled"):
            # This transformers did not auto-compile: compile forward instead, as this bench used to.
            hf.forward, hf._bench_compiled = torch.compile(hf.forward, mode="reduce-overhead"), True
            hf.generate(prompts, max_new_tokens=warm, min_new_tokens=warm, **kwargs)
        sync(device)
        t0 = time.perf_counter()
        first = hf.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kwargs)
        sync(device)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new_tokens and first.shape[1] == prompts.shape[1] + 1
    B = prompts.shape[0]
    return {"tokens": out[:, prompts.shape[1]:].tolist(), "tokens_per_s": B * new_tokens / total, "ms_per_step": 1e3 * (total - ttft) / (new_tokens - 1),
            "ttft_ms": 1e3 * ttft, "peak_memory_gb": peak_memory_gb(device, hf, start)}


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's real vocabulary (GPT-2: 50257)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' generate on the same weights")
    p.add_argument("--hf-mode", choices=["same", "eager", "compile"], default="same",
                   help="transformers' setting: the same as the engine's (default), eager with its dynamic cache, "
                        "or compiled with a static cache (its fastest documented setting)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="time each side this many times, taking turns; report medians")
    p.add_argument("--graphs", choices=["capture", "trees"], default="capture",
                   help="with --compile on CUDA: CUDA graphs captured by the engine, or torch.compile's reduce-overhead")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N decode steps after the timed runs")
    p.add_argument("--trace", default=None, metavar="FILE", help="with --profile: write the Chrome trace here")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="the engine's KV cache length, as a server sizes it for a context (default: prompt + new tokens)")
    args = p.parse_args()
    if args.new_tokens < 3:  # the engine's first step yields two tokens; ms_per_step times the steps after it
        p.error(f"--new-tokens must be at least 3, got {args.new_tokens}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    vocab = args.vocab_size or VOCAB.get(args.preset, 50257)
    need = args.prompt_len + args.new_tokens
    if args.max_seq_len is not None and args.max_seq_len < need:
        raise UserError(f"--max-seq-len {args.max_seq_len} is shorter than --prompt-len + --new-tokens = {need}; "
                        "raise it or leave it out")
    ctx = max(need, args.max_seq_len or 0)
    cfg = preset(args.preset, vocab_size=vocab)
    if cfg.position == "rotary":  # rotary positions take any length: no 128k-position tables for a short run
        cfg = preset(args.preset, vocab_size=vocab, context_length=max(ctx, 1024))
    elif ctx > cfg.context_length:  # refused now, not after the engine's compile and warm-up
        raise UserError(f"preset {args.preset} has a context of {cfg.context_length} tokens ({cfg.position} positions "
                        f"cannot grow) and this run needs {ctx} (--prompt-len {args.prompt_len} + --new-tokens "
                        f"{args.new_tokens}{f', --max-seq-len {args.max_seq_len}' if args.max_seq_len else ''}); lower them")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), device=device)
    base = {"preset": args.preset, "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
            "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "max_seq_len": args.max_seq_len or args.prompt_len + args.new_tokens,
            "compile": args.compile, "graphs": args.graphs if args.compile and device.type == "cuda" else None,
            "torch": torch.__version__}
    hf, hf_error = None, None
    hf_compile = args.compile if args.hf_mode == "same" else args.hf_mode == "compile"
    runs, hf_runs = [], []
    try:  # SIGTERM (`timeout`) ends the turns; the ones finished are reported, marked "stopped_early"
        with stop_on_sigterm():
            for _ in range(args.repeat):
                runs.append(run_engine(model, prompts, args.new_tokens, args.compile, device, args.max_seq_len, args.graphs))
                if args.compare_hf and hf_error is None:
                    try:  # a failure of transformers (its compile on another version, say) must not lose the engine's row
                        if hf is None:  # built after the engine's first run, so that a CPU peak RSS is the engine's own
                            import transformers

                            hf = build_hf(model, device)
                        hf_runs.append(run_hf(hf, prompts, args.new_tokens, hf_compile, device))
                    except Exception as e:  # noqa: BLE001 - reported on stdout, not hidden
                        hf_error, hf = f"{type(e).__name__}: {e}"[:1000], None
    except Stopped:
        base["stopped_early"] = True
        if not runs:
            print_row({"what": "lmforge engine", **base, "failed": "stopped before a run finished"})
            return
        if hf is not None and not hf_runs:
            hf_error, hf = "stopped before a run finished", None
        elif hf_runs:
            runs = runs[: len(hf_runs)]  # whole turns only
        args.profile = 0
    median = lambda rs: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "ms_per_step", "ttft_ms")}
    peak = lambda rs: round(max(r["peak_memory_gb"] for r in rs), 3)
    tokens = runs[0]["tokens"]
    assert all(r["tokens"] == tokens for r in runs)
    ours = median(runs) | {"first_step_ms": statistics.median(r["first_step_ms"] for r in runs)}
    memory = "own_weights_plus_peak_allocated_above_start" if device.type == "cuda" else "process_peak_rss"
    print_row({"what": "lmforge engine", **base, "repeat": len(runs), **ours,  # the turns done (fewer when stopped early)
               "peak_memory_gb": round(runs[0]["peak_memory_gb"], 3) if device.type == "cpu" else peak(runs),
               "memory": memory})
    if hf_error is not None:
        print_row({"what": "transformers generate", **base, "failed": hf_error})
    elif hf is not None:
        theirs = median(hf_runs)
        # Greedy on the same weights: identical tokens in fp32 (bf16 may part ways at a near-tie).
        same = sum(a == b for a, b in zip(tokens, hf_runs[0]["tokens"]))
        print_row({"what": "transformers generate", **base, "transformers": transformers.__version__, "repeat": len(hf_runs),
                   **theirs, "compile": hf_compile, "cache": "static" if hf_compile else "dynamic",
                   "compiled": hf_compile_how(hf, device) if hf_compile else None,
                   "peak_memory_gb": peak(hf_runs), "memory": memory})
        print_row({"what": "ratio lmforge / transformers", **base,
                   "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                   "ratios": [round(a["tokens_per_s"] / b["tokens_per_s"], 2) for a, b in zip(runs, hf_runs)],
                   "sequences_identical_to_transformers": f"{same}/{args.batch}"})
    if args.profile:
        steps = min(args.profile, args.new_tokens - 2)
        print_row({"what": "lmforge engine profile", **base,
                   **profile_engine(model, prompts, steps, args.compile, device, base["max_seq_len"], args.trace, args.graphs)})

if __name__ == "__main__":
    main()
