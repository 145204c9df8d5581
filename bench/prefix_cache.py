"""Prefix reuse in the engine: the same greedy requests with it and without it.

    python bench/prefix_cache.py CKPT [--turns 6] [--clients 16] [--system-lines 24] [--max-tokens 48]
                                      [--repeat 3] [--device cpu] [--threads N]

Two scenarios on a chat checkpoint (SmolLM2-135M-Instruct imported from its GGUF), the text taken
from the bundled tinyshakespeare:

- "chat": one conversation of --turns turns. Each turn's prompt is the whole conversation so far
  through the chat template, as an OpenAI client sends it; the reply (at most --max-tokens, ending
  at end-of-text) joins the history as text. Time to first token per turn.
- "shared": --clients requests arrive together, each a system message quoting --system-lines
  lines of the play and a different question (the same quote for all, as a deployed bot's
  instructions are). Time until every request has its first token, and until all finish.

Each run builds a fresh engine (`prefix_cache` on or off), so nothing carries over from the last
run; the two settings take turns --repeat times and the median run of each is reported. One
JSON line per scenario and setting {"what", "prefix_cache", "prompt_tokens", "reused_tokens",
"ttft_ms", "seconds", ...}, then {"what": "<scenario> ratio", "ttft_ratio", "seconds_ratio",
"identical_outputs"} (off over on: above 1 means reuse is faster).

"ttft_ms" is the first token as a client of the engine (`lmforge serve`) gets it: when the step
that samples it returns. That step also decodes: the engine runs a decode step for every running
sequence, the one just prefilled included, in the step that finishes a prefill, so both settings'
TTFT hold one decode step besides the prefill. "decode_step_ms" is the median time of the steps
that only decode (after every request has its first token), and "ttft_less_decode_ms" the TTFT
less one such step where the first token's step did decode (an estimate of the prefill and the
first token alone); "<scenario> ratio" gives its ratio too ("ttft_less_decode_ratio").

SIGTERM (what `timeout` sends) stops the measuring: the scenarios finished are reported, the
one in progress with its whole turns of both settings (marked "stopped_early"), then a line
{"what": "stopped", "stopped_early": true, "during": <scenario>}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stop import Stopped, entry_point, stop_on_sigterm  # noqa: E402  (bench/_stop.py)
from _data import print_row  # noqa: E402  (bench/_data.py)
from lmforge.infer import Engine, SamplingParams, load, render_chat  # noqa: E402

PLAY = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"


def passages(n: int, lines: int, skip: int = 0) -> list[str]:
    """`n` passages of `lines` non-empty lines of the play each, one after another."""
    text = [line for line in PLAY.read_text(encoding="utf-8").splitlines() if line.strip()][skip:]
    return ["\n".join(text[i * lines:(i + 1) * lines]) for i in range(n)]


def run_until(engine: Engine, done) -> None:
    while not done():
        engine.step()


def timed_steps(engine: Engine, done) -> list[float]:
    """Steps until `done()`, each one's seconds."""
    times = []
    while not done():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def decode_step(times: list[float]) -> float:
    return statistics.median(times) if times else 0.0


def chat(lm, prefix_cache: bool, turns: int, max_tokens: int) -> dict:
    engine = Engine(lm.model, lm.tokenizer, max_batch=1, max_seq_len=lm.model.config.context_length, prefix_cache=prefix_cache)
    messages = [{"role": "system", "content": "You are a patient teacher of English literature."}]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ttfts, decoded, steps, prompt_tokens, replies = [], [], [], 0, []
    t0 = time.perf_counter()
    for text in passages(turns, 3, skip=200):
        messages.append({"role": "user", "content": f"What do these lines mean?\n{text}"})
        prompt = lm.tokenizer.encode(render_chat(lm, messages))
        prompt_tokens += len(prompt)
        start = time.perf_counter()
        req = engine.add(prompt, params)
        run_until(engine, lambda: req.output)
        ttfts.append(time.perf_counter() - start)
        decoded.append(len(req.output) > 1)  # the first token's step decoded the second
        steps += timed_steps(engine, lambda: req.finished)
        replies.append(req.text)
        messages.append({"role": "assistant", "content": req.text})
    step = decode_step(steps)
    return {"what": "chat", "prefix_cache": prefix_cache, "turns": turns, "prompt_tokens": prompt_tokens,
            "reused_tokens": engine.reused_tokens, "ttft_ms": 1e3 * statistics.mean(ttfts),
            "ttft_ms_per_turn": [round(1e3 * t, 1) for t in ttfts], "decode_step_ms": round(1e3 * step, 3),
            "ttft_less_decode_ms": 1e3 * statistics.mean(t - step * d for t, d in zip(ttfts, decoded)),
            "seconds": time.perf_counter() - t0, "outputs": replies}


