"""Inference workflows (layer 4): load a checkpoint and generate."""

from lmforge.infer.generate import SamplingConfig, decode_one_token, generate_tokens, prefill, sample
from lmforge.infer.chat import ChatSession, render_chat
from lmforge.infer.pipeline import Pipeline, pipeline, predict
from lmforge.infer.session import LanguageModel, load

__all__ = ["ChatSession", "LanguageModel", "Pipeline", "pipeline", "predict", "render_chat", "SamplingConfig", "decode_one_token", "generate_tokens", "load", "prefill", "sample"]
