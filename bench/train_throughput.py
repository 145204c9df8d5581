"""Training throughput of lmforge's model on random tokens: one JSON line per measurement.

    python bench/train_throughput.py --preset gpt2-124m --steps 50 [--compile] [--compare-hf]
        [--optim adamw|muon] [--chunked-loss N] [--batch-size B] [--seq-len T] [--device cpu]
        [--data PREPARED_DIR] [--loss-check] [--fp8] [--compile-mode reduce-overhead]

Each line holds tokens/s and ms per step (the median of --rounds rounds; with --compare-hf or
--loss-check the implementations take turns round by round, so that a slow spell of a shared
machine hits both), a step-time breakdown (data, forward+backward, optimizer; on 10 more steps with
a device sync between the phases), MFU, peak memory and the loss of the first and last step. MFU
counts 6N + 12 L H Q T FLOPs per token (N without position embeddings) against --peak-tflops (H100
SXM bf16 dense: 989.5), for --fp8 rows too (the fp8 dense peak is twice that): each row says so in
"mfu_peak": "bf16_dense" and "peak_tflops".

`peak_memory_gb` (CUDA only; GB = 1e9 bytes) says how in "peak_memory": "allocated": the
implementation's weights and optimizer state plus the most its timed steps allocate on top (the
other implementations' weights stay resident and are not counted). "reserved", for a runner that
replays CUDA graphs (--compile-mode reduce-overhead): its activations live in the graphs' memory
pools, which max_memory_allocated does not see while graphs replay, so the number is its weights
plus the reserved memory that its own warm-up and timed steps added (graph pools, gradients and
optimizer state included; an upper bound, as it counts the compilation's scratch too).

--compare-hf builds transformers' model of the same shape (GPT2LMHeadModel or LlamaForCausalLM,
from `lmforge.interop.hf.config_to_hf`), runs the same loop in the same process with torch's
AdamW (fused on CUDA) and prints a last line with the ratio of the two rates.

Batches are random tokens, or windows of prepared shards with --data (the model keeps --vocab-size
unless the shards' tokenizer has more ids). Both come from a pool in pinned memory on CUDA, built
before the timing, so that each step's "data" phase is the same asynchronous copy: random tokens
cycle through 8 batches; real windows are the run's own batches, one per step (a pool of at most
1 GiB, repeating beyond). --loss-check trains a second,
plain copy (eager, full logits, same init, batches and dtype) for the same steps and reports the
relative difference of the mean training loss: the fast path (compile, chunked loss, fp8) must agree.
--fp8 runs the blocks' linear layers in float8 through torchao (`lmforge.train.float8`).
SIGTERM (what `timeout` sends) stops the measuring and reports the rounds finished so far, marked
"stopped_early", so that a call with a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

from lmforge.config import TrainConfig, preset
from lmforge.config.train import COMPILE_MODES
from lmforge.model import Transformer
from lmforge.model.losses import chunked_lm_loss, lm_loss
from lmforge.train.float8 import to_float8
from lmforge.train.optim import build_optimizer
from lmforge.utils.device import autocast, autocast_dtype, compile_module, replays_cuda_graphs, resolve_device
from lmforge.utils.errors import UserError

from _data import print_row  # bench/_data.py
from _stop import Stopped, entry_point, stop_on_sigterm  # bench/_stop.py


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="the timed steps are split into rounds, implementations taking turns")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES),
                   help="torch.compile's mode for both implementations (reduce-overhead: CUDA graphs)")
    p.add_argument("--optim", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--chunked-loss", type=int, default=0, help="tokens per chunk of the chunked cross-entropy; 0: plain")
    p.add_argument("--fp8", action="store_true", help="float8 matmuls in the blocks' linear layers (torchao)")
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--data", default=None, help="prepared shards to draw batches from (default: random tokens)")
    p.add_argument("--loss-check", action="store_true", help="also run the eager plain path and compare losses")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.5, help="bf16 dense peak (H100 SXM: 989.5)")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1:
        p.error(f"--steps and --rounds must be >= 1, got {args.steps} and {args.rounds}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = autocast_dtype(device, args.dtype)
    if args.data:
        from lmforge.data import load_meta, open_split
        from lmforge.data.loader import TokenWindows

        # The model keeps --vocab-size (GPT-2's by default) unless the data's tokenizer needs more:
        # real text through the same shape as the random-token rows.
        args.vocab_size = max(args.vocab_size, load_meta(args.data)["vocab_size"])
    cfg = preset(args.preset, vocab_size=args.vocab_size)
    T = args.seq_len or cfg.context_length
    train = TrainConfig(optim=args.optim, lr=6e-4, chunked_loss=args.chunked_loss)
    # A pool of batches on the host, pinned on CUDA; each step copies one batch of it to the device
    # (the "data" phase), asynchronously, for random and real tokens alike.
    if args.data:
        windows = TokenWindows(open_split(args.data, "train"), T, "train")
        # Every batch a runner takes (warm-up, timed, breakdown: step i is batch i of seed 0), built now.
        n_pool = max(1, min(args.warmup + args.steps + min(args.steps, 10), 2**30 // (args.batch_size * (T + 1) * 8)))
        pool = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in
                          (windows.random_batch(args.batch_size, 0, i) for i in range(n_pool))])
    else:
        g = torch.Generator().manual_seed(0)
        n_pool = 8
        pool = torch.randint(0, args.vocab_size, (args.batch_size * n_pool, T + 1), generator=g)
    pool = pool.pin_memory() if device.type == "cuda" else pool

    def batch(i: int) -> torch.Tensor:  # a slice of the pinned pool: the copy runs asynchronously
        first = i % n_pool * args.batch_size
        return pool[first: first + args.batch_size].to(device, non_blocking=True)
    common = dict(preset=args.preset, device=str(device), dtype=str(amp or torch.float32).replace("torch.", ""),
                  compile=args.compile, compile_mode=args.compile_mode if args.compile else None,
                  threads=torch.get_num_threads(), batch_size=args.batch_size, seq_len=T)

    def head(name: str) -> dict:
        """The start of a runner's row. The "eager" runner is lmforge's plain path: never compiled."""
        if name == "eager":
            return {"what": "train_throughput", "impl": "lmforge-eager-plain", **common, "compile": False, "compile_mode": None}
        return {"what": "train_throughput", "impl": name, **common}

    runners = {"lmforge": lmforge_runner(cfg, train, args, device, amp, T, fast=True)}
    if args.loss_check:
        runners["eager"] = lmforge_runner(cfg, train, args, device, amp, T, fast=False)
    if args.compare_hf:
        try:
            runners["transformers"] = hf_runner(cfg, args, device, amp, T)
        except UserError as e:
            print_row({"what": "train_throughput_ratio", "preset": args.preset, "skipped": str(e)})
    def each(action: Callable[[Runner], None]) -> None:
        """`action` on every runner. A comparison that fails (transformers' compile on another
        version, say) is reported and dropped, so that lmforge's own row still comes out."""
        for name, r in list(runners.items()):
            try:
                action(r)
            except Exception as e:  # noqa: BLE001 - reported on stdout, not hidden
                if name == "lmforge":
                    raise
                del runners[name]
                print_row({**head(name), "failed": f"{type(e).__name__}: {e}"[:1000]})

    # Rounds of args.steps / rounds steps, each implementation in turn: on a shared or throttling
    # machine, slow spells hit every implementation alike, and the median round is reported.
    # SIGTERM (`timeout` on a call with a time limit) ends the measuring: what the rounds done so far
    # measured is still reported, marked "stopped_early".
    stopped = False
    try:
        with stop_on_sigterm():
            each(lambda r: r.warmup(batch, args.warmup, device, amp))
            rounds = max(1, min(args.rounds, args.steps))
            for i in range(rounds):
                each(lambda r: r.timed(batch, args.steps // rounds + (i < args.steps % rounds), device, amp))
            each(lambda r: r.breakdown(batch, min(args.steps, 10), device, amp))
    except Stopped:
        stopped = True
        for r in runners.values():
            r._pending = []
    if stopped:
        common["stopped_early"] = True
        for name in [n for n, r in runners.items() if not r.round_ms]:
            print_row({**head(name), "failed": "stopped before a timed round"})
            del runners[name]
        if "lmforge" not in runners:
            return

    ours = runners["lmforge"].summary(args, T)
    line = {**head("lmforge"), "optim": args.optim, "chunked_loss": args.chunked_loss, "fp8": args.fp8,
            "params": _params(runners["lmforge"].model), **ours}
    if "eager" in runners:
        n = min(len(runners["lmforge"].losses), len(runners["eager"].losses))  # the steps both took
        fast, eager = (sum(runners[k].losses[:n]) / n for k in ("lmforge", "eager"))
        line["loss_vs_eager"] = {"steps": n, "mean_loss": round(fast, 5),
                                 "eager_mean_loss": round(eager, 5), "rel_diff": round(abs(fast - eager) / eager, 6)}
    print_row(line)
    if "eager" in runners:
        print_row({**head("eager"), "optim": args.optim, "chunked_loss": 0, "params": line["params"], **runners["eager"].summary(args, T)})
    if "transformers" in runners:
        hf = runners["transformers"]
        theirs = hf.summary(args, T)
        print_row({**head("transformers"), "model": hf.name,
                   "optim": "adamw", "chunked_loss": 0, "params": _params(hf.model), **theirs})
        print_row({"what": "train_throughput_ratio", "preset": args.preset, "device": str(device),
                   "lmforge_over_transformers": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                   **({"stopped_early": True} if stopped else {})})  # from the rounds done, as the rows above


def lmforge_runner(cfg, train: TrainConfig, args, device, amp, T: int, fast: bool) -> "Runner":
    """lmforge's model and optimizer; `fast` takes --compile, --chunked-loss and --fp8, else eager with full logits."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if fast and args.fp8:
        to_float8(model, device)
    if fast and args.chunked_loss:
        loss_fn = lambda x, y: chunked_lm_loss(model(x, return_hidden=True), model.output.weight, y, args.chunked_loss)  # noqa: E731
    else:
        loss_fn = lambda x, y: lm_loss(model(x), y)  # noqa: E731
    if fast and args.compile:  # the model and its loss in one graph, as the trainer compiles them
        loss_fn = compile_module(loss_fn, args.compile_mode)
    return Runner("lmforge", model, loss_fn, build_optimizer(model, train, device), graphed=fast and args.compile and replays_cuda_graphs(args.compile_mode, device))


def hf_runner(cfg, args, device, amp, T: int) -> "Runner":
    """transformers' model of the same shape with torch's AdamW (fused on CUDA), as its users train it."""
    import transformers

    from lmforge.interop.hf import config_to_hf

    hf_cfg = {**config_to_hf(cfg), "bos_token_id": 0, "eos_token_id": 0}  # no tokenizer here: any in-vocabulary id
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    loss_fn = lambda x, y: lm_loss(hf(input_ids=x).logits, y)  # noqa: E731
    if args.compile:  # the same one graph of model and loss as lmforge's
        loss_fn = compile_module(loss_fn, args.compile_mode)
    opt = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    return Runner(hf_cfg["architectures"][0], hf, loss_fn, opt,
                  graphed=args.compile and replays_cuda_graphs(args.compile_mode, device))


class Runner:
    """One implementation's training step, timed in rounds; every step's loss is kept."""

    def __init__(self, name: str, model: nn.Module, loss_fn: Callable, opt, graphed: bool = False) -> None:
        self.name, self.model, self.loss_fn, self.opt, self.graphed = name, model, loss_fn, opt, graphed
        self.step_i, self.losses, self.round_ms, self.phases, self.n_breakdown = 0, [], [], {}, 0
        self.reserved_growth = 0  # CUDA: bytes of reserved memory that this runner's own steps added
        self._pending: list[torch.Tensor] = []

    def _step(self, batch: Callable, device, amp, sync=None) -> None:
        t0 = time.perf_counter()
        xy = batch(self.step_i)
        t1 = _mark(sync)
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            loss = self.loss_fn(xy[:, :-1], xy[:, 1:])
        loss.backward()
        t2 = _mark(sync)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._pending.append(loss.detach().clone())  # a CUDA graph's output is overwritten by its next replay
        self.step_i += 1
        if sync is not None:
            t3 = _mark(sync)
            for k, v in (("data", t1 - t0), ("forward_backward", t2 - t1), ("optimizer", t3 - t2)):
                self.phases[k] = self.phases.get(k, 0.0) + v
            self.n_breakdown += 1

    def _collect(self) -> None:
        self.losses += [t.item() for t in self._pending]
        self._pending = []

    def warmup(self, batch, n: int, device, amp) -> None:
        self.model.train()
        start = self._memory_start(device)  # graphed: the graphs' pools are made here, counted in reserved
        for _ in range(n):
            self._step(batch, device, amp)
        _sync(device)
        self._collect()
        if start is not None:
            self.reserved_growth += torch.cuda.max_memory_reserved() - start[1]

    def timed(self, batch, n: int, device, amp) -> None:
        _sync(device)
        start = self._memory_start(device)  # other implementations' weights stay resident: count only what this round adds
        t0 = time.perf_counter()
        for _ in range(n):
            self._step(batch, device, amp)
        _sync(device)
        self.round_ms.append((time.perf_counter() - t0) / n * 1e3)
        self._collect()
        if start is not None:
            self.reserved_growth += torch.cuda.max_memory_reserved() - start[1]
            if self.graphed:  # activations in CUDA graph pools: invisible to max_memory_allocated on replay
                self.peak_memory = "reserved"
                peak = self._resident_bytes(optimizer=False) + self.reserved_growth
            else:
                self.peak_memory = "allocated"
                peak = self._resident_bytes() + torch.cuda.max_memory_allocated() - start[0]
            self.peak_gb = max(getattr(self, "peak_gb", 0.0), peak / 1e9)

    @staticmethod
    def _memory_start(device) -> tuple[int, int] | None:
        """CUDA: resets the peak counters; what is allocated and reserved now."""
        if device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def _resident_bytes(self, optimizer: bool = True) -> int:
        """Weights and optimizer state: what stays allocated between steps (gradients are freed).
        Without `optimizer`, the weights only (the state is made in the first step, and is in reserved_growth)."""
        tensors = {id(t): t for t in self.model.parameters()}
        for state in self.opt.state.values() if optimizer else ():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def breakdown(self, batch, n: int, device, amp) -> None:
        n_losses = len(self.losses)
        for _ in range(n):
            self._step(batch, device, amp, sync=lambda: _sync(device))
        self._pending = []  # the breakdown steps' losses are not part of the compared run
        self.losses = self.losses[:n_losses]

    def summary(self, args, T: int) -> dict:
        ms = sorted(self.round_ms)[len(self.round_ms) // 2]
        tokens_per_s = args.batch_size * T / (ms / 1e3)
        cuda = hasattr(self, "peak_gb")
        return {
            "tokens_per_s": round(tokens_per_s, 1),
            "ms_per_step": round(ms, 2),
            "ms_per_step_rounds": [round(x, 2) for x in self.round_ms],
            "breakdown_ms": {k: round(v / self.n_breakdown * 1e3, 2) for k, v in self.phases.items()} if self.n_breakdown else None,
            "mfu": round(tokens_per_s * _flops_per_token(self.model, T) / (args.peak_tflops * 1e12), 4) if cuda else None,
            "mfu_peak": "bf16_dense" if cuda else None,  # --peak-tflops is the bf16 dense peak, for the fp8 row as well
            "peak_tflops": args.peak_tflops if cuda else None,
            "peak_memory_gb": round(self.peak_gb, 3) if cuda else None,
            "peak_memory": self.peak_memory if cuda else None,
            "loss_first": round(self.losses[0], 4), "loss_last": round(self.losses[-1], 4),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mark(sync) -> float:
    if sync is not None:
        sync()
    return time.perf_counter()


def _params(model: nn.Module) -> int:
    """Parameters without position embeddings (tied weights once), for lmforge's and transformers' models."""
    if isinstance(model, Transformer):
        return model.num_params()
    n = sum(p.numel() for p in model.parameters())
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    return n - (wpe.weight.numel() if wpe is not None else 0)


def _flops_per_token(model: nn.Module, T: int) -> int:
    """6N + 12 L H Q T (Kaplan et al. 2020; PaLM appendix B), N without position embeddings."""
    c = model.config
    if isinstance(model, Transformer):
        L, HQ = c.n_layer, c.n_head * c.head_size
    else:
        L, HQ = c.num_hidden_layers, c.hidden_size
    return 6 * _params(model) + 12 * L * HQ * T


if __name__ == "__main__":
    main()
