"""Raw text is split into words the way the tagging corpora (CoNLL, WNUT-17) write them; the pipeline
tags, answers and generates from what its model outputs."""

import importlib

import pytest
import torch

from lmforge.config import preset
from lmforge.data.features import TaskFormat
from lmforge.infer.pipeline import Pipeline, _valid_iob2, split_words
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


def test_split_words_follows_the_corpora_and_keeps_offsets():
    text = "I don't know John's @Suzie55 #NFL: 30,000 fans, 3.5 http://bit.ly/bgCyZ0 state-of-the-art!"
    spans = split_words(text)
    assert [text[a:b] for a, b in spans] == [
        "I", "do", "n't", "know", "John", "'s", "@Suzie55", "#NFL", ":", "30,000", "fans", ",", "3.5",
        "http://bit.ly/bgCyZ0", "state-of-the-art", "!",
    ]
    assert all(text[a:b].strip() == text[a:b] and a < b for a, b in spans)
    assert split_words("  ") == []


# ---------------------------------------------------------------- the pipeline on tiny random models

TEMPLATE = (
    "{% for m in messages %}<|cls|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|cls|>assistant\n{% endif %}"
)


def _pipe(tokenizer_dir, task, head="none", labels=None, bias=None, max_length=None, **options):
    """A `task` pipeline on a random tiny decoder (context 64); `bias` fixes the head's output at every token."""
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    tok.chat_template = TEMPLATE
    model = Transformer(preset("tiny").replace(vocab_size=tok.vocab_size, task_head=head, labels=labels)).eval()
    if bias is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor(bias))
    fmt = TaskFormat(tok, "decoder", max_length or model.config.context_length)
    kwargs = {"batch_size": 2, "max_new_tokens": 4, "max_answer_length": 30, "doc_stride": 16, **options}
    return Pipeline(task, model, tok, fmt, **kwargs)


def test_an_i_tag_that_continues_no_entity_of_its_type_starts_one():
    assert _valid_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-PER", "I-LOC", "I-LOC"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-PER", "B-LOC", "I-LOC"]


def test_tagging_tags_every_word_from_its_first_token_and_cut_off_words_as_o(tokenizer_dir):
    pipe = _pipe(tokenizer_dir, "tag", "tag", ["O", "B-PER", "I-PER"], bias=[0.0, 0.0, 5.0])  # I-PER everywhere
    text = "Ann met Bob."
    out = pipe(text)
    assert out["words"] == ["Ann", "met", "Bob", "."]
    assert out["tags"] == ["B-PER", "I-PER", "I-PER", "I-PER"]  # the decoder's first word is its first token
    assert out["entities"] == [{"type": "PER", "text": text, "first_word": 0, "last_word": 3, "start": 0, "end": len(text)}]
    assert pipe([["Ann", "met"]])[0]["entities"] == [{"type": "PER", "text": "Ann met", "first_word": 0, "last_word": 1}]
    short = _pipe(tokenizer_dir, "tag", "tag", ["O", "B-PER", "I-PER"], bias=[0.0, 0.0, 5.0], max_length=8)
    words = ["a"] * 10  # one token each: 7 fit before the end-of-text token
    assert short([words])[0]["tags"] == ["B-PER"] + ["I-PER"] * 6 + ["O"] * 3


def _seen_prompts(monkeypatch):
    """The prompts the pipeline's engine is given, as token ids."""
    module = importlib.import_module("lmforge.infer.pipeline")  # `lmforge.infer.pipeline` is also the function
    seen = []

    class Recording(module.Engine):
        def generate(self, prompts, params=None):
            seen.extend(list(p) for p in prompts)
            return super().generate(prompts, params)

    monkeypatch.setattr(module, "Engine", Recording)
    return seen


def test_a_conversation_longer_than_the_context_keeps_its_end(tokenizer_dir, monkeypatch):
    pipe = _pipe(tokenizer_dir, "sft")
    seen = _seen_prompts(monkeypatch)
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "ROMEO:"}]
    ids = pipe.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert len(ids) > 60
    reply = pipe(messages)
    assert seen == [ids[-60:]]  # the context (64) less max_new_tokens (4): the latest turn and the reply's opening
    assert isinstance(reply, str) and reply == reply.strip()
    assert pipe("ROMEO:") == pipe([{"role": "user", "content": "ROMEO:"}])  # a text is one user message


def test_max_new_tokens_must_leave_room_for_the_input(tokenizer_dir):
    with pytest.raises(UserError, match=r"^--max-new-tokens 64 leaves no room for the input in the model's context of 64;"):
        _pipe(tokenizer_dir, "sft", max_new_tokens=64)("hi")
    assert isinstance(_pipe(tokenizer_dir, "sft", max_new_tokens=63)("hi"), str)  # one token of input fits


@pytest.mark.parametrize("option, message", [
    ({"max_answer_length": 0}, "num_beams, batch_size and max_answer_length must be >= 1, got 1, 32, 0"),
    ({"num_beams": 0}, "num_beams, batch_size and max_answer_length must be >= 1, got 0, 32, 30"),
    ({"batch_size": 0}, "num_beams, batch_size and max_answer_length must be >= 1, got 1, 0, 30"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0; it is the length of the longest generated output"),
])
def test_options_out_of_range_are_refused_before_the_checkpoint_is_read(tmp_path, option, message):
    from lmforge.infer import pipeline

    with pytest.raises(UserError, match=f"^{message}"):
        pipeline("qa", tmp_path / "missing", device="cpu", **option)


def test_qa_slides_its_windows_by_the_fine_tunes_doc_stride(tokenizer_dir):
    pipe = _pipe(tokenizer_dir, "qa", "span", doc_stride=16)
    strides, qa = [], pipe.format.qa
    pipe.format.qa = lambda question, context, stride=None: strides.append(stride) or qa(question, context, stride=stride)
    context = "Denver Broncos won the game. " * 20  # longer than a window: several of them
    answer = pipe(question="Who won?", context=context)
    assert strides == [16] and context[answer["start"]:answer["end"]] == answer["answer"] and answer["score"] is not None
