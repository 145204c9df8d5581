"""`pipeline(TASK, CKPT)`: a callable that runs a (fine-tuned) checkpoint on raw inputs.

    clf = lmforge.pipeline("classify", "runs/sst2")
    clf(["a gripping film", "a dull film"])    # [{"label": "1", "score": 0.97}, {"label": "0", ...}]
    lmforge.pipeline("qa", "runs/squad")(question="Who won?", context="... the Broncos won ...")

Inputs are laid out by the same `TaskFormat` the fine-tune used (read from the checkpoint's
trainer state), batched, and long ones handled: classification and tagging keep the first
`max_length` tokens; QA slides windows over a long context and keeps the best span of any window;
a decoder's seq2seq prompt is cut (its source, never the template) to `max_length // 2` tokens
(`TaskFormat.prompt_length`) and to what the context leaves after `max_new_tokens`. The fine-tune
gave a prompt up to `max_length + 1` tokens less its target's (a target takes at most half), so
half is the least room any prompt had there, not the room a given one had. A
fine-tuned checkpoint runs only the task it was tuned for; a base model serves seq2seq and sft zero-shot.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lmforge.config import DEFAULT_DOC_STRIDE, DEFAULT_PROMPT, INFERENCE_DEFAULTS, INFERENCE_TASKS
from lmforge.checkpoint import load_model
from lmforge.data.features import TASK_ARCHS, TASK_HEAD, TASKS, Feature, TaskFormat, collate, read_examples
from lmforge.data.parallel import decoder_start_id
from lmforge.data.tasks import entities
from lmforge.infer.beam import beam_search, beam_search_batch
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.device import inference_dtype, resolve_device
from lmforge.utils.errors import UserError, require_text
from lmforge.utils.fs import atomic_write_text, check_writable_dir


class Pipeline:
    """Runs one task; `task`, `model`, `tokenizer` and `format` are public for inspection."""

    def __init__(self, task: str, model: Transformer, tokenizer: Tokenizer, fmt: TaskFormat, batch_size: int,
                 max_new_tokens: int, max_answer_length: int, doc_stride: int, num_beams: int = 1,
                 length_penalty: float = 1.0, prompt_length: int | None = None) -> None:
        """`prompt_length`: the most tokens of a decoder's seq2seq prompt, the least room its fine-tune
        gave one (None, a model not fine-tuned for seq2seq: what the context leaves after `max_new_tokens`)."""
        self.task, self.model, self.tokenizer, self.format = task, model, tokenizer, fmt
        self.prompt_length = prompt_length
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.max_answer_length, self.doc_stride = max_answer_length, doc_stride

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        """One input gives one result; a list gives a list. QA takes {"question", "context"}
        dicts or question=..., context=...; tag takes a text (split into words and punctuation,
        see `split_words`; entities carry character offsets) or a list of texts or word lists;
        sft takes a list of messages (a string is one user message)."""
        if self.task == "qa" and inputs is None:
            inputs = kwargs
        if self.task == "qa":
            single = isinstance(inputs, dict)
        elif self.task == "sft":
            single = isinstance(inputs, str) or (isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], dict))
        else:
            single = isinstance(inputs, str)
        if not single and (isinstance(inputs, Mapping) or not isinstance(inputs, Iterable)):
            # a dict would be read as its keys; None or 5 fail in list(). Lists, generators, arrays are batches.
            raise UserError(f"a {self.task} pipeline takes {_SHAPES[self.task]} or a list of them, not {type(inputs).__name__}")
        batch = [inputs] if single else list(inputs)
        if not batch:
            return []
        for i, item in enumerate(batch):
            _check_input(self.task, item, "the input" if single else f"input {i}")
        run = {"classify": self._classify, "tag": self._tag, "qa": self._qa, "seq2seq": self._generate, "sft": self._generate}
        results = run[self.task](batch)
        return results[0] if single else results

    @torch.inference_mode()
    def _logits(self, features: list[Feature]) -> Iterator[torch.Tensor]:
        """The head's logits for `features`, `batch_size` at a time."""
        for i in range(0, len(features), self.batch_size):
            b = {k: v.to(self.device) for k, v in collate(features[i : i + self.batch_size], self.format.pad_id).items()}
            yield self.model.task_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).float()

    def _classify(self, texts: list[str]) -> list[dict[str, Any]]:
        labels = self.model.config.labels
        out = []
        for logits in self._logits([self.format.classify(t) for t in texts]):
            probs = logits.softmax(-1)
            for p in probs:
                i = int(p.argmax())
                out.append({"label": labels[i], "score": float(p[i])})
        return out

    def _tag(self, items: list[str | list[str]]) -> list[dict[str, Any]]:
        labels = self.model.config.labels
        spans_of = [split_words(item) if isinstance(item, str) else None for item in items]
        words = [[item[a:b] for a, b in spans] if spans is not None else list(item) for item, spans in zip(items, spans_of)]
        encoded = [self.format.tag(w) for w in words]
        out: list[dict[str, Any]] = []
        done = 0
        for logits in self._logits([f for f, _ in encoded]):
            for row in logits.argmax(-1).tolist():
                w, first = words[done], encoded[done][1]
                # Words cut off by max_length get "O": the model never saw them.
                tags = _valid_iob2([labels[row[t]] if t >= 0 else "O" for t in first])
                spans = []
                for kind, a, b in entities(tags):
                    span = {"type": kind, "text": " ".join(w[a : b + 1]), "first_word": a, "last_word": b}
                    if spans_of[done] is not None:  # raw text: the entity as written, with its character offsets
                        start, end = spans_of[done][a][0], spans_of[done][b][1]
                        span.update(text=items[done][start:end], start=start, end=end)
                    spans.append(span)
                out.append({"words": w, "tags": tags, "entities": spans})
                done += 1
        return out

    def _qa(self, items: list[dict[str, str]]) -> list[dict[str, Any]]:
        windows = []  # (item index, window) over every item: batches mix items
        for n, item in enumerate(items):
            if not isinstance(item, dict) or not {"question", "context"} <= set(item):
                raise UserError('qa inputs are {"question": ..., "context": ...} dicts')
            windows += [(n, w) for w in self.format.qa(item["question"], item["context"], stride=self.doc_stride)]
        best = [(float("-inf"), 0, 0)] * len(items)
        k = 0
        for logits in self._logits([w.feature for _, w in windows]):
            for lg in logits:
                n, w = windows[k]
                best[n] = max(best[n], _best_span(lg, w.offsets, self.max_answer_length))
                k += 1
        out = []
        for item, (score, s, e) in zip(items, best):
            answer = item["context"][s:e]
            s += len(answer) - len(answer.lstrip())  # byte-level tokens carry the space before a word
            answer = answer.strip()
            # No span at all (an empty context): score None, since -inf is not JSON.
            out.append({"answer": answer, "score": score if score > float("-inf") else None, "start": s, "end": s + len(answer)})
        return out

    def _generate(self, items: list[Any]) -> list[str]:
        """Greedy decoding, batched through the engine for decoders; beam search with num_beams > 1;
        an encoder-decoder searches `batch_size` sources at a time (greedy is a beam of one). The text
        leaves special tokens out, as transformers' text2text pipelines and vLLM do: a `<pad>` or a
        chat marker a model emits is not a word of its translation or summary."""
        tok = self.tokenizer
        outputs = self._translate(items) if self.model.config.arch == "encoder-decoder" else self._complete(items)
        return [tok.decode([t for t in ids if t not in tok.end_ids], skip_special_tokens=True).strip() for ids in outputs]

    def _complete(self, items: list[Any]) -> list[list[int]]:
        """A decoder's generated tokens per prompt (the seq2seq prompt format, or a chat's next turn)."""
        cfg, tok = self.model.config, self.tokenizer
        if self.max_new_tokens >= cfg.context_length:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} leaves no room for the input in the model's context of "
                            f"{cfg.context_length}; lower it (it is {INFERENCE_DEFAULTS['max_new_tokens']} unless given)")
        room = cfg.context_length - self.max_new_tokens
        prompts = []
        for item in items:
            if self.task == "sft":
                messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
                prompt = tok.encode_chat(messages, add_generation_prompt=True)  # a message's text read as text
                prompts.append(prompt[-room:])
            else:
                prompts.append(self.format.prompt_ids(item, min(self.prompt_length or room, room)))
        if self.num_beams > 1:
            return [beam_search(self.model, prompt, self.num_beams, self.max_new_tokens, self.length_penalty,
                                eos_id=tok.end_ids)[0].tokens for prompt in prompts]
        longest = max(len(p) for p in prompts) + self.max_new_tokens
        engine = Engine(self.model, tok, max_batch=min(self.batch_size, len(prompts)), max_seq_len=longest)
        params = SamplingParams(max_tokens=self.max_new_tokens, temperature=0.0)
        return [req.output for req in engine.generate(prompts, params)]

    def _translate(self, items: list[Any]) -> list[list[int]]:
        """An encoder-decoder's best hypothesis per source: padded sources, encoded and searched together.
        The output stops where the decoder's positions end (context_length - 1 tokens after the start token)."""
        features = [self.format.seq2seq(item) for item in items]  # {"src": ids}
        start, outputs = decoder_start_id(self.tokenizer), []
        max_new = min(self.max_new_tokens, self.model.config.context_length - 1)
        for lo in range(0, len(features), self.batch_size):
            batch = {k: v.to(self.device) for k, v in collate(features[lo : lo + self.batch_size], self.format.pad_id).items()}
            with torch.inference_mode():
                memory = self.model.encode_source(batch["src"], batch["src_mask"])
            found = beam_search_batch(self.model, [[start]] * memory.size(0), self.num_beams, max_new, self.length_penalty,
                                      eos_id=self.tokenizer.end_ids, memory=memory, memory_mask=batch["src_mask"])
            outputs += [hyps[0].tokens for hyps in found]
        return outputs


