"""One handler per verb: build typed configs from parsed arguments, call the library, report.

Human-readable progress goes to stderr (bars) and stdout (summaries); each handler returns the
dict that `--json` prints.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from jsonargparse import Namespace

from lmforge.cli import other_rank
from lmforge.config import INFERENCE_DEFAULTS, LoraConfig, ModelConfig, TrainConfig
from lmforge.data import prepare, prepare_parallel, train_tokenizer
from lmforge.evaluate import evaluate_lm, evaluate_task
from lmforge.finetune import finetune, merge_lora
from lmforge.infer import ChatSession, load, predict, render_chat
from lmforge.interop import export_hf, import_gguf, import_hf
from lmforge.scaling import fit, plan, sweep
from lmforge.train import RunResult, pretrain
from lmforge.train.pretrain import refuse_finetuning_fields
from lmforge.utils.errors import UserError, require_text


def _say(args: Namespace) -> Callable[..., None]:
    """print, or print to stderr when stdout is reserved for --json; nothing on a torchrun rank other
    than 0, which speaks for the run (its stdout is closed by `main`, but --json says on stderr)."""
    if other_rank():
        return lambda *a: None
    return (lambda *a: print(*a, file=sys.stderr)) if args.json else print


def tokenizer_train(args: Namespace) -> dict[str, Any]:
    tok = train_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    m = args.min_frequency
    short = (f" (not the {args.vocab_size} asked: the corpus has no more pairs of tokens seen at least {m} "
             f"time{'' if m == 1 else 's'})" if tok.vocab_size < args.vocab_size else "")
    _say(args)(f"tokenizer: {tok.vocab_size} tokens -> {Path(args.out) / 'tokenizer.json'}{short}")
    return {"out": args.out, "vocab_size": tok.vocab_size, "sha256": tok.sha256}


def prepare_cmd(args: Namespace) -> dict[str, Any]:
    say = _say(args)
    if args.target is not None:
        if len(args.inputs) != 1:
            raise UserError(f"--target pairs with exactly one source file, got {len(args.inputs)} inputs")
        meta = prepare_parallel(args.inputs[0], args.target, args.tokenizer, args.out, val_fraction=args.val_fraction)
        for split, s in meta["splits"].items():
            say(f"{split}: {s['pairs']:,} pairs, {s['src_tokens']:,} source + {s['tgt_tokens']:,} target tokens")
        say(f"wrote {args.out}")
        return meta
    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction)
    for split, s in meta["splits"].items():
        per_token = f", {s['bytes_per_token']:.2f} bytes/token" if s["bytes_per_token"] else ""
        say(f"{split}: {s['tokens']:,} tokens from {s['documents']} document{'' if s['documents'] == 1 else 's'}{per_token}")
    say(f"dropped {meta['duplicates_dropped']} duplicate documents; wrote {args.out}")
    return meta


def _fields(group: Namespace) -> dict[str, Any]:
    """The values of a dataclass group (`model`, `train`, `lora`). A group read from a file (`--model m.yaml`)
    also carries jsonargparse's `__path__`, the file's name, which is no field of the dataclass."""
    return {k: v for k, v in group.as_dict().items() if k != "__path__"}


def pretrain_cmd(args: Namespace) -> dict[str, Any]:
    fields = _fields(args.model)
    refuse_finetuning_fields(fields.get("task_head"), fields.get("labels"), fields.get("lora"))
    model = ModelConfig(**fields)
    train = TrainConfig(**_fields(args.train))
    result = pretrain(args.data, args.out, model, train, resume=args.resume, objective=args.objective, log=_say(args))
    _report_run(result, _say(args))
    return result.to_dict()


def finetune_cmd(args: Namespace) -> dict[str, Any]:
    result = finetune(
        args.checkpoint, args.task, args.data, args.out,
        target=args.target, val=args.val, val_target=args.val_target, split_articles=args.split_articles,
        train=TrainConfig(**_fields(args.train)), lora=LoraConfig(**_fields(args.lora)),
        freeze_embeddings=args.freeze_embeddings, freeze_layers=args.freeze_layers, labels=args.labels,
        text_field=args.text_field, label_field=args.label_field, prompt=args.prompt, doc_stride=args.doc_stride,
        repeat_input=args.repeat_input, dropout=args.dropout, resume=args.resume, log=_say(args),
    )
    unit = {"tag": " nats/word", "seq2seq": " nats/token", "sft": " nats/token"}.get(args.task, " nats/example")
    _report_run(result, _say(args), unit)
    if args.split_articles is not None:  # the held-out articles of the same file, not a separate one
        _say(args)(f"score it: lmforge eval {result.checkpoint} --task {args.task} --data {args.data} "
                   f"--split-articles {args.split_articles:g}")
    else:
        _say(args)(f"score it: lmforge eval {result.checkpoint} --task {args.task} --data DEV_FILE")
    return result.to_dict()


def merge_lora_cmd(args: Namespace) -> dict[str, Any]:
    path = merge_lora(args.checkpoint, args.out)
    _say(args)(f"merged the LoRA adapters of {args.checkpoint} -> {path}")
    return {"out": str(path)}


def predict_cmd(args: Namespace) -> dict[str, Any]:
    n = predict(args.checkpoint, args.data, args.out, args.task, target=args.target, split_articles=args.split_articles,
                text_field=args.text_field, label_field=args.label_field, device=args.device,
                dtype=args.dtype, batch_size=args.batch_size, **_inference_kwargs(args))
    _say(args)(f"wrote {n:,} prediction{'s' if n != 1 else ''} to {args.out}")
    return {"out": args.out, "predictions": n}


def _report_run(result: RunResult, say: Callable[..., None], unit: str = " nats/token") -> None:
    val = f", val loss {result.val_loss:.4f}{unit}" if result.val_loss is not None else ""
    val += f" = {result.val_bpb:.4f} bits/byte" if result.val_bpb is not None else ""
    wait = f", data wait {result.data_wait_share:.1%} of step time" if result.data_wait_share is not None else ""
    skipped = f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
    say(f"done: step {result.step}, train loss {result.train_loss:.4f}{val}, {result.seconds:.1f}s{wait}{skipped}")
    say(f"checkpoint: {result.checkpoint}\nloss curve: {result.plot}")


def generate_cmd(args: Namespace) -> dict[str, Any]:
    if args.max_new_tokens < 1:  # else the output is an empty line, as if the model had nothing to say
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    require_text(args.prompt, "--prompt")
    lm = load(args.checkpoint, device=args.device, dtype=args.dtype)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    pieces = []
    for piece in lm.stream(args.prompt, args.max_new_tokens, **kwargs):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    seconds = time.perf_counter() - t0
    text = "".join(pieces)
    if not args.json:
        sys.stdout.write("\n")
    return {"prompt": args.prompt, "text": text, "seconds": seconds}


def eval_cmd(args: Namespace) -> dict[str, Any]:
    if args.task is not None:
        return _eval_task(args)
    for name in ("target", "split_articles", "text_field", "label_field", "limit", *INFERENCE_DEFAULTS):
        if args[name] is not None:
            raise UserError(f"--{name.replace('_', '-')} belongs to task evaluation; add --task")
    result = evaluate_lm(args.checkpoint, args.data, split=args.split, device=args.device, dtype=args.dtype,
                         **_batch_size(args))
    _say(args)(
        f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
        f"{result['bpb']:.4f} bits/byte over {result['tokens']:,} tokens"
    )
    return result


def _batch_size(args: Namespace) -> dict[str, Any]:
    """`--batch-size` when given; otherwise the evaluation's own default."""
    return {"batch_size": args.batch_size} if args.batch_size is not None else {}


