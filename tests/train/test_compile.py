"""The trainer compiles each objective's loss, model and head together, as one graph without breaks."""

import pytest
import torch

from conftest import tiny_train_config
from lmforge.config import preset
from lmforge.config.presets import SPEEDRUN
from lmforge.finetune.objective import TaskObjective
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import pretrain
from lmforge.train.objectives import Objective

LLAMA_GQA = dict(position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)


def graph_breaks(loss, net, batch) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(net, batch)
    return explained.graph_count, explained.graph_break_count


@pytest.mark.parametrize("shape", [{}, SPEEDRUN, LLAMA_GQA], ids=["gpt2", "speedrun", "llama-gqa"])
@pytest.mark.parametrize("chunked", [0, 50])
def test_the_causal_loss_is_one_graph(data_dir, shape, chunked):
    tokenizer = Tokenizer.load(data_dir)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, **shape)
    task = Objective("causal", cfg, tokenizer, seed=0, chunked_loss=chunked)
    batch = task.batch(task.open(str(data_dir), "train", 32), 2, step=0)
    assert graph_breaks(task.loss, Transformer(cfg).train(), batch) == (1, 0)


@pytest.mark.parametrize("kind", ["classify", "tag", "qa"])
def test_the_heads_of_fine_tuning_compile_with_their_model(kind):
    head = {"classify": "classify", "tag": "tag", "qa": "span"}[kind]
    cfg = preset("tiny", vocab_size=100, task_head=head, labels=None if kind == "qa" else ["a", "b", "c"])
    net = Transformer(cfg).train()
    B, T = 2, 16
    batch = {"input_ids": torch.randint(1, 100, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long)}
    batch["attention_mask"][0, 12:] = 0
    if kind == "classify":
        batch["labels"] = torch.tensor([0, 2])
    elif kind == "tag":
        batch["labels"] = torch.randint(0, 3, (B, T))
    else:
        batch["start_positions"], batch["end_positions"] = torch.tensor([1, 3]), torch.tensor([2, 5])
    task = TaskObjective(kind, "decoder", pad_id=0, seed=0)
    assert graph_breaks(task.loss, net, batch) == (1, 0)


def test_compiled_training_matches_eager(data_dir, tmp_path):
    """`--train.compile true` on CPU: the same losses as eager (fp32, up to the compiler's reordering)."""
    cfg = tiny_train_config(max_steps=4, eval_interval=4, eval_batches=2, ckpt_interval=0, log_interval=1)
    eager = pretrain(data_dir, tmp_path / "eager", "tiny", cfg, progress=False, log=lambda *a: None)
    compiled = pretrain(data_dir, tmp_path / "compiled", "tiny", cfg.replace(compile=True), progress=False, log=lambda *a: None)
    assert compiled.train_loss == pytest.approx(eager.train_loss, abs=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-4)
