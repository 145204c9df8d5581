"""A model whose generation config names several end ids (Llama 3 Instruct ends a text at <|end_of_text|>,
a turn at <|eot_id|>) stops at each of them in every generator, as transformers' `generate` and vLLM do."""

import json
import shutil

import pytest

from lmforge.infer import Engine, SamplingParams, beam_search, load
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError

PROMPT = "First Citizen:\nWe are"  # the tiny model's greedy reply to it is not one token repeated


@pytest.fixture(scope="module")
def plain(trained_run):
    return load(trained_run.out, device="cpu")


@pytest.fixture(scope="module")
def greedy(plain):
    """The greedy continuation past the end-of-text token, and the first step k >= 1 whose token is new."""
    tok = plain.tokenizer
    [req] = Engine(plain.model, tok).generate([tok.encode(PROMPT)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    ids = req.output
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k] and ids[k] != tok.eot_id)
    return ids, k


@pytest.fixture
def ended(trained_run, greedy, tmp_path):
    """The trained checkpoint with a generation_config.json naming the greedy output's k-th token as an end."""
    ids, k = greedy
    ckpt = shutil.copytree(trained_run.checkpoint, tmp_path / "ckpt")
    eot = load(ckpt).tokenizer.eot_id
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, ids[k]], "temperature": 0.7}))
    return load(ckpt, device="cpu")


def test_every_generator_stops_at_each_end_id(ended, greedy):
    ids, k = greedy
    tok = ended.tokenizer
    assert tok.end_ids == (tok.eot_id, ids[k])
    [req] = Engine(ended.model, tok).generate([tok.encode(PROMPT)], SamplingParams(temperature=0, max_tokens=16))
    assert req.output == ids[: k + 1] and req.finish_reason == "stop" and req.text == tok.decode(ids[:k])
    assert ended.generate(PROMPT, 16, temperature=0) == tok.decode(ids[:k])
    [best] = beam_search(ended.model, tok.encode(PROMPT), 1, 16, eos_id=tok.end_ids)
    assert best.tokens == ids[: k + 1]
    [req] = Engine(ended.model, tok).generate([tok.encode(PROMPT)],
                                              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert req.output == ids  # ignore_eos ignores them all


def test_the_end_ids_are_saved_with_the_tokenizer_and_keep_other_settings(ended, tmp_path):
    """Saved into generation_config.json, as a fine-tuned or merged checkpoint of the model saves its tokenizer."""
    out = tmp_path / "saved"
    out.mkdir()
    (out / "generation_config.json").write_text(json.dumps({"top_p": 0.9}))
    ended.tokenizer.save(out)
    assert json.loads((out / "generation_config.json").read_text()) == {"top_p": 0.9, "eos_token_id": list(ended.tokenizer.end_ids)}
    assert Tokenizer.load(out).end_ids == ended.tokenizer.end_ids
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    Tokenizer.load(out).save(plain_dir)  # still two: written again
    Tokenizer(Tokenizer.load(out).hf).save(tmp_path)  # one end id: no file
    assert not (tmp_path / "generation_config.json").exists()


@pytest.mark.parametrize("text, message", [
    ('{"eos_token_id": "2"}', "eos_token_id '2' is not an id or a list of ids"),
    ('{"eos_token_id": [2, true]}', "is not an id or a list of ids"),
    ('[2]', "not a JSON object"),
    ("{oops", "is corrupt"),
])
def test_a_bad_generation_config_is_one_line(trained_run, tmp_path, text, message):
    ckpt = shutil.copytree(trained_run.checkpoint, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load(ckpt)
    assert "\n" not in str(err.value)


def test_a_null_single_or_foreign_eos_token_id_adds_nothing(trained_run, tmp_path):
    ckpt = shutil.copytree(trained_run.checkpoint, tmp_path / "ckpt")
    for value in (None, 0, [99999]):  # an id past the vocabulary (transformers saves GPT-2's 50256 for any tokenizer)
        (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        tok = load(ckpt).tokenizer
        assert tok.end_ids == tuple(dict.fromkeys((tok.eot_id, *([] if value in (None, [99999]) else [value]))))


def test_end_ids_keep_the_last_id_of_the_vocabulary_and_drop_the_one_past_it(tmp_path):
    """An id is in the vocabulary exactly when 0 <= id < vocab_size: vocab_size itself names no token."""
    import tokenizers

    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "c": 2}, merges=[]))
    hf.add_special_tokens(["<|endoftext|>", "<|eot_id|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 4, -1]}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.vocab_size, tok.eot_id) == (5, 3)
    assert tok.end_ids == (3, 4)