def _best_span(logits: torch.Tensor, offsets: Sequence[tuple[int, int] | None], max_len: int) -> tuple[float, int, int]:
    """The highest start+end score over spans inside the context of at most `max_len` tokens,
    as (score, start char, end char)."""
    in_ctx = torch.tensor([o is not None for o in offsets], device=logits.device)
    T = len(offsets)
    start, end = logits[:T, 0], logits[:T, 1]
    scores = start[:, None] + end[None, :]  # (T, T): start i, end j
    i, j = torch.meshgrid(torch.arange(T, device=logits.device), torch.arange(T, device=logits.device), indexing="ij")
    ok = (j >= i) & (j - i < max_len) & in_ctx[:, None] & in_ctx[None, :]
    if not ok.any():
        return float("-inf"), 0, 0
    scores = scores.masked_fill(~ok, float("-inf"))
    flat = int(scores.argmax())
    s, e = divmod(flat, T)
    return float(scores.view(-1)[flat]), offsets[s][0], offsets[e][1]


# Words as the tagging corpora write them (Penn Treebank style, with WNUT-17's Twitter tokens): a
# URL, an @mention or #hashtag, a number with separators ("30,000"), a clitic split off ("do" "n't",
# "John" "'s"), letters and digits with inner hyphens ("state-of-the-art"), or one other character.
# What one input of each task is.
_SHAPES = {"classify": "a text", "seq2seq": "a text", "tag": "a text or a list of words",
           "qa": 'a {"question": ..., "context": ...} dict of texts', "sft": 'a text or a list of {"role", "content"} messages'}


