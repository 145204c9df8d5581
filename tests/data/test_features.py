import pytest

from lmforge.data.features import TaskFormat, collate, featurize, read_examples, sample_batch
from lmforge.model.losses import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_each_word_label_sits_on_the_first_token_of_that_word(tok, arch):
    fmt = TaskFormat(tok, arch, max_length=64)
    words = ["Hark", "!", "ROMEO", "speaks", "of", "Verona's", "walls"]
    f, first = fmt.tag(words, labels=list(range(len(words))))
    ids = f["input_ids"]
    assert (ids[0] == fmt.cls_id and ids[-1] == fmt.sep_id) if arch == "encoder" else ids[-1] == tok.eot_id
    for w, t in enumerate(first):
        # Reference by decoding: the first token's text, stripped of the joining space, starts the word.
        assert words[w].startswith(tok.decode([ids[t]]).lstrip(" ")), (w, tok.decode([ids[t]]))
        assert f["labels"][t] == w
    assert sum(lab != IGNORE_INDEX for lab in f["labels"]) == len(words)


def test_words_cut_by_max_length_get_no_label(tok):
    f, first = TaskFormat(tok, "decoder", max_length=8).tag(["word"] * 20, labels=[1] * 20)
    assert len(f["input_ids"]) == 8 and first[-1] == -1 and first[0] == 0


def test_qa_windows_cover_a_long_context_and_mark_the_answer_where_it_lies(tok):
    context = " ".join(f"line {i} of the play." for i in range(60)) + " The answer is Verona itself."
    start = context.index("Verona")
    windows = TaskFormat(tok, "decoder", max_length=48).qa("Where?", context, ("Verona", start), stride=16)
    assert len(windows) > 3
    seen = set()
    for w in windows:
        seen.update(o for o in w.offsets if o is not None)
        f = w.feature
        if f["start_positions"]:
            s, e = w.offsets[f["start_positions"]][0], w.offsets[f["end_positions"]][1]
            assert context[s:e].strip() == "Verona"
    assert any(w.feature["start_positions"] for w in windows)
    assert not windows[0].feature["start_positions"]
    ids, offsets = tok.encode_with_offsets(context)
    assert seen == set(offsets)  # every context token is in some window
    for a, b in zip(windows, windows[1:]):  # each window starts `stride` context tokens before the last one ends
        shared = {o for o in a.offsets if o is not None} & {o for o in b.offsets if o is not None}
        assert len(shared) == 16


def test_decoder_seq2seq_trains_only_on_the_target(tok):
    fmt = TaskFormat(tok, "decoder", max_length=64, prompt="Summary of {source}:")
    f = fmt.seq2seq("the long text", "short")
    target = tok.encode("short") + [tok.eot_id]
    assert [t for t in f["labels"] if t != IGNORE_INDEX] == target
    assert f["labels"][-1] == tok.eot_id and len(f["labels"]) == len(f["input_ids"])
    assert tok.decode(f["input_ids"]).startswith("Summary of the long text:")


def test_chat_trains_on_assistant_turns_only(tok):
    tok.chat_template = CHATML
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Good morrow"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Farewell"}]
    f = TaskFormat(tok, "decoder", max_length=128).chat(msgs)
    trained = tok.decode([t for t in f["labels"] if t != IGNORE_INDEX])
    assert "Good morrow" in trained and "Farewell" in trained
    assert "Hi there" not in trained and "Again" not in trained and "user" not in trained



def test_chat_reads_a_spelled_special_token_as_text_as_serving_does(tok):
    """Training must see what `encode_chat` feeds the model when it is served: a special token's text
    inside a message is text there, so it is text here too, and the loss covers the reply's pieces."""
    tok.chat_template = CHATML
    msgs = [{"role": "user", "content": "Say <|endoftext|> please"}, {"role": "assistant", "content": "Fine<|endoftext|>done"}]
    f = TaskFormat(tok, "decoder", max_length=128).chat(msgs)
    ids = tok.encode_chat(msgs, add_generation_prompt=False)
    assert f["input_ids"] == ids[:-1] and tok.eot_id not in ids
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    trained = tok.decode([t for t in f["labels"] if t != IGNORE_INDEX])
    assert trained.startswith("Fine<|endoftext|>done") and "please" not in trained

