"""Inference workflows (layer 4): load a checkpoint and generate."""

from lmforge.infer.generate import SamplingConfig, decode_one_token, generate_tokens, prefill, sample
from lmforge.infer.chat import ChatSession, encode_chat, render_chat
from lmforge.infer.beam import Hypothesis, beam_search, beam_search_batch
from lmforge.infer.engine import Engine, Event, QueueFull, Request, TextStream
from lmforge.infer.pipeline import Pipeline, pipeline, predict
from lmforge.infer.sampling import SamplingParams, sample_rows
from lmforge.infer.session import LanguageModel, load

__all__ = [
    "ChatSession", "Engine", "Event", "Hypothesis", "LanguageModel", "Pipeline", "QueueFull", "Request", "SamplingConfig",
    "SamplingParams", "TextStream", "beam_search", "beam_search_batch", "decode_one_token", "generate_tokens", "load", "pipeline", "predict",
    "prefill", "encode_chat", "render_chat", "sample", "sample_rows",
]