def _check_input(task: str, item: Any, what: str) -> None:
    """Refuse, in one line, an input of the wrong shape or holding text that is not valid Unicode (a
    lone surrogate), which would otherwise reach the tokenizer and fail there with a TypeError."""
    if task in ("classify", "seq2seq"):
        texts = [item] if isinstance(item, str) else None
    elif task == "tag":
        texts = [item] if isinstance(item, str) else item if isinstance(item, list) else None
    elif task == "qa":
        texts = [item.get("question"), item.get("context")] if isinstance(item, dict) else None
    else:  # sft
        texts = ([item] if isinstance(item, str) else
                 [m.get("content") if isinstance(m, dict) else None for m in item] if isinstance(item, list) else None)
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{what} is {type(item).__name__} {str(item)[:40]!r}; {task} takes {_SHAPES[task]}")
    for text in texts:
        require_text(text, what)


_WORD = re.compile(
    r"https?://\S+|[@#]\w+|\d+(?:[.,]\d+)+|\w+?(?=n['’]t\b)|n['’]t\b|['’](?:s|m|d|ll|re|ve)\b|\w+(?:-\w+)*|[^\w\s]",
    re.IGNORECASE,
)


def split_words(text: str) -> list[tuple[int, int]]:
    """The (start, end) character offsets of the words of raw text, punctuation split off as the
    tagging corpora do, so that a model trained on them sees words of the same kind."""
    return [m.span() for m in _WORD.finditer(text)]