# SmolLM2-Instruct's template (a default system prompt on loop.first), its reply marked for
# transformers' assistant mask as the templates that support it mark theirs.
SMOL_GENERATION = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_trains_the_tokens_of_transformers_assistant_mask(tok):
    """The reply and its <|im_end|>, not the newline the template puts after it; a conversation that
    opens with the assistant's greeting too (its empty prefix renders no default system prompt)."""
    from transformers import PreTrainedTokenizerFast

    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    ours = Tokenizer(tok.hf, chat_template=SMOL_GENERATION)
    theirs = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>")
    theirs.chat_template = SMOL_GENERATION
    greeting, hi, yes = ({"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yes"})
    for msgs in ([hi, yes], [greeting, hi, yes], [{"role": "system", "content": "Be brief."}, hi, greeting, hi, yes]):
        want = theirs.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        f = TaskFormat(ours, "decoder", max_length=128).chat(msgs)
        assert f["input_ids"] == want["input_ids"][:-1]
        assert f["labels"] == [t if m else IGNORE_INDEX for t, m in zip(want["input_ids"][1:], want["assistant_masks"][1:])]


def test_chat_finds_a_first_reply_under_a_template_that_reads_messages_0_and_names_the_line_it_cannot(tok, tmp_path):
    """Llama 3's templates read messages[0], which an empty conversation does not have: the first
    reply is found where the template puts its text. Where the template changes the text too, the
    first reply cannot be found: the error names the line."""
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}system: be kind\n{% endif %}{% for m in messages %}"
                         "{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]}\n'
                    '{"messages": [{"role": "assistant", "content": "Welcome"}, {"role": "user", "content": "Hi"},'
                    ' {"role": "assistant", "content": "Yes"}]}\n')
    f = featurize(TaskFormat(tok, "decoder", max_length=64), "sft", read_examples("sft", data))[1]
    assert tok.decode([t for t in f["labels"] if t != IGNORE_INDEX]) == "Welcome<|endoftext|>Yes<|endoftext|>"
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(UserError, match=rf"^{data}:2: the chat template neither renders"):
        featurize(TaskFormat(tok, "decoder", max_length=64), "sft", read_examples("sft", data))


