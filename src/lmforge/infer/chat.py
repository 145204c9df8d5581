"""Chat: the checkpoint's own chat template turns a conversation into a prompt.

Templates are Jinja, as in Hugging Face's `tokenizer_config.json`; the tokenizer renders them
(`Tokenizer.apply_chat_template`, in Jinja's immutable sandbox).
"""

from __future__ import annotations

from typing import Iterator

from lmforge.infer.session import LanguageModel
from lmforge.utils.errors import UserError


def render_chat(lm: LanguageModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ([{"role": ..., "content": ...}]) under the checkpoint's chat template."""
    if not lm.tokenizer.chat_template:
        raise UserError(
            f"{lm.path} has no chat template; chat needs an instruction-tuned checkpoint "
            "(e.g. `lmforge import gguf` of SmolLM2-135M-Instruct)"
        )
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt)


class ChatSession:
    """A conversation that remembers its turns; `send` streams the assistant's reply."""

    def __init__(self, lm: LanguageModel, system: str | None = None, **sampling) -> None:
        self.lm, self.system, self.sampling = lm, system, sampling
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user turn and yield the reply piece by piece; the reply joins the history."""
        self.messages.append({"role": "user", "content": text})
        prompt = render_chat(self.lm, self.messages)
        n_prompt = len(self.lm.tokenizer.encode(prompt))
        room = self.lm.model.config.context_length - n_prompt
        if room <= 0:
            self.messages.pop()
            raise UserError("the conversation no longer fits in the model's context; /reset to start over")
        reply = []
        for piece in self.lm.stream(prompt, min(max_new_tokens, room), **self.sampling):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