def _inference_kwargs(args: Namespace) -> dict[str, Any]:
    return {k: args[k] for k in ("max_new_tokens", "num_beams", "length_penalty", "max_answer_length")}


def _eval_task(args: Namespace) -> dict[str, Any]:
    if args.split is not None:
        raise UserError("--split selects a split of a prepared data directory; --task scores the task file --data names")
    if len(args.data) != 1:
        raise UserError(f"--task scores one data file, got {len(args.data)}")
    result = evaluate_task(
        args.checkpoint, args.task, args.data[0], target=args.target, split_articles=args.split_articles,
        text_field=args.text_field, label_field=args.label_field, limit=args.limit, device=args.device,
        dtype=args.dtype, **_batch_size(args), **_inference_kwargs(args),
    )
    scores = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float) and k != "seconds")
    _say(args)(f"{result['task']} on {result['examples']:,} examples: {scores}")
    return result


def scaling_sweep_cmd(args: Namespace) -> dict[str, Any]:
    rows = sweep(args.grid, args.data, args.out, log=_say(args), devices=args.devices)
    _say(args)(f"{len(rows)} runs in {args.out}/results.jsonl; fit them with `lmforge scaling fit {args.out}`")
    return {"runs": len(rows), "results": f"{args.out}/results.jsonl"}


