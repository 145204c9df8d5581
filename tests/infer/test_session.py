"""`load(CKPT)` and `LanguageModel.stream`: text in, text out."""

import numpy as np
import pytest
import torch

from lmforge.infer import load
from lmforge.utils.errors import UserError


def test_a_prompt_that_is_not_utf8_is_one_line(trained_run):
    """`--prompt $'caf\\xe9'` arrives as "caf\\udce9": seen in review as a TypeError from the tokenizer."""
    lm = load(trained_run.out, device="cpu")
    with pytest.raises(UserError, match=r"the prompt is not valid UTF-8 text \(byte 0xe9 at character 4\)"):
        lm.generate("caf\udce9", 3)
    assert isinstance(lm.generate("café", 3, temperature=0), str)


@pytest.mark.parametrize("device", ["cpu:7", "meta", "mps", "tpu", "cuda:-1", " cpu"])
def test_a_device_lmforge_cannot_run_on_is_refused_before_the_checkpoint_is_read(trained_run, device):
    """Seen in review: cpu:7 and meta passed torch.device and were blamed on the checkpoint
    ("model.safetensors is corrupt (device cpu:7 is invalid)")."""
    with pytest.raises(UserError, match=rf"unknown device '{device}'; use auto, cpu, cuda or cuda:N"):
        load(trained_run.out, device=device)


def test_cpu_0_is_the_cpu(trained_run):
    assert load(trained_run.out, device="cpu:0").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_machines_gpus_is_one_line(trained_run):
    import torch

    count = torch.cuda.device_count()
    with pytest.raises(UserError, match=rf"'cuda:{count}' asked for but this machine has {count} CUDA device"):
        load(trained_run.out, device=f"cuda:{count}")
    assert load(trained_run.out, device=f"cuda:{count - 1}").device.type == "cuda"


def test_prompt_ids_outside_the_vocabulary_are_one_line(trained_run):
    """Seen in review: `lm.stream([99999])` raised a bare IndexError from the embedding."""
    lm = load(trained_run.out, device="cpu")
    for bad in (lm.model.config.vocab_size, -1):
        with pytest.raises(UserError, match=rf"^the prompt holds token id {bad}, outside the model's vocabulary of "
                                            rf"{lm.model.config.vocab_size}$"):
            lm.generate([1, bad], 2)


def test_an_encoder_decoder_source_longer_than_the_context_is_one_line(trained_run):
    """Seen in review: the source was cut to the context without a word, as no decoder prompt is."""
    from lmforge.config import preset
    from lmforge.infer.session import LanguageModel
    from lmforge.model import Transformer

    tok = load(trained_run.out, device="cpu").tokenizer
    lm = LanguageModel(Transformer(preset("tiny", arch="encoder-decoder", vocab_size=tok.vocab_size, context_length=16)),
                       tok, trained_run.out)
    assert isinstance(lm.generate(list(range(5, 20)), 2, temperature=0), str)  # 15 tokens and the end of text: fits
    with pytest.raises(UserError, match=r"^the source is 16 tokens, longer than the 15 the model's context of 16 leaves; "
                                        r"shorten it$"):
        lm.generate(list(range(5, 21)), 2)


@pytest.mark.parametrize("args, kwargs, message", [
    ((["a", "b"],), {}, "the prompt must be a text or a sequence of token ids, not list holding str"),
    ((None,), {}, "the prompt must be a text or a sequence of token ids, not NoneType"),
    (("hi", 5.0), {}, "max_new_tokens must be a whole number >= 0, got 5.0"),
    (("hi", 5), {"temperature": None}, "sampling.temperature is None; it must be float"),
    (("hi", 5), {"top_k": 5.5}, "sampling.top_k is 5.5; it must be int"),
    (("hi", 5), {"seed": True}, "sampling.seed is True; it must be int | None"),
])
def test_arguments_of_the_wrong_type_are_one_line(trained_run, args, kwargs, message):
    """Seen in review: TypeErrors from deep inside, a torch RuntimeError for seed=True, top_k=5.5 taken."""
    lm = load(trained_run.out, device="cpu")
    with pytest.raises(UserError, match=message):
        lm.generate(*args, **kwargs)
    ids = lm.generate([1, 2], 2, temperature=0)  # ids as a list, tuple, numpy array or tensor, of any integer type
    assert ids == lm.generate((1, 2), 2, temperature=0) == lm.generate(np.array([1, 2]), 2, temperature=0)
    assert ids == lm.generate(torch.tensor([1, 2]), 2, temperature=0) == lm.generate([np.int64(1), 2], 2, temperature=0)


def test_generation_stops_at_the_end_of_text_unless_told_not_to(trained_run):
    from lmforge.config import preset
    from lmforge.infer.session import LanguageModel
    from lmforge.model import Transformer

    tok = load(trained_run.out, device="cpu").tokenizer
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.weight[tok.eot_id] = 1.0  # the end-of-text token has the highest logit, always
    lm = LanguageModel(model, tok, trained_run.out)
    assert lm.generate("ROMEO:", 3, temperature=0) == ""
    assert lm.generate("ROMEO:", 3, temperature=0, stop_at_eot=False) == tok.decode([tok.eot_id] * 3)


def test_a_bool_is_not_a_token_id_and_dtype_reaches_the_weights(trained_run):
    lm = load(trained_run.out, device="cpu", dtype="bfloat16")
    assert lm.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert load(trained_run.out, device="cpu").model.tok_embeddings.weight.dtype == torch.float32
    with pytest.raises(UserError, match="^the prompt must be a text or a sequence of token ids, not list holding bool$"):
        lm.generate([1, True], 2)


def test_generate_asks_for_100_tokens_unless_told(trained_run, monkeypatch):
    lm = load(trained_run.out, device="cpu")
    asked = []
    monkeypatch.setattr(lm, "stream", lambda prompt, max_new_tokens, **kw: asked.append((prompt, max_new_tokens, kw)) or iter("ab"))
    assert lm.generate("hi") == "ab" and lm.generate("hi", 7, seed=1) == "ab"
    assert asked == [("hi", 100, {}), ("hi", 7, {"seed": 1})]


def test_an_encoder_decoder_encodes_the_source_with_its_end_of_text(trained_run, monkeypatch):
    from lmforge.config import preset
    from lmforge.infer.session import LanguageModel
    from lmforge.model import Transformer

    tok = load(trained_run.out, device="cpu").tokenizer
    model = Transformer(preset("tiny", arch="encoder-decoder", vocab_size=tok.vocab_size)).eval()
    sources, encode = [], model.encode_source
    monkeypatch.setattr(model, "encode_source", lambda src, *a, **kw: sources.append(src.tolist()) or encode(src, *a, **kw))
    LanguageModel(model, tok, trained_run.out).generate([5, 6, 7], 2, temperature=0)
    assert sources == [[[5, 6, 7, tok.eot_id]]]
