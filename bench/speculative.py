"""Speculative decoding by prompt lookup, against plain decoding and transformers' own prompt lookup.

    python bench/speculative.py CKPT [--task edit|summarize|extract] [--docs 8] [--max-new-tokens 128] [--speculate 8]
                                     [--repeat 3] [--device cpu] [--threads N] [--no-hf] [--compile]
                                     [--temperature T --top-k K --top-p P]

Greedy requests one at a time (batch 1, where a decode step is bound by reading the weights and
checking several drafted tokens costs little more than one), on a chat checkpoint
(SmolLM2-135M-Instruct), through its chat template, from ../shared/data:

- edit: the first paragraph of each of the first --docs SQuAD v1.1 dev articles, "Correct any
  spelling mistakes in this paragraph and return the whole paragraph" (the reply copies most of
  the prompt, as proofreading and code edits do).
- summarize: the first --docs SciTLDR test abstracts, "Summarize this abstract in two sentences".
- extract: the first --docs SQuAD v1.1 dev questions, "Quote the sentence of the passage that answers".

With --temperature > 0 the requests sample (request i with seed i): speculation then keeps a
draft token with the probability the model gives it (`speculative_sample`), so the two lmforge
ways draw different texts from the same distribution, and transformers is not run. Otherwise four
ways, taking turns --repeat times: lmforge's engine without and with `speculate`, and
transformers' `generate` (dynamic cache) on the same weights, without and with
`prompt_lookup_num_tokens`. One JSON line per way {"what", "tokens", "seconds", "tokens_per_s",
["accepted_per_step"]} (medians of the turns), then {"what": "ratio", "speculative_over_plain",
"lmforge_over_transformers_prompt_lookup", "identical_outputs"}.

SIGTERM (what `timeout` sends) stops the turns: the whole turns finished are reported as above,
marked "stopped_early", then a line {"what": "stopped", "stopped_early": true, "during", "turns_done"}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _data import print_row, shared_data  # noqa: E402
from _stop import Stopped, entry_point, stop_on_sigterm  # noqa: E402
from decode import build_hf, sync  # noqa: E402

from lmforge.infer import Engine, SamplingParams, load, render_chat  # noqa: E402


def requests(task: str, n: int) -> list[str]:
    if task == "edit":
        squad = json.loads((shared_data() / "qa" / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
        return [f"Correct any spelling mistakes in this paragraph and return the whole paragraph:\n\n{a['paragraphs'][0]['context']}"
                for a in squad["data"][:n]]
    if task == "summarize":
        lines = (shared_data() / "summarization" / "scitldr" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        return [f"Summarize this abstract in two sentences.\n\n{' '.join(json.loads(line)['source'])}" for line in lines]
    squad = json.loads((shared_data() / "qa" / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    pairs = [(p["context"], qa["question"]) for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"][:1]][:n]
    return [f"{context}\n\nQuote the sentence of this passage that answers the question: {question}" for context, question in pairs]


def build_engine(lm, prompts: list[list[int]], max_new_tokens: int, speculate: int, compile_: bool = False) -> Engine:
    """One slot; without prefix reuse, since every turn runs the same prompts again."""
    return Engine(lm.model, lm.tokenizer, max_batch=1, max_seq_len=max(map(len, prompts)) + max_new_tokens,
                  prefix_cache=False, speculate=speculate, compile=compile_)


def run_engine(engine: Engine, prompts: list[list[int]], max_new_tokens: int, device, sampling: dict | None = None) -> dict:
    sampling = sampling or {"temperature": 0}
    drafted, accepted = engine.drafted, engine.accepted
    sync(device)
    t0 = time.perf_counter()
    outputs, steps = [], 0
    for i, p in enumerate(prompts):
        req = engine.add(p, SamplingParams(max_tokens=max_new_tokens, seed=i, **sampling))
        while not req.finished:
            engine.step()
            steps += 1
        outputs.append(req.output)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, outputs))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "outputs": outputs,
            "drafted": engine.drafted - drafted, "accepted": engine.accepted - accepted, "steps": steps}


def run_hf(hf, lm, prompts: list[list[int]], max_new_tokens: int, lookup: int, device) -> dict:
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(lm.tokenizer.end_ids),
                  pad_token_id=lm.tokenizer.eot_id)
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    sync(device)
    t0 = time.perf_counter()
    outputs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p], device=device), **kwargs)[0, len(p):].tolist()
        outputs.append(out)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, outputs))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "outputs": outputs}


@entry_point
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--task", choices=["edit", "summarize", "extract"], default="edit")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--speculate", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="time lmforge only")
    ap.add_argument("--compile", action="store_true", help="compiled engines (the decode and the verify step); transformers stays eager")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    hf_too = not args.no_hf and args.temperature == 0
    env = {"task": args.task, "docs": args.docs, "max_new_tokens": args.max_new_tokens,
           "speculate": args.speculate, "compile": args.compile, **sampling, "device": args.device, "torch": torch.__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads(), "repeat": args.repeat}
    runs: dict[str, list[dict]] = {}
    during = "load"
    try:  # SIGTERM (`timeout`): the whole turns finished are reported
        with stop_on_sigterm():
            lm = load(args.checkpoint, device=args.device)
            prompts = [lm.tokenizer.encode(render_chat(lm, [{"role": "user", "content": text}])) for text in requests(args.task, args.docs)]
            env["prompt_tokens"] = sum(map(len, prompts))
            during = "build"
            plain, fast = (build_engine(lm, prompts, args.max_new_tokens, k, args.compile) for k in (0, args.speculate))
            ways = {"lmforge": lambda: run_engine(plain, prompts, args.max_new_tokens, device, sampling),
                    "lmforge speculative": lambda: run_engine(fast, prompts, args.max_new_tokens, device, sampling)}
            if hf_too:
                hf = build_hf(lm.model, device)
                ways["transformers"] = lambda: run_hf(hf, lm, prompts, args.max_new_tokens, 0, device)
                ways["transformers prompt lookup"] = lambda: run_hf(hf, lm, prompts, args.max_new_tokens, args.speculate, device)
            runs = {name: [] for name in ways}
            with torch.inference_mode():
                during = "warm-up"
                for engine in (plain, fast):
                    run_engine(engine, prompts[:1], 8, device)  # warm up
                for turn in range(args.repeat):
                    during = f"turn {turn + 1}"
                    for name, run in ways.items():
                        runs[name].append(run())
        during = None
    except Stopped:
        pass
    turns = min((len(rs) for rs in runs.values()), default=0)  # whole turns only
    if turns:
        report({name: rs[:turns] for name, rs in runs.items()}, {**env, "repeat": turns}, hf_too, args.temperature,
               stopped=during is not None)
    if during is not None:
        print_row({"what": "stopped", "bench": "speculative", "stopped_early": True, "during": during,
                   "turns_done": turns, **env})


def report(runs: dict[str, list[dict]], env: dict, hf_too: bool, temperature: float, stopped: bool = False) -> None:
    extra = {"stopped_early": True} if stopped else {}
    median = {name: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for name, rs in runs.items()}
    for name, r in median.items():
        row = {"what": name, **env, **{k: v for k, v in r.items() if k != "outputs"}, **extra}
        if "drafted" in r:
            row["accepted_per_step"] = round(r["accepted"] / max(r["steps"], 1), 2)
        print_row(row)
    reference = median["lmforge"]["outputs"]
    ratio = {"what": "ratio", **env, **extra,
             "speculative_over_plain": round(median["lmforge speculative"]["tokens_per_s"] / median["lmforge"]["tokens_per_s"], 2)}
    if temperature == 0:  # sampled texts differ by design
        ratio["identical_outputs"] = {name: sum(a == b for a, b in zip(r["outputs"], reference)) for name, r in median.items()}
    if hf_too:
        ratio["transformers_prompt_lookup_over_plain"] = round(
            median["transformers prompt lookup"]["tokens_per_s"] / median["transformers"]["tokens_per_s"], 2)
        ratio["lmforge_over_transformers_prompt_lookup"] = round(
            median["lmforge speculative"]["tokens_per_s"] / median["transformers prompt lookup"]["tokens_per_s"], 2)
    print_row(ratio)

if __name__ == "__main__":
    main()