def scaling_fit_cmd(args: Namespace) -> dict[str, Any]:
    result = fit(args.directory, approaches=args.approaches, n_bootstrap=args.bootstrap, level=args.level)
    say = _say(args)
    say(f"{result['runs']} runs from {result['results']}")
    for name in ("kaplan", "approach1", "approach2", "approach3"):
        section = result.get(name)
        if section is None:
            continue
        if "skipped" in section:
            say(f"{name}: skipped ({section['skipped']})")
            continue
        boot = section.get("bootstrap", {})
        intervals = boot.get("intervals", {})
        parts = []
        for key, value in section["exponents"].items():
            lo_hi = intervals.get(key)
            parts.append(f"{key} = {value:.4g}" + (f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""))
        why = boot.get("unavailable") or boot.get("skipped")  # no bracket then: an interval it is not
        say(f"{name}: " + ", ".join(parts) + (f" (no {args.level:.0%} interval: {why})" if why else ""))
    for path in result.get("plots", []):
        say(f"plot: {path}")
    say(f"wrote {args.directory}/fit.json")
    return result


def scaling_plan_cmd(args: Namespace) -> dict[str, Any]:
    result = plan(flops=args.flops, params=args.params, tokens=args.tokens, law=args.law, gpu=args.gpu, mfu=args.mfu,
                  gpus=args.gpus)
    _say(args)(
        f"{result['law']}: N = {result['params']:.3g} parameters, D = {result['tokens']:.3g} tokens "
        f"({_amount(result['tokens_per_param'], 1)} tokens/parameter), C = {result['flops']:.3g} FLOPs, "
        f"predicted loss {result['loss']:.3f}\n"
        f"{_amount(result['gpu_hours'], 0)} {result['gpu']} GPU-hours at MFU {result['mfu']}"
        f" ({_amount(result['wall_hours'], 1)} h on {result['gpus']} GPU{'s' if result['gpus'] > 1 else ''})"
    )
    return result


def _amount(x: float, decimals: int) -> str:
    """`x` with thousands separators, in powers of ten past a trillion (not hundreds of digits), and to two
    significant digits where `decimals` would show nothing of it (0.2 GPU-hours, not "0")."""
    if 0 < abs(x) < 10 ** (1 - decimals):
        return f"{x:.2g}"
    return f"{x:,.{decimals}f}" if x < 1e12 else f"{x:.3g}"


def _importer(convert: Callable[..., Any]) -> Callable[[Namespace], dict[str, Any]]:
    def import_cmd(args: Namespace) -> dict[str, Any]:
        path = convert(args.source, args.out)
        _say(args)(f"imported {args.source} -> {path}")
        return {"checkpoint": str(path)}

    return import_cmd


