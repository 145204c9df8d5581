"""Chat: the checkpoint's own chat template turns a conversation into a prompt.

Templates are Jinja, as in Hugging Face's `tokenizer_config.json`; the tokenizer renders them
(`Tokenizer.apply_chat_template`, in Jinja's immutable sandbox).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable, Iterator, TypeVar

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.session import LanguageModel
from lmforge.tokenizer import ChatTemplateError
from lmforge.utils.errors import UserError, require_text

T = TypeVar("T")

# What an encoder-decoder's `LanguageModel.stream` takes; the engine (decoder-only) takes every option.
_SEQ2SEQ_OPTIONS = {"temperature", "top_k", "top_p", "seed", "ignore_eos"}


def render_chat(lm: LanguageModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ([{"role": ..., "content": ...}]) under the checkpoint's chat template."""
    _require_template(lm)
    return _templated(lm, lambda: lm.tokenizer.apply_chat_template(messages, add_generation_prompt))


def encode_chat(lm: LanguageModel, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                name: str | None = None) -> list[int]:
    """The prompt's token ids for `messages`, a message's text read as text even where it spells a
    special token (`Tokenizer.encode_chat`): what chat, the server and predict feed the model.
    `name`: what an error calls the model (default its checkpoint path; the server gives its model
    id, so that a client is not told the server's paths)."""
    _require_template(lm, name)
    return _templated(lm, lambda: lm.tokenizer.encode_chat(messages, add_generation_prompt), name)


def _templated(lm: LanguageModel, fn: Callable[[], T], name: str | None = None) -> T:
    """`fn()`, where a chat template's failure names the checkpoint it came with."""
    try:
        return fn()
    except ChatTemplateError as e:
        raise UserError(f"the chat template of {name or lm.path} failed on this conversation ({e.reason}); "
                        "fix the chat template that came with it") from None


def _require_template(lm: LanguageModel, name: str | None = None) -> None:
    if not lm.tokenizer.chat_template:
        raise UserError(
            f"{name or lm.path} has no chat template; chat needs an instruction-tuned checkpoint "
            "(e.g. `lmforge import gguf` of SmolLM2-135M-Instruct)"
        )


class ChatSession:
    """A conversation that remembers its turns; `send` streams the assistant's reply.

    `sampling`: `SamplingParams`' options (temperature, top_k, top_p, seed, ...). A decoder-only
    model answers through a one-slot `Engine`, whose prefix reuse keeps the conversation's keys and
    values between turns: each turn prefills only the new message (and the last reply's final
    token), not the whole conversation again; `speculate` is the engine's. An encoder-decoder reads
    the conversation as its source each turn and takes temperature, top_k, top_p, seed and
    ignore_eos only; another option is refused here rather than ignored.
    """

    def __init__(self, lm: LanguageModel, system: str | None = None, speculate: int = 0, **sampling) -> None:
        # Checked now, so that a bad option fails once here rather than on every turn.
        self.params = SamplingParams(**sampling)
        if system is not None:
            require_text(system, "the system message")
        self.lm, self.system = lm, system
        self.messages: list[dict[str, str]] = []
        self.context_full = False  # whether the last reply ended because the context had no room left
        self._finish: str | None = None
        decoder = lm.model.config.arch == "decoder"
        if not decoder:
            default = SamplingParams()
            unsupported = [f.name for f in fields(SamplingParams)
                           if f.name not in _SEQ2SEQ_OPTIONS and getattr(self.params, f.name) != getattr(default, f.name)]
            if speculate:
                unsupported.append("speculate")
            if unsupported:
                raise UserError(f"chat with an {lm.model.config.arch} model takes temperature, top_k, top_p, seed and "
                                f"ignore_eos only, not {', '.join(unsupported)}")
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=1, speculate=speculate) if decoder else None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user turn and yield the reply piece by piece; the reply joins the history. A turn
        that fails or is cut off leaves the history as it was (no unanswered user message)."""
        require_text(text, "the message")
        self.context_full = False
        earlier = len(self.messages) > bool(self.system)  # turns before this one
        self.messages.append({"role": "user", "content": text})
        try:
            ids = encode_chat(self.lm, self.messages)
            ctx = self.lm.model.config.context_length
            room = ctx - len(ids)
            if room <= 0:  # not one token of reply fits
                if earlier:
                    raise UserError(f"the conversation ({len(ids)} tokens) no longer fits in the model's context of {ctx}; "
                                    "/reset to start over")
                what = "the system message and this message are" if self.system else "this message is"
                raise UserError(f"{what} {len(ids)} tokens in the chat template, leaving no room for a reply in the model's "
                                f"context of {ctx}; shorten it")
            reply = []
            cap = min(max_new_tokens, room)
            for piece in self._stream(ids, cap):
                reply.append(piece)
                yield piece
            self.context_full = cap < max_new_tokens and self._finish == "length"
        except BaseException:  # GeneratorExit and Ctrl-C too: the turn got no reply
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})

    def _stream(self, ids: list[int], max_new_tokens: int) -> Iterator[str]:
        """The reply's pieces; `_finish` is then why it ended ("stop", "length"; None where not told)."""
        self._finish = None
        if self.engine is None:
            p = self.params
            yield from self.lm.stream(ids, max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                      seed=p.seed, stop_at_eot=not p.ignore_eos)
            return
        req = self.engine.add(ids, replace(self.params, max_tokens=max_new_tokens))
        try:
            while not req.finished:
                for event in self.engine.step():
                    if event.text:
                        yield event.text
            self._finish = req.finish_reason
        finally:  # a reader that stops early (Ctrl-C) frees the slot
            if not req.finished:
                self.engine.abort(req.id)
