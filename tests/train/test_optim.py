import math

import pytest
import torch
from torch import nn

from lmforge.config import TrainConfig, preset
from lmforge.model import Transformer
from lmforge.train.optim import lr_at, param_groups
from lmforge.utils.errors import UserError

from conftest import tiny_train_config


def test_lr_schedule_values():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    # Linear warmup: step s (0-based) gets lr * (s + 1) / warmup.
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    # Cosine from lr at the end of warmup to min_lr at max_steps; halfway is the mean of the two.
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)


def test_no_decay_on_norms_biases_and_embeddings():
    model = Transformer(preset("tiny", vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith("weight") and ("qkv" in n or "proj" in n or "fc" in n) for n in decayed)
    assert "tok_embeddings.weight" in kept and "pos_embeddings.weight" in kept
    assert any(n.endswith("bias") for n in kept) and any("norm" in n for n in kept)
    # Every parameter exactly once (the tied head is the embedding).
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert names[id(m.weight)] in kept


# ------------------------------------------------------------------------------------------ Muon
from lmforge.train.optim import NS_COEFFICIENTS, Muon, build_optimizer, hidden_matrices, newton_schulz  # noqa: E402


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (192, 64)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) @ torch.diag(torch.logspace(0, -2, shape[1]))  # condition number 100
    x = newton_schulz(g)
    s = torch.linalg.svdvals(x)
    # Singular value by singular value, the iteration is the scalar quintic p applied 5 times to sigma / ||G||_F.
    a, b, c = NS_COEFFICIENTS
    want = torch.linalg.svdvals(g.double()) / g.double().norm()
    start = want.clone()
    for _ in range(5):
        want = a * want + b * want**3 + c * want**5
    torch.testing.assert_close(s.double(), want.sort(descending=True).values, atol=1e-4, rtol=0)
    # The quintic trades exact convergence for speed: every singular value that starts above ~2e-3
    # of the Frobenius norm ends in [0.68, 1.2024] (the scalar map's range there), not at 1.
    assert x.shape == g.shape and s.max() < 1.21 and (want[start >= 2e-3] > 0.65).all()
    # Same singular vectors as g: U^T X V is diagonal.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.T @ x @ vh.T
    torch.testing.assert_close(inner, torch.diag(torch.diagonal(inner)), atol=2e-4, rtol=0)


def naive_muon_updates(grads: list[torch.Tensor], beta: float, steps: int = 5) -> list[torch.Tensor]:
    """Muon by the other spelling: SGD-style Nesterov momentum (M <- beta M + G; U = G + beta M),
    Newton-Schulz done on the singular values (X = U S V^T maps to U p(S) V^T), float64."""
    a, b, c = NS_COEFFICIENTS
    buf, out = torch.zeros_like(grads[0], dtype=torch.float64), []
    for g in grads:
        g = g.double()
        buf = beta * buf + g
        update = g + beta * buf
        u, s, vh = torch.linalg.svd(update / update.norm(), full_matrices=False)
        for _ in range(steps):
            s = a * s + b * s**3 + c * s**5
        rows, cols = g.shape
        out.append(u @ torch.diag(s) @ vh * max(1.0, rows / cols) ** 0.5)
    return out


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_step_equals_naive_reimplementation(shape):
    torch.manual_seed(0)
    w0 = torch.randn(*shape)
    p = nn.Parameter(w0.clone())
    lr, beta = 0.05, 0.95
    opt = Muon([{"params": [p], "use_muon": True, "lr_scale": 0.5}], lr=lr, momentum=beta)
    grads = [torch.randn(*shape) for _ in range(4)]
    expected = w0.double()
    for g, update in zip(grads, naive_muon_updates(grads, beta)):
        p.grad = g.clone()
        opt.step()
        expected = expected - lr * 0.5 * update
        torch.testing.assert_close(p.data.double(), expected, atol=2e-5, rtol=0)


