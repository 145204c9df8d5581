"""`load(CKPT)`: a model and its tokenizer, ready to generate text."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterator

import torch

from lmforge.checkpoint import load_model
from lmforge.data.parallel import decoder_start_id
from lmforge.infer.engine import TextStream, check_prompt_ids
from lmforge.infer.generate import SamplingConfig, generate_tokens
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.device import inference_dtype, resolve_device
from lmforge.utils.errors import UserError, require_text


class LanguageModel:
    """A loaded checkpoint: `.model` (a torch module), `.tokenizer`, and text generation."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eot: bool = True,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` (text, or token ids) piece by piece, each piece complete UTF-8 text.

        For an encoder-decoder, `prompt` is the source (e.g. the sentence to translate) and the
        output is the decoded target.
        """
        if isinstance(prompt, str):
            require_text(prompt, "the prompt")
        else:
            prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a numpy array or torch tensor of ids
            what = "the prompt must be a text or a sequence of token ids, not"
            if not isinstance(prompt, (list, tuple)):
                raise UserError(f"{what} {type(prompt).__name__}")
            if bad := [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]:
                raise UserError(f"{what} {type(prompt).__name__} holding {type(bad[0]).__name__}")
            prompt = [int(t) for t in prompt]
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stops = self.tokenizer.end_ids if stop_at_eot else ()
        prompt_ids, memory = (self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else prompt), {}
        ctx = self.model.config.context_length
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        if self.model.config.arch == "encoder-decoder":
            if len(prompt_ids) > ctx - 1:  # the source and its end-of-text token, which the encoder takes whole
                raise UserError(f"the source is {len(prompt_ids)} tokens, longer than the {ctx - 1} the model's context "
                                f"of {ctx} leaves; shorten it")
            src = torch.tensor([prompt_ids + [self.tokenizer.eot_id]], device=self.device)
            with torch.inference_mode():
                memory = {"memory": self.model.encode_source(src)}
            prompt_ids = [decoder_start_id(self.tokenizer)]
        # Decoded after the prompt's last tokens, so a SentencePiece output keeps its leading space.
        text = TextStream(self.tokenizer.decode, context=prompt_ids)
        for tid in generate_tokens(self.model, prompt_ids, max_new_tokens, sampling, stops, **memory):
            if tid in stops:
                break
            if piece := text.push(tid)[0]:  # empty while a token ends inside a multi-byte character
                yield piece
        if piece := text.flush():
            yield piece

    def generate(self, prompt: str, max_new_tokens: int = 100, **kwargs) -> str:
        """The continuation of `prompt` (not including it); keyword arguments as in `stream`."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


def load(checkpoint: str | Path, device: str = "auto", dtype: str = "auto") -> LanguageModel:
    """Load a checkpoint (or a run directory's latest checkpoint) for inference; `dtype` (auto,
    float32, bfloat16) is the weights' (auto: bf16 on CUDA, fp32 on CPU)."""
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev, inference_dtype(dev, dtype))
    return LanguageModel(model, ckpt.tokenizer, ckpt.path)