def chat_cmd(args: Namespace) -> None:
    if args.max_new_tokens < 1:  # else every turn would end before its first token
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.system is not None:
        require_text(args.system, "--system")
    if args.speculate < 0:
        raise UserError(f"--speculate must be >= 0, got {args.speculate}")
    if sys.stdin is None:  # closed (<&-): there is nothing to read the messages from
        raise UserError("stdin is closed; chat reads the messages from it: type them, or pipe them in")
    lm = load(args.checkpoint, device=args.device, dtype=args.dtype)
    session = ChatSession(lm, system=args.system, speculate=args.speculate, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)
    # A checkpoint without a template, or one whose template refuses a system message, fails here, once.
    render_chat(lm, [*session.messages, {"role": "user", "content": "hi"}])
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 arrives with its bad bytes as lone surrogates, which the turn refuses;
        # strict decoding would fail on the whole buffered chunk, losing the lines around it.
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    print(f"chatting with {lm.path} (/reset clears the conversation, /exit quits)", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:  # Ctrl-D at the prompt: the shell's prompt starts on a line of its own
                sys.stdout.write("\n")
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        note = None
        try:
            if not _reply(session, text, args.max_new_tokens):
                note = "(reply stopped; that turn is dropped from the conversation)"
            elif session.context_full:
                note = (f"(the reply stopped at the end of the model's context of {lm.model.config.context_length} "
                        "tokens; /reset to start over)")
        except UserError as e:  # a full context, a line that is not UTF-8: that turn ends, not the session
            note = f"lmforge: {e}"
        sys.stdout.write("\n")  # the reply's line ends first, so that a note is a line of its own on any terminal
        sys.stdout.flush()
        if note:
            print(note, file=sys.stderr)
    return None


def _reply(session: ChatSession, text: str, max_new_tokens: int) -> bool:
    """Stream the reply to `text` to stdout; False when Ctrl-C stopped it.

    Ctrl-C stops the reply, not the session: the press is noted and the reply ends at its next piece,
    so that the model is never cut off mid-step; the turn is rolled back as a cut-off turn is. A second
    press interrupts at once (and ends the session, as Ctrl-C at the prompt does).
    """
    pressed = []

    def on_sigint(signum: int, frame: Any) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    # Not where SIGINT is ignored (a background job) or off the main thread (no handler can be set there).
    deferred = (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None))
    previous = signal.signal(signal.SIGINT, on_sigint) if deferred else None
    reply = session.send(text, max_new_tokens)
    try:
        for piece in reply:
            if pressed:
                return False
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        reply.close()  # stopped early: the session drops the unanswered turn
        if deferred:
            signal.signal(signal.SIGINT, previous)
    return True


def serve_cmd(args: Namespace) -> None:
    from lmforge.serve import serve  # FastAPI and uvicorn load only for this verb

    if args.port < 0 or args.port > 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, device=args.device, dtype=args.dtype,
          max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
          prefill_chunk=args.prefill_chunk, compile=args.compile, model_name=args.model_name, threads=args.threads,
          writes_per_step=args.writes_per_step, prefix_cache=not args.no_prefix_cache, speculate=args.speculate)


def export_hf_cmd(args: Namespace) -> dict[str, Any]:
    path = export_hf(args.checkpoint, args.out)
    _say(args)(f"exported {args.checkpoint} -> {path} (load it with transformers' Auto classes)")
    return {"out": str(path)}


def demo_cmd(args: Namespace) -> dict[str, Any]:
    from lmforge.cli.demo import run_demo

    return run_demo(args.out, max_steps=args.max_steps, device=args.device, say=_say(args), resume=args.resume)


HANDLERS: dict[str, Callable[[Namespace], dict[str, Any] | None]] = {
    "demo": demo_cmd,
    "tokenizer.train": tokenizer_train,
    "prepare": prepare_cmd,
    "pretrain": pretrain_cmd,
    "generate": generate_cmd,
    "finetune": finetune_cmd,
    "merge-lora": merge_lora_cmd,
    "predict": predict_cmd,
    "eval": eval_cmd,
    "chat": chat_cmd,
    "serve": serve_cmd,
    "scaling.sweep": scaling_sweep_cmd,
    "scaling.fit": scaling_fit_cmd,
    "scaling.plan": scaling_plan_cmd,
    "import.hf": _importer(import_hf),
    "import.gguf": _importer(import_gguf),
    "export.hf": export_hf_cmd,
}
