"""Load test of `lmforge serve`: the same streaming requests one at a time, then all at once.

    python bench/serve_load.py CKPT [--clients 64] [--max-tokens 64] [--max-batch 64] [--max-seq-len N] [--device cpu] [--dtype auto] [--threads N]
                                    [--temperature T [--top-p P] [--top-k K]]

Starts `lmforge serve CKPT` in a subprocess on a free loopback port, sends --clients streaming
completions (greedy, end-of-text ignored, so every request makes exactly --max-tokens tokens)
over httpx, first sequentially and then concurrently. With --temperature > 0 they sample, request i
with seed i, so that its output is the same alone and in any batch. One JSON line per
mode {"what", "clients", "tokens", "seconds", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms",
"latency_p50_ms"}, then {"what": "speedup", "ratio", "identical_outputs"}. `--repeat N` runs the
two modes N times, taking turns, and reports the round with the median total throughput of each
mode; "ratios" lists each round's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx

from _data import print_row  # bench/_data.py
from _stop import entry_point  # bench/_stop.py

WORDS = ["ROMEO:", "JULIET:", "First Citizen:", "KING", "MENENIUS:", "What say you", "Nay, my lord", "O, "]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int, model: str, sampling: dict) -> tuple[str, float, float, int]:
    """One streaming completion; the SSE lines are read with httpx (a light client: the `openai`
    package's per-chunk parsing would load the shared CPU as much as the server does)."""
    t0 = time.perf_counter()
    first, pieces, tokens = None, [], 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **sampling}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return "".join(pieces), (first or end) - t0, end - t0, tokens


async def run(url: str, prompts: list[str], max_tokens: int, concurrent: bool, sampling: dict | None = None) -> tuple[list[str], dict]:
    sampling = sampling or {"temperature": 0}
    per_request = [{**sampling, "seed": i} if sampling.get("temperature") else sampling for i in range(len(prompts))]
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, p, max_tokens, model, sp) for p, sp in zip(prompts, per_request)))
        else:
            results = [await one(client, p, max_tokens, model, sp) for p, sp in zip(prompts, per_request)]
        seconds = time.perf_counter() - t0
    tokens = sum(r[3] for r in results)
    return [r[0] for r in results], {
        "clients": len(prompts), "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "ttft_p50_ms": round(1e3 * percentile([r[1] for r in results], 0.5), 1),
        "ttft_p95_ms": round(1e3 * percentile([r[1] for r in results], 0.95), 1),
        "latency_p50_ms": round(1e3 * statistics.median(r[2] for r in results), 1),
    }


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=None, help="the server's --max-seq-len (default: the model's context)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the server's --dtype; the equality check is exact in float32 (auto is bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (1 on a small shared CPU)")
    p.add_argument("--writes-per-step", type=int, default=None, help="the server's --writes-per-step (default: its own)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of both modes, taking turns; report the median round of each")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (request i with seed i); 0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    args = p.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", args.checkpoint, "--port", str(port), "--device", args.device,
         "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients)]
        + (["--threads", str(args.threads)] if args.threads else [])
        + (["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else [])
        + (["--writes-per-step", str(args.writes_per_step)] if args.writes_per_step is not None else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy(),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        prompts = [WORDS[i % len(WORDS)] + " " * (i // len(WORDS)) for i in range(args.clients)]
        base = {"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                "max_seq_len": args.max_seq_len, "device": args.device, "dtype": args.dtype, "threads": args.threads, "writes_per_step": args.writes_per_step, **sampling, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
        asyncio.run(run(url, prompts[:2], 4, concurrent=False))  # warm up
        rounds = []
        for _ in range(args.repeat):
            alone, seq = asyncio.run(run(url, prompts, args.max_tokens, concurrent=False, sampling=sampling))
            together, con = asyncio.run(run(url, prompts, args.max_tokens, concurrent=True, sampling=sampling))
            rounds.append((alone, seq, together, con))
        median = lambda stats: sorted(stats, key=lambda d: d["tokens_per_s"])[len(stats) // 2]
        seq, con = median([r[1] for r in rounds]), median([r[3] for r in rounds])
        print_row({"what": "one at a time", **base, "repeat": args.repeat, **seq})
        print_row({"what": "all at once", **base, "repeat": args.repeat, **con})
        same = sum(all(r[0][i] == r[2][i] == rounds[0][0][i] for r in rounds) for i in range(len(prompts)))
        print_row({"what": "speedup", **base, "ratio": round(con["tokens_per_s"] / seq["tokens_per_s"], 2),
                   "ratios": [round(r[3]["tokens_per_s"] / r[1]["tokens_per_s"], 2) for r in rounds],
                   "identical_outputs": f"{same}/{len(prompts)}"})
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