def _valid_iob2(tags: list[str]) -> list[str]:
    """Repair an I-x that does not continue an entity of type x into B-x (what the model meant)."""
    out = []
    for i, t in enumerate(tags):
        if t.startswith("I-") and (i == 0 or out[-1][2:] != t[2:] or out[-1] == "O"):
            t = "B-" + t[2:]
        out.append(t)
    return out


def pipeline(
    task: str | None,
    checkpoint: str | Path,
    device: str = "auto",
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    max_answer_length: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    dtype: str = "auto",
) -> Pipeline:
    """A callable for `task` on `checkpoint`; task None takes the one the checkpoint was fine-tuned for.

    Generation (seq2seq, sft) is greedy; `num_beams` > 1 runs beam search with `length_penalty`.
    Decoders decode greedily `batch_size` prompts at a time and run beams one prompt at a time;
    encoder-decoders search `batch_size` sources at a time either way. QA answers are at most
    `max_answer_length` tokens. Options left None take `INFERENCE_DEFAULTS`; one given to a task
    that does not use it (`num_beams` for classify, `length_penalty` without beams) is refused.
    `dtype` (auto, float32, bfloat16) is the weights' (auto: bf16 on CUDA, fp32 on CPU).
    """
    given = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty,
             "max_answer_length": max_answer_length}
    opts = {k: INFERENCE_DEFAULTS[k] if v is None else v for k, v in given.items()}
    if opts["num_beams"] < 1 or batch_size < 1 or opts["max_answer_length"] < 1:
        raise UserError(f"num_beams, batch_size and max_answer_length must be >= 1, got {opts['num_beams']}, {batch_size}, "
                        f"{opts['max_answer_length']}")
    if opts["max_new_tokens"] < 1:  # checked here, by the option's name, not deep in the engine or the beam search
        raise UserError(f"--max-new-tokens must be >= 1, got {opts['max_new_tokens']}; it is the length of the longest generated output")
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev, inference_dtype(dev, dtype))
    trained = (ckpt.trainer_state or {}).get("task") or {}
    task = task or trained.get("kind")
    if task is None:
        raise UserError(f"{ckpt.path} was not fine-tuned for a task; name the task with --task (in Python: task=), one of {list(TASKS)}")
    if task not in TASKS:
        raise UserError(f"task {task!r} is not supported; use one of {list(TASKS)}")
    head = TASK_HEAD[task]
    if head != "none" and model.config.task_head != head:
        raise UserError(f"{ckpt.path} has no {head} head; fine-tune it first with `lmforge finetune {ckpt.path} --task {task} ...`")
    if model.config.arch not in TASK_ARCHS[task]:  # an encoder-decoder with a chat template: sft frames a decoder's input
        raise UserError(f"--task {task} runs on {' or '.join(TASK_ARCHS[task])} models, but {ckpt.path} is an "
                        f"{model.config.arch}; use a {TASK_ARCHS[task][0]} checkpoint")
    # A base model serves seq2seq and sft as it is (zero-shot); a fine-tune only the task it was tuned for.
    kind = trained.get("kind") or {h: t for t, h in TASK_HEAD.items() if h != "none"}.get(model.config.task_head)
    if kind not in (None, task):
        raise UserError(f"{ckpt.path} was fine-tuned for --task {kind}, not {task}; use --task {kind}, or fine-tune "
                        f"its base model with `lmforge finetune BASE --task {task} ...`")
    _refuse_unused_options(task, given)
    if length_penalty is not None and opts["num_beams"] == 1:  # after the task's own refusals: one that applies
        raise UserError("--length-penalty ranks the hypotheses of beam search; add --num-beams N (N > 1), or leave it out")
    cfg = model.config
    fmt = TaskFormat(ckpt.tokenizer, cfg.arch, trained.get("max_length", cfg.context_length), trained.get("prompt", DEFAULT_PROMPT),
                     trained.get("repeat", False))
    # A decoder's seq2seq fine-tune saw prompts of the length `TaskFormat.seq2seq` gives a source without a target.
    prompt_length = fmt.prompt_length if "max_length" in trained else None
    return Pipeline(task, model, ckpt.tokenizer, fmt, batch_size, opts["max_new_tokens"], opts["max_answer_length"],
                    trained.get("doc_stride", DEFAULT_DOC_STRIDE), opts["num_beams"], opts["length_penalty"], prompt_length)