def test_collate_pads_right_and_batches_are_a_function_of_the_step(tok):
    fmt = TaskFormat(tok, "decoder", max_length=32)
    feats = [fmt.classify(t, i % 2) for i, t in enumerate(["a", "a longer text here", "mid text"])]
    b = collate(feats, pad_id=1)
    assert b["input_ids"].shape == b["attention_mask"].shape and b["labels"].tolist() == [0, 1, 0]
    assert b["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in feats]
    one, two = sample_batch(feats, 4, 7, 3, 0, 1), sample_batch(feats, 4, 7, 3, 0, 1)
    assert all((one[k] == two[k]).all() for k in one)


def test_collate_pads_labels_with_the_ignore_index_not_the_pad_token():
    """Padded label positions must add nothing to the loss: IGNORE_INDEX, not a token id the model would learn."""
    b = collate([{"input_ids": [5, 6, 7], "labels": [6, 7, 8], "token_type_ids": [0, 1, 1]},
                 {"input_ids": [5], "labels": [6], "token_type_ids": [1]}], pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 3, 3]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["token_type_ids"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_bad_prompt_is_one_line(tok):
    with pytest.raises(UserError, match="placeholder"):
        TaskFormat(tok, "decoder", 64, prompt="no slot")


def test_qa_stride_larger_than_the_window_still_advances_by_half_a_window(tok):
    context = " ".join(["word"] * 400)
    windows = TaskFormat(tok, "decoder", max_length=40).qa("Q?", context, stride=128)
    ids = tok.encode(context)
    assert len(windows) <= 2 * len(ids) // 30 + 2  # not one window per token


def test_repeated_tag_input_labels_the_second_copy(tok):
    words = ["Hark", "!", "ROMEO", "speaks", "of", "Verona's", "walls"]
    plain, first_plain = TaskFormat(tok, "decoder", max_length=64).tag(words, labels=list(range(len(words))))
    f, first = TaskFormat(tok, "decoder", max_length=64, repeat=True).tag(words, labels=list(range(len(words))))
    x = plain["input_ids"][:-1]  # the text without its <eot>
    assert f["input_ids"] == [*x, tok.eot_id, *x, tok.eot_id]
    assert first == [t + len(x) + 1 for t in first_plain]
    assert [lab for lab in f["labels"] if lab != IGNORE_INDEX] == list(range(len(words)))
    # Truncation leaves room for both copies.
    long, first_long = TaskFormat(tok, "decoder", max_length=9, repeat=True).tag(["word"] * 20, labels=[1] * 20)
    assert len(long["input_ids"]) <= 9 and first_long[0] == 4 and first_long[-1] == -1


def test_repeated_qa_windows_mark_the_answer_in_the_second_copy(tok):
    context = " ".join(f"line {i} of the play." for i in range(60)) + " The answer is Verona itself."
    start = context.index("Verona")
    windows = TaskFormat(tok, "decoder", max_length=48, repeat=True).qa("Where?", context, ("Verona", start), stride=16)
    found = 0
    for w in windows:
        ids = w.feature["input_ids"]
        assert len(ids) <= 48 and len(ids) % 2 == 1
        half = len(ids) // 2
        assert ids[:half] == ids[half + 1 :] and ids[half] == tok.eot_id  # head window <eot> head window
        assert all(o is None for o in w.offsets[: half + 1 + len(tok.encode("Where?")) + 1])
        if w.feature["start_positions"]:
            found += 1
            assert w.feature["start_positions"] > half
            s, e = w.offsets[w.feature["start_positions"]][0], w.offsets[w.feature["end_positions"]][1]
            assert context[s:e].strip() == "Verona"
    assert found >= 1


def test_repeat_is_for_decoders(tok):
    with pytest.raises(UserError, match="for decoders"):
        TaskFormat(tok, "encoder", 64, repeat=True)


@pytest.mark.parametrize("fraction", [0, 0.0, 1, -0.5])
def test_split_articles_must_be_a_fraction_strictly_between_0_and_1(tmp_path, fraction):
    with pytest.raises(UserError, match=rf"--split-articles {fraction} is out of range"):
        read_examples("qa", tmp_path / "squad.json", split_articles=fraction)


def test_unlabelled_seq2seq_and_chat_for_predicting(tmp_path):
    (tmp_path / "src.en").write_text("A man rides a horse.\nTwo dogs play.\n")
    examples = read_examples("seq2seq", tmp_path / "src.en", require_labels=False)
    assert [(e.source, e.target) for e in examples] == [("A man rides a horse.", None), ("Two dogs play.", None)]
    with pytest.raises(UserError, match="--target"):
        read_examples("seq2seq", tmp_path / "src.en")
    (tmp_path / "c.jsonl").write_text('[{"role": "user", "content": "Hi"}]\n')
    assert read_examples("sft", tmp_path / "c.jsonl", require_labels=False)[0].messages == [{"role": "user", "content": "Hi"}]
    with pytest.raises(UserError, match="no assistant"):
        read_examples("sft", tmp_path / "c.jsonl")


@pytest.mark.parametrize(
    "task, options, complaint",
    [
        ("classify", {"labels": ["0", "0", "1"]}, "--labels names '0' more than once"),
        ("tag", {"labels": ["O", "B-PER", "O"]}, "--labels names 'O' more than once"),
        ("qa", {"labels": ["0", "1"]}, "--labels .* not qa"),
        ("seq2seq", {"labels": ["0", "1"]}, "--labels .* not seq2seq"),
        ("tag", {"text_field": "words"}, "--text-field .* tag data has none"),
        ("tag", {"label_field": "ner"}, "--label-field .* tag data has none"),
        ("qa", {"text_field": "context"}, "--text-field .* qa data has none"),
        ("sft", {"label_field": "reply"}, "--label-field .* sft data has none"),
        ("seq2seq", {"target": "t.txt", "text_field": "en"}, "line-aligned --data SOURCES --target TARGETS files have none"),
    ],
)
def test_options_a_task_would_ignore_are_refused(tmp_path, task, options, complaint):
    with pytest.raises(UserError, match=complaint):
        read_examples(task, tmp_path / "data", **options)