def test_muon_orthogonalises_row_blocks_separately():
    """A fused [q; k; v]-like weight with rows (8, 16): each block steps as its own matrix would."""
    torch.manual_seed(0)
    w0 = torch.randn(24, 8)
    p = nn.Parameter(w0.clone())
    opt = Muon([{"params": [p], "use_muon": True, "rows": [8, 16]}], lr=0.1, momentum=0.9)
    grads = [torch.randn(24, 8) for _ in range(3)]
    top, bottom = naive_muon_updates([g[:8] for g in grads], 0.9), naive_muon_updates([g[8:] for g in grads], 0.9)
    expected = w0.double()
    for g, u, v in zip(grads, top, bottom):
        p.grad = g.clone()
        opt.step()
        expected = expected - 0.1 * torch.cat([u, v])
    torch.testing.assert_close(p.data.double(), expected, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="add up"):
        Muon([{"params": [p], "use_muon": True, "rows": [8, 8]}])


def test_muon_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
    ref_a, ref_b = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    groups = lambda x, y: [{"params": [x], "weight_decay": 0.1}, {"params": [y], "weight_decay": 0.0}]  # noqa: E731
    ours = Muon(groups(a, b), lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(groups(ref_a, ref_b), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for _ in range(5):
        for p, q in ((a, ref_a), (b, ref_b)):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, ref_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, ref_b, atol=1e-6, rtol=1e-6)


def test_muon_takes_the_blocks_matrices_only():
    model = Transformer(preset("tiny", vocab_size=100, tie_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for p in hidden_matrices(model)}
    assert hidden == {f"layers.{i}.{m}.weight" for i in range(2) for m in
                      ("attention.qkv", "attention.proj", "feed_forward.fc", "feed_forward.proj")}
    opt = build_optimizer(model, TrainConfig(optim="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert [g["rows"] for g in muon] == [[], [64, 64, 64]]  # whole matrices; q, k, v each on its own
    assert {names[id(p)].split(".", 2)[2] for p in muon[1]["params"]} == {"attention.qkv.weight"}
    assert all(g["lr_scale"] == pytest.approx(20.0) and g["weight_decay"] == 0.0 for g in muon)
    adam = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert "tok_embeddings.weight" in adam and "output.weight" in adam and not hidden & set(adam)
    assert len(adam) + len(hidden) == len(list(model.parameters()))


def test_batched_muon_equals_one_matrix_at_a_time():
    """Same-shape blocks are orthogonalised as one stack: the result is that of separate optimizers."""
    torch.manual_seed(0)
    ws = [torch.randn(12, 8) for _ in range(3)]
    together = [nn.Parameter(w.clone()) for w in ws]
    apart = [nn.Parameter(w.clone()) for w in ws]
    opt = Muon([{"params": together, "use_muon": True}], lr=0.1)
    opts = [Muon([{"params": [p], "use_muon": True}], lr=0.1) for p in apart]
    for _ in range(3):
        for p, q in zip(together, apart):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, apart):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    x = torch.randn(4, 10, 6)
    torch.testing.assert_close(newton_schulz(x), torch.stack([newton_schulz(m) for m in x]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", [
    dict(name="tiny", position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),  # Llama-like: GQA, gate/up
    dict(name="bert-base", n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context_length=64),
    dict(name="transformer-base", n_layer=2, n_encoder_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context_length=64),
])
def test_muon_covers_every_architecture(arch):
    arch = dict(arch)
    model = Transformer(preset(arch.pop("name"), vocab_size=100, **arch))
    opt = build_optimizer(model, TrainConfig(optim="muon"), torch.device("cpu"))
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    for g in opt.param_groups:
        if g["use_muon"] and g["rows"]:
            assert all(sum(g["rows"]) == p.size(0) for p in g["params"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("field,value,message", [
    ("eval_batches", 0, "train.eval_batches must be >= 1"), ("threads", -2, "train.threads must be >= 1"),
    ("seed", -1, r"train.seed must be in \[0, 2\*\*63\)"), ("seed", 2**64, "train.seed must be in"),
    ("beta1", 1.5, r"train.beta1 and train.beta2 must be in \[0, 1\)"), ("beta2", -0.1, "train.beta2 must be in"),
])
def test_train_config_refuses_out_of_range_values_in_one_line(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})


def test_cuda_graph_compile_modes_refuse_gradient_accumulation(data_dir, tmp_path, monkeypatch):
    """reduce-overhead replays CUDA graphs, whose gradient outputs the next micro-batch overwrites:
    refused before any step (the check runs where CUDA graphs would be replayed; faked here on CPU)."""
    import lmforge.train.loop as loop
    from lmforge.train import pretrain

    monkeypatch.setattr(loop, "replays_cuda_graphs", lambda mode, device: True)
    cfg = tiny_train_config(max_steps=2, grad_accum=2, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(UserError, match="cannot accumulate gradients over 2 micro-batches; use --train.grad_accum 1"):
        pretrain(data_dir, tmp_path / "run", "tiny", cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "step-000002").exists()


def test_muon_state_loads_through_the_full_state_dict_path(tmp_path):
    """A one-process Muon checkpoint resumes under torchrun through `set_optimizer_state_dict(full_state_dict=True)`,
    whose flattening drops empty lists: the whole-matrix group's `rows: []` came back without its key (KeyError)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from lmforge.train.optim import build_optimizer

    def built():
        torch.manual_seed(0)
        model = Transformer(preset("tiny", vocab_size=64))
        return model, build_optimizer(model, tiny_train_config(optim="muon"), torch.device("cpu"))

    model, optimizer = built()
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    names = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer.state_dict()
    order = [p for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {names[id(order[i])]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[id(order[i])] for i in g["params"]]} for g in saved["param_groups"]]}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model2, optimizer2 = built()
        set_optimizer_state_dict(model2, optimizer2, by_name, options=StateDictOptions(full_state_dict=True))
        params2 = dict(model2.named_parameters())
        for name, p in model.named_parameters():  # the moments came back, each on its parameter
            for key, value in optimizer.state[p].items():
                torch.testing.assert_close(optimizer2.state[params2[name]][key], value, rtol=0, atol=0)
        model2(torch.randint(0, 64, (2, 8))).sum().backward()
        optimizer2.step()  # KeyError: 'rows' before the fix
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch,fused", [
    (dict(name="tiny", mlp="swiglu", bias=False), "layers.1.feed_forward.fc.weight"),  # [gate; up], each 256 x 64
    (dict(name="transformer-base", n_layer=1, n_encoder_layer=1, n_embd=64, n_head=4, mlp_hidden=128, context_length=64),
     "layers.0.cross_attention.kv.weight"),  # [k; v], each 64 x 64
])
def test_muon_steps_the_halves_of_a_fused_weight_as_two_matrices(arch, fused):
    """SwiGLU's fc = [gate; up] and a cross-attention's kv = [k; v] are two matrices each: a model's
    first Muon step moves each half by muon_lr times its own orthogonalised gradient (scaled by its
    own max(1, rows / cols)^0.5), not by one orthogonalisation of the whole fused weight."""
    arch = dict(arch)
    torch.manual_seed(0)
    model = Transformer(preset(arch.pop("name"), vocab_size=100, **arch))
    cfg = TrainConfig(optim="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.9)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    p = dict(model.named_parameters())[fused]
    before, g = p.detach().clone(), p.grad.clone()
    opt.step()
    half = g.size(0) // 2
    halves = [naive_muon_updates([part], 0.9)[0] for part in (g[:half], g[half:])]
    torch.testing.assert_close((before - p.detach()).double() / 0.02, torch.cat(halves), atol=1e-4, rtol=0)
