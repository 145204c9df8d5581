"""Task examples to model inputs: the token layouts fine-tuning trains on and inference reuses.

One `TaskFormat` per (tokenizer, architecture) decides the layout, so that a pipeline formats a
raw input exactly as its fine-tune did:

    encoder (BERT)   classify/tag:  [CLS] text [SEP]            qa: [CLS] question [SEP] context [SEP]
    decoder (GPT)    classify/tag:  text <eot>                  qa: question <eot> context
                     seq2seq:       prompt(source) target <eot>     (loss on target <eot> only)
                     chat:          the chat template's text        (loss on assistant turns only)
    encoder-decoder  seq2seq:       source <eot>  ->  <start> target <eot>

A causal model sees only the left context at each token, which is what a tagger or a span
extractor most needs the right context for. `repeat=True` (decoders, tag and qa) lays the input
out twice and reads the second copy, whose every token has attended to the whole first copy
(Springer et al. 2024, "Repetition improves language model embeddings", arXiv:2402.15449):

    decoder, repeat  tag:  text <eot> text <eot>       qa: question <eot> context <eot> question <eot> context

Labels are aligned by character offsets, never by re-tokenising pieces: a word's label goes to
its first sub-word token (HF's convention; the others get IGNORE_INDEX), a QA answer's character
span becomes the first and last token that overlap it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import DEFAULT_DOC_STRIDE, DEFAULT_PROMPT
from lmforge.data.parallel import decoder_start_id, pair_layout
from lmforge.data.tasks import (
    read_chat, read_classification, read_parallel_text, read_squad, read_tagged, read_text2text, split_by_article,
)
from lmforge.model.losses import IGNORE_INDEX
from lmforge.tokenizer import ChatTemplateError, Tokenizer
from lmforge.utils.errors import UserError

Feature = dict[str, list[int] | int]


@dataclass
class QAWindow:
    """One window of a (question, context) pair over a long context (document stride)."""

    feature: Feature  # input_ids, token_type_ids, start_positions, end_positions
    offsets: list[tuple[int, int] | None]  # character span in the context of each token; None off the context


class TaskFormat:
    def __init__(self, tokenizer: Tokenizer, arch: str, max_length: int, prompt: str = DEFAULT_PROMPT,
                 repeat: bool = False) -> None:
        if max_length < 8:
            raise UserError(f"max_length {max_length} is too short for a task input; use at least 8 tokens")
        if "{source}" not in prompt:
            raise UserError(f"the prompt {prompt!r} has no {{source}} placeholder; e.g. --prompt 'Summarize: {{source}}\\n'")
        if repeat and arch != "decoder":
            raise UserError(f"repeating the input is for decoders, whose tokens see only their left; an {arch} sees both sides")
        self.tok, self.arch, self.max_length, self.prompt, self.repeat = tokenizer, arch, max_length, prompt, repeat
        self.encoder = arch == "encoder"
        # Imported BERT vocabularies name their markers [CLS]/[SEP]; lmforge's own <|cls|>/<|sep|>.
        self.cls_id = tokenizer.cls_id if tokenizer.cls_id is not None else tokenizer.hf.token_to_id("[CLS]")
        self.sep_id = tokenizer.sep_id if tokenizer.sep_id is not None else tokenizer.hf.token_to_id("[SEP]")
        if self.encoder and (self.cls_id is None or self.sep_id is None):
            raise UserError("the encoder's tokenizer has no [CLS]/[SEP] tokens; fine-tune an lmforge or BERT tokenizer")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id

    def _wrap(self, ids: list[int]) -> list[int]:
        if self.encoder:
            return [self.cls_id, *ids[: self.max_length - 2], self.sep_id]
        return [*ids[: self.max_length - 1], self.tok.eot_id]

    # -- sequence classification -------------------------------------------------------------
    def classify(self, text: str, label: int | None = None) -> Feature:
        f: Feature = {"input_ids": self._wrap(self.tok.encode(text))}
        if label is not None:
            f["labels"] = label
        return f

    # -- token classification ----------------------------------------------------------------
    def tag(self, words: list[str], labels: list[int] | None = None) -> tuple[Feature, list[int]]:
        """Words joined by spaces; label ids on each word's first token. Also returns the index
        of each word's first token (-1 for a word truncated away)."""
        text, starts = "", []
        for w in words:
            text += " " if text else ""
            starts.append(len(text))
            text += w
        ids, offsets = self.tok.encode_with_offsets(text)
        keep = self.max_length - 2 if self.encoder else (self.max_length - 2) // 2 if self.repeat else self.max_length - 1
        ids, offsets = ids[:keep], offsets[:keep]
        shift = 1 if self.encoder else 0  # the [CLS] in front
        if self.repeat:  # labels and predictions on the second copy
            shift = len(ids) + 1
            ids = [*ids, self.tok.eot_id, *ids]
        first, w = [-1] * len(words), 0
        for i, (_, end) in enumerate(offsets):
            while w + 1 < len(words) and starts[w + 1] < end:  # the token reaches into the next word
                w += 1
            if first[w] < 0 and end > starts[w]:
                first[w] = i + shift
        f: Feature = {"input_ids": self._wrap(ids)}
        if labels is not None:
            tok_labels = [IGNORE_INDEX] * len(f["input_ids"])
            for word, t in enumerate(first):
                if t >= 0:
                    tok_labels[t] = labels[word]
            f["labels"] = tok_labels
        return f, first

    # -- extractive question answering -------------------------------------------------------
    def qa(self, question: str, context: str, answer: tuple[str, int] | None = None, stride: int = 128,
           max_question: int = 64) -> list[QAWindow]:
        """Windows over the context that overlap by `stride` tokens; the answer's (start, end)
        token positions in each window, or (0, 0) when the window does not hold the answer."""
        q_ids = self.tok.encode(question)[:max_question]
        c_ids, c_off = self.tok.encode_with_offsets(context)
        head = [self.cls_id, *q_ids, self.sep_id] if self.encoder else [*q_ids, self.tok.eot_id]
        room = self.max_length - len(head) - (1 if self.encoder else 0)
        if self.repeat:  # head window <eot> head window
            room = (self.max_length - 2 * len(head) - 1) // 2
        if room < 4:
            raise UserError(f"a window of {self.max_length} tokens (the model's context, or --train.seq_len) leaves no room "
                            f"for the context after a {len(q_ids)}-token question; use a model with a longer context")
        step = room - min(stride, room // 2)  # overlap `stride` tokens, but always advance by half a window
        answer_tokens: list[int] = []
        if answer is not None:
            a0, a1 = answer[1], answer[1] + len(answer[0])
            answer_tokens = [i for i, (s, e) in enumerate(c_off) if s < a1 and e > a0]
        windows = []
        for lo in range(0, max(len(c_ids) - room, 0) + step, step):
            hi = min(lo + room, len(c_ids))
            tail = [self.sep_id] if self.encoder else []
            first_copy = [*head, *c_ids[lo:hi], self.tok.eot_id] if self.repeat else []
            ids = first_copy + head + c_ids[lo:hi] + tail
            before = len(first_copy) + len(head)  # the tokens before the context that is scored
            offsets: list[tuple[int, int] | None] = [None] * before + list(c_off[lo:hi]) + [None] * len(tail)
            start = end = 0  # "not in this window" points at the first token, as HF does with [CLS]
            if answer_tokens and lo <= answer_tokens[0] and answer_tokens[-1] < hi:
                start, end = answer_tokens[0] - lo + before, answer_tokens[-1] - lo + before
            feature = {"input_ids": ids, "token_type_ids": [0] * before + [1] * (len(ids) - before),
                       "start_positions": start, "end_positions": end}
            windows.append(QAWindow(feature, offsets))
            if hi == len(c_ids):
                break
        return windows

    # -- sequence to sequence ----------------------------------------------------------------
    def seq2seq(self, source: str, target: str | None = None) -> Feature:
        """Encoder-decoder: src / input_ids / labels; decoder-only: the prompt and the target in
        one sequence with the loss on the target. Without a target: the generation prompt."""
        eot = self.tok.eot_id
        if self.arch == "encoder-decoder":
            tgt_ids = self.tok.encode(target) if target is not None else []
            src, dec_in, labels = pair_layout(self.tok.encode(source), tgt_ids, self.max_length, eot, decoder_start_id(self.tok))
            return {"src": src, "input_ids": dec_in, "labels": labels} if target is not None else {"src": src}
        if target is None:
            return {"input_ids": self.prompt_ids(source, self.prompt_length)}
        tgt = [*self.tok.encode(target), eot][: self.max_length // 2]
        prompt = self.prompt_ids(source, self.max_length + 1 - len(tgt))
        seq = prompt + tgt
        return {"input_ids": seq[:-1], "labels": [IGNORE_INDEX] * (len(prompt) - 1) + tgt}

    @property
    def prompt_length(self) -> int:
        """A decoder-only generation prompt's tokens: half of max_length, the least training left a
        prompt (a target takes at most the other half)."""
        return self.max_length // 2

    def prompt_ids(self, source: str, budget: int) -> list[int]:
        """The decoder-only prompt in at most `budget` tokens: the source is cut, never the template."""
        before, after = self.prompt.split("{source}", 1)
        pre, post = self.tok.encode(before), self.tok.encode(after)
        room = max(budget - len(pre) - len(post), 1)
        return pre + self.tok.encode(source)[:room] + post

    # -- chat supervised fine-tuning -----------------------------------------------------------
    def chat(self, messages: list[dict[str, str]]) -> Feature:
        """The conversation through the chat template; the loss only on the assistant turns'
        tokens: the content and the template's end-of-turn marker after it, not the whitespace the
        template puts between turns (the tokens of transformers' assistant mask for a template that
        marks them with `{% generation %}`). A message that spells a special token trains on its
        text, as `encode_chat` reads it when the model is served.

        A turn starts where the template's generation prompt after the conversation before it ends
        (a growing prefix); where that does not hold, as for a first turn (a template may open an
        empty conversation otherwise: SmolLM2's adds its default system prompt only on `loop.first`),
        where the template puts the turn's content. It ends where the template's rendering of the
        conversation through it ends, less trailing whitespace."""
        text, ids, offsets = self.tok.encode_chat_with_offsets(messages, add_generation_prompt=False)
        spans, placed = [], None
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            through = self.tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            start = self._reply_start(messages[:i], through)
            if start is None:
                placed = self.tok.message_spans(messages, False, text) if placed is None else placed
                start = placed[i][0] if len(placed) == len(messages) else None
            if start is None or not text.startswith(through) or start > len(through):
                raise UserError(f"the chat template neither renders the conversation through message {i + 1} (an assistant "
                                "turn) as the start of the whole one nor puts the messages in as given, so the reply's tokens "
                                "cannot be found; it cannot be used for SFT")
            spans.append((start, max(start, len(through.rstrip()))))
        ids, offsets = ids[: self.max_length + 1], offsets[: self.max_length + 1]
        trained = [any(s <= o0 < e for s, e in spans) for o0, _ in offsets]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
        return {"input_ids": ids[:-1], "labels": labels}

    def _reply_start(self, before: list[dict[str, str]], through: str) -> int | None:
        """Where the reply after the conversation `before` starts in `through` (the rendering up to and
        with it): after the generation prompt, when the template renders `before` as a prefix of it."""
        if not before:  # no conversation yet: what a template makes of none need not begin a real one
            return None
        try:
            prompt = self.tok.apply_chat_template(before, add_generation_prompt=True)
        except ChatTemplateError:
            return None
        return len(prompt) if through.startswith(prompt) else None


def collate(features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into tensors; `attention_mask` (and `src_mask`) mark real tokens."""
    out: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], int):
            out[key] = torch.tensor(values)
            continue
        width = max(len(v) for v in values)
        fill = IGNORE_INDEX if key == "labels" else (0 if key == "token_type_ids" else pad_id)
        out[key] = torch.tensor([list(v) + [fill] * (width - len(v)) for v in values])
        if key in ("input_ids", "src"):
            mask = torch.tensor([[1] * len(v) + [0] * (width - len(v)) for v in values])
            out["attention_mask" if key == "input_ids" else "src_mask"] = mask
    return out


def sample_batch(features: list[Feature], batch_size: int, seed: int, step: int, micro: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A training batch drawn with replacement, a pure function of (seed, step, micro)."""
    rng = random.Random(f"{seed}/{step}/{micro}")  # str seeds are hashed with SHA-512: stable across processes
    return collate([features[rng.randrange(len(features))] for _ in range(batch_size)], pad_id)


# -- reading a task's examples and turning them into features ------------------------------------

TASKS = ("classify", "tag", "qa", "seq2seq", "sft")
# The model head each task trains and predicts with (`ModelConfig.task_head`); "none" is the LM head.
TASK_HEAD = {"classify": "classify", "tag": "tag", "qa": "span", "seq2seq": "none", "sft": "none"}
# The architectures each task fine-tunes and predicts with (a chat template frames a decoder's input only).
TASK_ARCHS = {"classify": ("encoder", "decoder"), "tag": ("encoder", "decoder"), "qa": ("encoder", "decoder"),
              "seq2seq": ("decoder", "encoder-decoder"), "sft": ("decoder",)}


def read_examples(
    task: str,
    data: str | Path,
    target: str | Path | None = None,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    labels: list[str] | None = None,
    split_articles: float | None = None,
    part: int = 0,
    require_labels: bool = True,
) -> list:
    """A task's examples from its file(s): `target` is the second file of line-aligned parallel
    text (seq2seq); `split_articles` F keeps part 0 (the first F of the articles) or part 1 (the
    rest) of a QA file, split by article with a fixed seed. `require_labels=False` also reads
    unlabelled data (GLUE test files, tokens-only CoNLL, questions without answers, sources without
    targets, a plain-text file of sources, conversations without a reply)."""
    if task not in TASKS:
        raise UserError(f"task {task!r} is not supported; use one of {list(TASKS)}")
    if target is not None and task != "seq2seq":
        raise UserError(f"--target (a line-aligned target file) belongs to --task seq2seq, not {task}")
    if split_articles is not None and task != "qa":
        raise UserError("--split-articles splits SQuAD-style QA data; drop it for other tasks")
    if split_articles is not None and not 0 < split_articles < 1:
        raise UserError(f"--split-articles {split_articles} is out of range; pass the fraction of the articles to train on, "
                        "in (0, 1), e.g. 0.8, or drop it to use every article")
    if labels is not None and task not in ("classify", "tag"):
        raise UserError(f"--labels (the label set) belongs to --task classify or tag, not {task}")
    names = [str(label) for label in labels or ()]
    if twice := [name for i, name in enumerate(names) if name in names[:i]]:  # the head would hold it twice
        raise UserError(f"--labels names {twice[0]!r} more than once; give each label once")
    for flag, field in (("--text-field", text_field), ("--label-field", label_field)):
        if field is not None and task not in ("classify", "seq2seq"):
            raise UserError(f"{flag} names a column of classify or seq2seq data (TSV, CSV, JSONL); {task} data has none, drop it")
    if task == "classify":
        return read_classification(data, text_field, label_field, labels, require_labels=require_labels)
    if task == "tag":
        return read_tagged(data, labels, require_labels=require_labels)
    if task == "qa":
        examples = read_squad(data, require_labels=require_labels)
        return split_by_article(examples, split_articles, seed=0)[part] if split_articles is not None else examples
    if task == "seq2seq":
        if target is not None:
            if text_field is not None or label_field is not None:  # line-aligned files have no columns to name
                raise UserError("--text-field and --label-field name columns of JSONL or CSV data; line-aligned "
                                "--data SOURCES --target TARGETS files have none: drop them")
            return read_parallel_text(data, target)
        return read_text2text(data, text_field, label_field, require_labels=require_labels)
    return read_chat(data, require_labels=require_labels)


def label_set(task: str, examples: list) -> list[str]:
    """The labels of a classify or tag task as found in its training data: sorted, with `O` first."""
    found = {ex.label for ex in examples} if task == "classify" else {t for ex in examples for t in ex.tags}
    return sorted(found, key=lambda t: (t != "O", t.split("-", 1)[-1], t))


def featurize(fmt: TaskFormat, task: str, examples: list, labels: list[str] | None = None, doc_stride: int = DEFAULT_DOC_STRIDE) -> list[Feature]:
    """Training features of `examples` (a QA example may give several windows)."""
    index = {name: i for i, name in enumerate(labels or ())}

    def label_id(name: str, where: str) -> int:
        if name not in index:
            raise UserError(f"{where}: label {name!r} is not in the model's label set {list(index)}; fine-tune with it or fix the data")
        return index[name]

    def chat(ex) -> Feature:
        try:
            return fmt.chat(ex.messages)
        except UserError as e:  # a template that fails on this conversation: say which one
            raise UserError(f"{ex.where}: {e}") from None

    if task == "classify":
        return [fmt.classify(ex.text, label_id(ex.label, ex.where)) for ex in examples]
    if task == "tag":
        return [fmt.tag(ex.tokens, [label_id(t, ex.where) for t in ex.tags])[0] for ex in examples]
    if task == "qa":
        return [w.feature for ex in examples for w in fmt.qa(ex.question, ex.context, ex.answers[0], doc_stride)]
    if task == "seq2seq":
        return [fmt.seq2seq(ex.source, ex.target) for ex in examples]
    return [chat(ex) for ex in examples]