def _refuse_unused_options(task: str, given: dict[str, Any]) -> None:
    """Refuse an option of `given` (name: value, None where not given) that `task` does not use, by its flag."""
    for name, value in given.items():
        if value is not None and task not in INFERENCE_TASKS[name]:
            raise UserError(f"--{name.replace('_', '-')} applies to --task {' and '.join(INFERENCE_TASKS[name])}, not {task}; "
                            "leave it out")


# Every row `predict` writes starts with this, as json.dumps spells it: how an earlier predictions file is known.
_ROW_START = b'{"where": "'


def check_predictions_out(out: str | Path, **inputs: str | Path | None) -> None:
    """Refuse an `out` that `predict` must not replace: one of its `inputs` (by flag name: data, target),
    a directory, or an existing file that is neither empty nor an earlier predictions file (whose first
    line is a JSON object starting with "where", as every row `predict` writes does)."""
    path = Path(out)
    if not str(out).strip():
        raise UserError("--out is empty; pass the path of the JSONL file to write, e.g. --out predictions.jsonl")
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        raise UserError(f"--out {out} is a directory; pass the path of the JSONL file to write, e.g. {path / 'predictions.jsonl'}")
    if path.suffix in (".gz", ".bz2", ".xz", ".zst"):
        raise UserError(f"--out {out}: predict writes plain JSON lines, not {path.suffix}; pass a path ending in .jsonl "
                        "and compress it afterwards")
    if not path.exists():
        return
    for flag, given in inputs.items():
        if given is not None and Path(given).exists() and os.path.samefile(path, given):
            raise UserError(f"--out {out} is the --{flag} file; predictions would replace it: pass another --out, "
                            f"e.g. {path.with_name(path.stem + '.predictions.jsonl')}")
    head = b""
    if path.is_file():  # never opened otherwise: reading a FIFO would wait forever
        try:
            with open(path, "rb") as f:
                head = f.read(len(_ROW_START))
        except OSError as e:
            raise UserError(f"--out {out} cannot be read ({e.strerror}); pass another --out") from None
    if not path.is_file() or (head and head != _ROW_START):
        raise UserError(f"{out} exists and is not an earlier predictions file (JSON lines starting with \"where\"); "
                        "pass a new --out or remove it")


def predict(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    task: str | None = None,
    *,
    target: str | Path | None = None,
    split_articles: float | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    max_answer_length: int | None = None,
    dtype: str = "auto",
) -> int:
    """Run `checkpoint` over the examples of `data` and write one JSON object per example to `out`
    (atomically); returns the number written. Labels in the data are not needed (GLUE test files,
    a plain-text file of sources, conversations without a reply). A conversation's reply is to all of
    it but a final assistant turn (the reference reply, when the data has one)."""
    check_predictions_out(out, data=data, target=target)  # found now, not after every prediction is made
    check_writable_dir(Path(out).parent)  # likewise; the folders it makes to check are removed again
    pipe = pipeline(task, checkpoint, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    max_answer_length=max_answer_length, num_beams=num_beams, length_penalty=length_penalty, dtype=dtype)
    examples = read_examples(pipe.task, data, target, text_field=text_field, label_field=label_field,
                             split_articles=split_articles, part=1, require_labels=False)
    if pipe.task == "classify":
        rows = [{"text": ex.text, **p} for ex, p in zip(examples, pipe([ex.text for ex in examples]))]
    elif pipe.task == "tag":
        rows = pipe([ex.tokens for ex in examples])
    elif pipe.task == "qa":
        answers = pipe([{"question": ex.question, "context": ex.context} for ex in examples])
        rows = [{"id": ex.id, "question": ex.question, **a} for ex, a in zip(examples, answers)]
    elif pipe.task == "seq2seq":
        rows = [{"source": ex.source, "prediction": p} for ex, p in zip(examples, pipe([ex.source for ex in examples]))]
    else:  # the reply to each conversation, less a final assistant turn (its reference reply)
        prompts = [ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages for ex in examples]
        for ex, prompt in zip(examples, prompts):
            if not any(m["role"] == "user" for m in prompt):
                raise UserError(f"{ex.where}: the conversation has no user message to reply to (a final assistant turn is "
                                "the reference reply); give a user message")
        rows = [{"messages": m, "reply": r} for m, r in zip(prompts, pipe(prompts))]
    rows = [{"where": ex.where, **row} for ex, row in zip(examples, rows)]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
