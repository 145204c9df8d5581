"""Chat: the checkpoint's own chat template turns a conversation into a prompt.

Templates are Jinja, as in Hugging Face's `tokenizer_config.json`, rendered in Jinja's immutable
sandbox: a template comes from a file, and loading never runs code from a file.
"""

from __future__ import annotations

from typing import Iterator

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.infer.session import LanguageModel
from lmforge.utils.errors import UserError


def render_chat(lm: LanguageModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ([{"role": ..., "content": ...}]) under the checkpoint's chat template."""
    tok = lm.tokenizer
    if not tok.chat_template:
        raise UserError(
            f"{lm.path} has no chat template; chat needs an instruction-tuned checkpoint "
            "(e.g. `lmforge import gguf` of SmolLM2-135M-Instruct)"
        )

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(tok.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=tok.hf.id_to_token(tok.eot_id),
            bos_token=tok.hf.id_to_token(tok.bos_id) if tok.bos_id is not None else "",
        )
    except TemplateError as e:
        raise UserError(f"the chat template of {lm.path} failed: {e}") from None


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
