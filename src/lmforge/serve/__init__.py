"""`lmforge serve`: an OpenAI-compatible server with continuous batching (layer 5: wiring only)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from lmforge.checkpoint import find_checkpoints, resolve_checkpoint
from lmforge.serve.app import build_app
from lmforge.serve.runner import EngineRunner
from lmforge.utils.errors import UserError

__all__ = ["EngineRunner", "build_app", "create_app", "serve"]


def create_app(
    checkpoint: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    api_key: str | None = None,
    max_batch: int = 16,
    max_seq_len: int | None = None,
    max_queue: int = 256,
    prefill_chunk: int = 256,
    compile: bool = False,
    model_name: str | None = None,
    writes_per_step: int = 8,
    prefix_cache: bool = True,
    speculate: int = 0,
):
    """Load `checkpoint` and build its app (see `build_app`). The KV cache holds `max_batch`
    sequences of `max_seq_len` tokens, prompt and completion (default: the model's context), in the
    weights' `dtype` (auto: bf16 on CUDA, fp32 on CPU)."""
    from lmforge.infer import Engine, load

    _check_options(max_queue, writes_per_step)
    lm = load(checkpoint, device=device, dtype=dtype)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                    max_waiting=max_queue, compile=compile, prefix_cache=prefix_cache, speculate=speculate)
    name = model_name or default_model_name(lm.path)
    return build_app(lm, engine, model_name=name, api_key=api_key, writes_per_step=writes_per_step)


def _check_options(max_queue: int, writes_per_step: int) -> None:
    if max_queue < 1:
        raise UserError(f"--max-queue must be >= 1, got {max_queue}; with no room to wait every request would get 429")
    if writes_per_step < 0:
        raise UserError(f"--writes-per-step must be >= 0 (0: every token at once), got {writes_per_step}")


def default_model_name(path: str | Path | None) -> str:
    """The id a checkpoint is served as: a run's name for one of its step-* checkpoints, otherwise
    the checkpoint folder's own name (`/tmp/smollm2` is "smollm2", not "tmp")."""
    if path is None:
        return "lmforge"
    path = Path(path).resolve()
    return path.parent.name if path in find_checkpoints(path.parent) else path.name


def check_listen(host: str, port: int) -> None:
    """Bind `host:port` as uvicorn will (SO_REUSEADDR) and let go: a port in use or a host that is not
    an address of this machine is a one-line UserError instead of uvicorn's log line and exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use; stop the server there or pass another --port") from None
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          threads: int | None = None, **kwargs) -> None:
    """Serve `checkpoint` until interrupted; `threads` sets torch's CPU threads; other keyword arguments as in `create_app`."""
    import torch
    import uvicorn

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}; leave it out for torch's choice")
    _check_options(kwargs.get("max_queue", 1), kwargs.get("writes_per_step", 0))  # first, before the checkpoint is read
    resolve_checkpoint(checkpoint)  # a wrong path is reported first, as every verb does
    check_listen(host, port)  # then a busy port, before the model loads
    if threads:
        torch.set_num_threads(threads)

    if kwargs.get("compile"):
        print("compiling the decode step for each key span (256, 512, ... up to --max-seq-len)", flush=True)
    app = create_app(checkpoint, **kwargs)
    engine = app.state.runner.engine
    print(f"KV cache: {engine.max_batch} sequences x {engine.max_seq_len} tokens ({engine.cache_bytes / 2**30:.2f} GiB) "
          f"on {engine.device}" + (f"; decode step compiled for spans {engine.spans}" if engine.spans else "")
          + ("; prefix reuse off" if not engine.prefix_cache else "")
          + (f"; up to {engine.speculate} draft tokens per request" if engine.speculate else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