def shared(lm, prefix_cache: bool, clients: int, system_lines: int, max_tokens: int) -> dict:
    quote = passages(1, system_lines)[0]
    system = f"You answer questions about this scene. Quote it where you can.\n{quote}"
    questions = [f"What does this line say about the speaker? {line}" for line in passages(clients, 1, skip=system_lines)]
    prompts = [lm.tokenizer.encode(render_chat(lm, [{"role": "system", "content": system}, {"role": "user", "content": q}]))
               for q in questions]
    longest = max(len(p) for p in prompts)
    engine = Engine(lm.model, lm.tokenizer, max_batch=clients, max_seq_len=longest + max_tokens, prefill_chunk=256,
                    prefill_budget=256 * clients, prefix_cache=prefix_cache)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    reqs = [engine.add(p, params) for p in prompts]
    run_until(engine, lambda: all(r.output for r in reqs))
    ttft = time.perf_counter() - t0
    decoded = any(len(r.output) > 1 for r in reqs)  # the last first token's step decoded too
    step = decode_step(timed_steps(engine, lambda: not engine.has_work))
    return {"what": "shared", "prefix_cache": prefix_cache, "clients": clients, "prompt_tokens": sum(map(len, prompts)),
            "system_tokens": len(lm.tokenizer.encode(system)), "reused_tokens": engine.reused_tokens,
            "ttft_ms": 1e3 * ttft, "decode_step_ms": round(1e3 * step, 3), "ttft_less_decode_ms": 1e3 * (ttft - step * decoded),
            "seconds": time.perf_counter() - t0, "outputs": [r.text for r in reqs]}


def report(name: str, runs: dict[bool, list[dict]], env: dict, stopped: bool = False) -> None:
    """The median run of each setting (by seconds), then the ratios."""
    n = min(len(rs) for rs in runs.values())  # whole turns only
    runs = {on: rs[:n] for on, rs in runs.items()}
    extra = {"stopped_early": True} if stopped else {}
    median = {on: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for on, rs in runs.items()}
    for on in (False, True):
        row = {k: v for k, v in median[on].items() if k != "outputs"}
        print_row({**row, **env, "repeat": n, **extra})
    ratio = lambda k: round(median[False][k] / median[True][k], 2) if median[True][k] > 0 else None
    print_row({
        "what": f"{name} ratio", "ttft_ratio": ratio("ttft_ms"), "ttft_less_decode_ratio": ratio("ttft_less_decode_ms"),
        "seconds_ratio": ratio("seconds"),
        "identical_outputs": all(a["outputs"] == b["outputs"] for a in runs[False] for b in runs[True]), **extra,
    })


@entry_point
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--system-lines", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"device": args.device, "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
    scenarios = {"chat": lambda on: chat(lm, on, args.turns, args.max_tokens),
                 "shared": lambda on: shared(lm, on, args.clients, args.system_lines, args.max_tokens)}
    during, runs = "load", {False: [], True: []}
    try:  # SIGTERM (`timeout`): what is finished is reported
        with stop_on_sigterm(), torch.inference_mode():
            lm = load(args.checkpoint, device=args.device)
            during = "warm-up"
            scenarios["shared"](True)  # warm up: first calls of every kernel, the allocator
            for name, run in scenarios.items():
                during, runs = name, {False: [], True: []}
                for _ in range(args.repeat):
                    for on in (False, True):
                        runs[on].append(run(on))
                report(name, runs, env)
                during = None
    except Stopped:
        if during in scenarios and runs[False] and runs[True]:
            report(during, runs, env, stopped=True)
        print_row({"what": "stopped", "bench": "prefix_cache", "stopped_early": True, "during": during, **env})


if __name__ == "__main__":
    main()
