"""The `lmforge` command: parse a verb's arguments (jsonargparse: YAML configs and dotted
overrides such as `--train.lr 3e-4`), call the library, print the result.

Every user-caused error ends as one line on stderr and exit status 2; `--json` makes the last
line of stdout a JSON object with the verb's result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from lmforge.cli import other_rank
from lmforge.config import DEFAULT_DOC_STRIDE, DEFAULT_PROMPT, FINETUNE_DEFAULTS, INFERENCE_DEFAULTS, PRESETS, LoraConfig, ModelConfig, TrainConfig
from lmforge.utils.errors import UserError, first_line

VERBS = ("demo", "tokenizer", "prepare", "pretrain", "finetune", "merge-lora", "predict", "generate", "chat", "serve", "eval",
         "scaling", "import", "export")
TASKS = ["classify", "tag", "qa", "seq2seq", "sft"]
ACTIONS = {"tokenizer": ("train",), "scaling": ("sweep", "fit", "plan"), "import": ("hf", "gguf"), "export": ("hf",)}


def _flag() -> ActionYesNo:
    """An on/off option: `--resume` alone sets it; in a YAML config only a boolean (`resume: true`) is
    taken, where argparse's store_true would take any value ("maybe", 1) as true."""
    return ActionYesNo(no_prefix=None)


def _parser(description: str, **kwargs: Any) -> ArgumentParser:
    # allow_abbrev=False: a misspelt key such as --train.max_step must be an error, not a prefix match.
    return ArgumentParser(description=description, exit_on_error=False, default_env=False, allow_abbrev=False, **kwargs)


def _option(p: ArgumentParser, name: str, **kwargs: Any) -> None:
    """An option spelled `--max-new-tokens` that also accepts `--max_new_tokens`; without a type it
    takes a string, so that a YAML value such as
    `data: 5` or `out: {x: 1}` is a one-line error, not a TypeError deep in the library."""
    dashed = "--" + name.replace("_", "-")
    flags = [dashed] if "-" not in name and "_" not in name else [dashed, "--" + name]
    if not {"type", "action", "choices"} & kwargs.keys():  # choices check a YAML value themselves; a type
        kwargs["type"] = str  # would show in --help as jsonargparse's wrapper, "<function <lambda> at 0x...>"
        # (with a default of None too: `--api-key null` is that string, not None (no key))
    p.add_argument(*flags, dest=name, **kwargs)


def _json_flag(p: ArgumentParser) -> None:
    p.add_argument("--json", action=_flag(), help="print the result as one JSON object on the last line")


def _device_options(p: ArgumentParser) -> None:
    """Where and in what precision an inference verb runs."""
    _option(p, "device", default="auto")
    _option(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16"],
            help="precision of the forward pass: auto is bf16 on CUDA and fp32 on CPU; bfloat16 is also faster on CPUs with AVX512-BF16 or AMX")


def _sampling_options(p: ArgumentParser, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """How generate and chat sample, with each verb's defaults."""
    _option(p, "max_new_tokens", type=int, default=max_new_tokens)
    _option(p, "temperature", type=float, default=temperature, help="0 is greedy")
    _option(p, "top_k", type=int, default=top_k, help="0 disables")
    _option(p, "top_p", type=float, default=top_p, help="1 disables")
    _option(p, "seed", type=int | None, default=None)


def _task_data_options(p: ArgumentParser) -> None:
    """Where a task's examples come from: the options finetune, predict and eval share."""
    _option(p, "target", default=None, help="seq2seq: the target file line-aligned with --data (e.g. train.de)")
    _option(p, "split_articles", type=float | None, default=None,
            help="qa: split the SQuAD file by article; finetune trains on the first F, predict/eval use the rest")
    _option(p, "text_field", default=None, help="column or JSON key of the text (classify) or source (seq2seq)")
    _option(p, "label_field", default=None, help="column or JSON key of the label (classify) or target (seq2seq)")


def _inference_options(p: ArgumentParser) -> None:
    """How a fine-tuned checkpoint predicts: the options predict and eval --task share."""
    d = INFERENCE_DEFAULTS  # None: not given (a task that does not use an option refuses it), then these
    _option(p, "max_new_tokens", type=int | None, default=None, help=f"seq2seq/sft: longest generated output (default {d['max_new_tokens']})")
    _option(p, "num_beams", type=int | None, default=None,
            help=f"seq2seq/sft: beam search with this many beams (default {d['num_beams']}: greedy)")
    _option(p, "length_penalty", type=float | None, default=None,
            help=f"beam search: score = logprob / length^this (default {d['length_penalty']})")
    _option(p, "max_answer_length", type=int | None, default=None, help=f"qa: longest answer in tokens (default {d['max_answer_length']})")


def build_parser(pretrain_defaults: dict[str, Any] | None = None) -> ArgumentParser:
    root = _parser("lmforge: Transformer language models from theory to practice.", prog="lmforge")
    verbs = root.add_subcommands(dest="verb", required=True)

    demo = _parser("Train a tokenizer and a small GPT on the bundled tinyshakespeare, evaluate, sample.")
    _option(demo, "out", default="runs/demo", help="directory for the tokenizer, data, run and plot")
    _option(demo, "max_steps", type=int, default=None, help="training steps (default: the demo recipe)")
    _option(demo, "device", default="cpu", help="cpu, cuda or auto")
    _option(demo, "resume", action=_flag(), help="go on with the training of a demo stopped by Ctrl-C, keeping its tokenizer and data")
    _json_flag(demo)
    verbs.add_subcommand("demo", demo, help="the main job: tokenizer + tiny GPT on tinyshakespeare + sample")

    tok = _parser("Tokenizer commands.")
    verbs.add_subcommand("tokenizer", tok, help="train a byte-level BPE tokenizer")
    tok_verbs = tok.add_subcommands(dest="action", required=True)
    tok_train = _parser("Train a byte-level BPE tokenizer (HF tokenizers) with special tokens.")
    tok_train.add_argument("files", nargs="+", type=str, help=".txt, .jsonl, .gz files or directories")
    _option(tok_train, "vocab_size", type=int, default=8192, help="vocabulary size including special tokens")
    _option(tok_train, "out", required=True, help="directory to write tokenizer.json into")
    _option(tok_train, "min_frequency", type=int, default=2, help="minimum pair count for a merge")
    _json_flag(tok_train)
    tok_verbs.add_subcommand("train", tok_train, help="train a tokenizer on text files")

    prep = _parser("Tokenize text into uint16/uint32 memmap shards with meta.json.")
    prep.add_argument("inputs", nargs="+", type=str, help=".txt, .jsonl, .gz files or directories")
    _option(prep, "tokenizer", required=True, help="directory with tokenizer.json")
    _option(prep, "out", required=True, help="output data directory")
    _option(prep, "val_fraction", type=float, default=0.1, help="last fraction of the text (or pairs) held out for validation")
    _option(prep, "target", default=None,
            help="a file line-aligned with the one input: prepare parallel pairs for --objective seq2seq")
    _json_flag(prep)
    verbs.add_subcommand("prepare", prep, help="tokenize a corpus into train/val shards")

    pre = _parser("Pretrain a decoder-only Transformer on prepared shards.")
    pre.add_argument("--config", action=ActionConfigFile, help="YAML file with data/out/model/train keys")
    _option(pre, "data", required=True, help="prepared data directory (lmforge prepare)")
    _option(pre, "out", required=True, help="run directory for checkpoints, metrics and plots")
    pre.add_class_arguments(ModelConfig, "model")
    pre.add_class_arguments(TrainConfig, "train")
    _option(pre, "resume", action=_flag(), help="continue from the latest checkpoint in --out")
    _option(pre, "objective", default="causal", choices=["causal", "mlm", "mlm+nsp", "seq2seq"],
            help="causal (GPT, Llama), masked-LM / masked-LM + next-sentence (BERT), seq2seq (encoder-decoder)")
    _json_flag(pre)
    if pretrain_defaults:
        pre.set_defaults(pretrain_defaults)
    verbs.add_subcommand("pretrain", pre, help="train a model from scratch or resume a run")

    ft = _parser("Fine-tune a checkpoint for a task: a head on the pretrained model, fully or with LoRA adapters.")
    ft.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these keys")
    ft.add_argument("checkpoint", type=str, help="checkpoint or run directory to start from")
    _option(ft, "task", required=True, choices=TASKS,
            help="classify (sentiment...), tag (NER, IOB2), qa (extractive, SQuAD), seq2seq (translation, summaries), sft (chat)")
    _option(ft, "data", required=True, help="training file: TSV/CSV/JSONL, CoNLL, SQuAD JSON, parallel text or chat JSONL (.gz ok)")
    _option(ft, "out", required=True, help="run directory for the fine-tuned checkpoints, metrics and plot")
    _option(ft, "val", default=None, help="validation file in the same format, scored during training")
    _option(ft, "val_target", default=None, help="seq2seq: the target file line-aligned with --val")
    _task_data_options(ft)
    ft.add_class_arguments(TrainConfig, "train")
    ft.add_class_arguments(LoraConfig, "lora")
    _option(ft, "freeze_embeddings", action=_flag(), help="full fine-tune: keep the embeddings fixed")
    _option(ft, "freeze_layers", type=int, default=0, help="full fine-tune: keep the first K blocks fixed (of both stacks in an encoder-decoder)")
    _option(ft, "labels", nargs="+", default=None, help="classify/tag: the label set (default: the labels in --data)")
    _option(ft, "prompt", default=DEFAULT_PROMPT, help="seq2seq on a decoder: how a source becomes a prompt")
    _option(ft, "doc_stride", type=int, default=DEFAULT_DOC_STRIDE, help="qa: overlap in tokens of the windows over a long context")
    _option(ft, "repeat_input", action=_flag(),
            help="tag/qa on a decoder: lay the input out twice and read the second copy, so every token sees the whole text")
    _option(ft, "dropout", type=float | None, default=None, help="dropout while fine-tuning (default: the model's)")
    _option(ft, "resume", action=_flag(), help="continue from the latest checkpoint in --out")
    _json_flag(ft)
    ft.set_defaults({f"train.{k}": v for k, v in FINETUNE_DEFAULTS.items()})
    verbs.add_subcommand("finetune", ft, help="fine-tune for classify, tag, qa, seq2seq or sft (chat)")

    merge = _parser("Fold a LoRA checkpoint's adapters into its weights: a plain checkpoint, as fast as the base.")
    merge.add_argument("checkpoint", type=str, help="a checkpoint fine-tuned with --lora.r > 0")
    _option(merge, "out", required=True, help="checkpoint directory to write")
    _json_flag(merge)
    verbs.add_subcommand("merge-lora", merge, help="merge LoRA adapters into the weights")

    pred = _parser("Run a fine-tuned checkpoint over a data file and write one JSON line per example.")
    pred.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(pred, "data", required=True, help="input file, in the task's format (labels not needed)")
    _option(pred, "out", required=True, help="JSONL file to write")
    _option(pred, "task", default=None, choices=TASKS, help="default: the task the checkpoint was fine-tuned for")
    _task_data_options(pred)
    _option(pred, "batch_size", type=int, default=32)
    _inference_options(pred)
    _device_options(pred)
    _json_flag(pred)
    verbs.add_subcommand("predict", pred, help="write predictions as JSONL")

    gen = _parser("Generate text from a checkpoint, streaming tokens to stdout.")
    gen.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(gen, "prompt", default="\n", help="text to continue")
    _sampling_options(gen, max_new_tokens=200, temperature=0.8, top_k=200, top_p=1.0)
    _device_options(gen)
    _json_flag(gen)
    verbs.add_subcommand("generate", gen, help="sample a continuation of a prompt")

    ev = _parser("Loss, perplexity and bits per byte of a checkpoint on text; with --task, the task's own metric "
                 "(accuracy/macro-F1, entity F1, SQuAD EM/F1, BLEU/chrF/ROUGE).")
    ev.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(ev, "data", nargs="+", required=True, help="a prepared data directory, or text files/directories; with --task, one task file")
    _option(ev, "split", default=None, help="split of a prepared data directory (default val)")
    _option(ev, "task", default=None, choices=TASKS, help="score a fine-tuned checkpoint on labelled task data")
    _task_data_options(ev)
    _option(ev, "limit", type=int | None, default=None, help="--task: score only the first N examples")
    _inference_options(ev)
    _option(ev, "batch_size", type=int | None, default=None,
            help="sequences per forward: full-context windows for a language model (default 8), examples with --task (default 32)")
    _device_options(ev)
    _json_flag(ev)
    verbs.add_subcommand("eval", ev, help="evaluate a language model")

    chat = _parser("Chat with an instruction-tuned checkpoint through its chat template (/reset, /exit).")
    chat.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(chat, "system", default=None, help="system message")
    _sampling_options(chat, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9)
    _option(chat, "speculate", type=int, default=0,
            help="draft up to K tokens by prompt lookup and check them in one step (replies that repeat the conversation come faster)")
    _device_options(chat)
    verbs.add_subcommand("chat", chat, help="interactive chat that streams replies")

    srv = _parser("Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching.")
    srv.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(srv, "host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    _option(srv, "port", type=int, default=8000)
    _option(srv, "api_key", default=None, help="require `Authorization: Bearer KEY` on /v1 and /metrics")
    _device_options(srv)
    _option(srv, "max_batch", type=int, default=16, help="KV-cache slots: sequences decoded together")
    _option(srv, "max_seq_len", type=int | None, default=None,
            help="tokens per sequence, prompt plus completion (default: the model's context); the KV cache "
                 "holds max_batch x max_seq_len")
    _option(srv, "max_queue", type=int, default=256, help="waiting requests beyond which the server answers 429")
    _option(srv, "prefill_chunk", type=int, default=256, help="prompt tokens prefilled per step")
    _option(srv, "compile", action=_flag(), help="compile the decode step (CUDA graphs on GPU)")
    _option(srv, "speculate", type=int, default=0,
            help="draft up to K tokens per request (without penalties) by prompt lookup and check them in the decode step (0: off)")
    _option(srv, "no_prefix_cache", action=_flag(),
            help="prefill every prompt in full (default: a prompt prefix whose keys and values a slot holds is copied)")
    _option(srv, "writes_per_step", type=int, default=8,
            help="with more streams than this, each stream gets its tokens every k-th step, k = ceil(streams / N), "
                 "so that the server writes about N chunks per step (0: every token at once)")
    _option(srv, "model_name", default=None, help="the model id clients ask for (default: the run's name)")
    _option(srv, "threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
    verbs.add_subcommand("serve", srv, help="OpenAI-compatible server (completions, chat, streaming)")

    sc = _parser("Scaling laws: fit a table of runs, plan a compute-optimal run.")
    verbs.add_subcommand("scaling", sc, help="fit scaling laws and plan compute")
    sc_verbs = sc.add_subcommands(dest="action", required=True)
    sc_sweep = _parser("Train a grid of model sizes x token budgets (or isoFLOP profiles) into OUT/results.jsonl; "
                       "started again, it skips finished runs and resumes an interrupted one.")
    _option(sc_sweep, "grid", required=True, help="YAML grid: sizes, tokens or flops, aspect_ratio, head_size, model, train, evals, objective")
    _option(sc_sweep, "data", required=True, help="prepared data directory (lmforge prepare)")
    _option(sc_sweep, "out", required=True, help="study directory (results.jsonl, runs/)")
    _option(sc_sweep, "devices", nargs="+", default=None,
            help="spread runs over these devices, one worker each (e.g. cuda:0 cuda:1); default: the grid's train.device")
    _json_flag(sc_sweep)
    sc_verbs.add_subcommand("sweep", sc_sweep, help="run the training grid of a study")
    sc_fit = _parser("Fit Kaplan power laws and Chinchilla approaches 1-3 (with bootstrap intervals) to DIR/results.jsonl.")
    sc_fit.add_argument("directory", type=str, help="a scaling study directory holding results.jsonl")
    _option(sc_fit, "approaches", nargs="+", default=None, choices=["kaplan", "approach1", "approach2", "approach3"],
            help="which fits (default: every one the runs support)")
    _option(sc_fit, "bootstrap", type=int, default=200, help="resamples for the confidence intervals; 0 for none")
    _option(sc_fit, "level", type=float, default=0.95, help="confidence level of the intervals")
    _json_flag(sc_fit)
    sc_verbs.add_subcommand("fit", sc_fit, help="fit laws to the runs of a study")
    sc_plan = _parser("The compute-optimal model size and token count for a budget, with loss and GPU time.")
    budget = sc_plan.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training compute C in FLOPs")
    budget.add_argument("--params", type=float, help="model parameters N")
    budget.add_argument("--tokens", type=float, help="training tokens D")
    _option(sc_plan, "law", default="chinchilla", help="chinchilla, besiroglu, or a fit.json from `lmforge scaling fit`")
    _option(sc_plan, "gpu", default="h100", help="h100, h100-pcie, h200, a100, a10 or l4")
    _option(sc_plan, "mfu", type=float, default=0.45, help="model FLOPs utilisation the run achieves")
    _option(sc_plan, "gpus", type=int, default=1, help="GPUs in parallel (wall time = GPU-hours / gpus)")
    _json_flag(sc_plan)
    sc_verbs.add_subcommand("plan", sc_plan, help="plan a compute-optimal run")

    imp = _parser("Convert a model from another format into an lmforge checkpoint.")
    verbs.add_subcommand("import", imp, help="import a Hugging Face directory or a GGUF file")
    imp_verbs = imp.add_subcommands(dest="format", required=True)
    for fmt, description, source, help in (
        ("hf", "Import a Hugging Face GPT-2, Llama or BERT directory (config.json, safetensors, tokenizer.json).",
         "Hugging Face model directory", "from Hugging Face format"),
        ("gguf", "Import a Llama-architecture GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1), tokenizer and chat "
         "template included.", ".gguf file", "from llama.cpp's GGUF"),
    ):
        sub = _parser(description)
        sub.add_argument("source", type=str, help=source)
        _option(sub, "out", required=True, help="checkpoint directory to write")
        _json_flag(sub)
        imp_verbs.add_subcommand(fmt, sub, help=help)

    exp = _parser("Write an lmforge checkpoint in another format.")
    verbs.add_subcommand("export", exp, help="export a checkpoint to Hugging Face format")
    exp_verbs = exp.add_subcommands(dest="format", required=True)
    exp_hf = _parser("Export a GPT-2-, Llama- or BERT-shaped checkpoint for transformers' Auto classes.")
    exp_hf.add_argument("checkpoint", type=str, help="checkpoint or run directory")
    _option(exp_hf, "out", required=True, help="directory to write")
    _json_flag(exp_hf)
    exp_verbs.add_subcommand("hf", exp_hf, help="to Hugging Face format")
    return root


def _config_key(arg: str) -> str:
    """`--train.skip-nonfinite` -> `--train.skip_nonfinite`: a dotted key names a dataclass field,
    and is accepted with dashes as every other option is."""
    key, eq, value = arg.partition("=")
    if not key.startswith("--") or "." not in key:
        return arg
    return "--" + key[2:].replace("-", "_") + eq + value


def _check_config_files(argv: Sequence[str]) -> None:
    """A `--config` file that jsonargparse would fail on with a traceback (not UTF-8, a bad `labels`) or a
    bare "Unexpected config: ..." (empty, only comments, a list, a group left empty): one line naming the
    file and the fix."""
    verb = argv[0] if argv else None
    if verb not in _GROUPS:  # the verbs that take --config; another says "unrecognized arguments"
        return
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.partition("=")[2])
        else:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--config {path} is not UTF-8 text; pass a YAML file") from None
        except OSError:
            continue  # a missing file, a directory or inline YAML: jsonargparse says what is wrong
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # jsonargparse names the line
        if config is None:
            raise UserError(f"--config {path} is empty (or only comments); write YAML keys into it "
                            "(e.g. `train: {max_steps: 100}`) or drop --config")
        if not isinstance(config, dict):
            raise UserError(f"--config {path} holds a YAML {type(config).__name__}, not a mapping of option keys "
                            "(e.g. `train: {max_steps: 100}`); write it as `key: value` lines")
        for key in _GROUPS.get(verb, ()):
            if key in config and not isinstance(config[key], dict):
                raise UserError(_group_message(key, config[key]))
        dashed = [f"{group}.{k}" if group else k for group, keys in [("", config), *((g, v) for g, v in config.items()
                  if isinstance(v, dict))] for k in keys if isinstance(k, str) and "-" in k]
        if dashed:  # jsonargparse matches a file's keys to the fields' names as they are
            raise UserError(f"--config {path} writes `{dashed[0]}` with dashes; in a config file write the field's name "
                            f"with underscores, `{dashed[0].replace('-', '_')}` (the command line takes either)")
        labels = config.get("labels") if verb == "finetune" else None
        if labels is not None and not isinstance(labels, list):
            raise UserError(f"`labels` in --config must be a list of label names, such as `labels: [pos, neg]`, "
                            f"but is {labels!r}; write it as a list")
        for label in labels or ():
            if not isinstance(label, str):
                raise UserError(f"`labels` in --config must be a list of label names, such as `labels: [pos, neg]`, but "
                                f"holds {label!r}, a YAML {type(label).__name__}; write each name as text in quotes")


# The dataclass groups of each verb, with an example for the message when a config leaves one empty.
_GROUPS = {"pretrain": ("model", "train"), "finetune": ("train", "lora")}
_GROUP_EXAMPLES = {"model": "model: {preset: tiny}", "train": "train: {max_steps: 100}", "lora": "lora: {r: 8}"}


def _group_message(key: str, value: Any) -> str:
    got = "empty" if value is None else f"{type(value).__name__} {value!r}"
    return (f"`{key}` in --config must be a mapping of its keys, such as `{_GROUP_EXAMPLES[key]}`, "
            f"but is {got}; fill it in or delete it")


def _check_groups(ns: Namespace) -> None:
    """jsonargparse takes `model:` left empty (None) or `model: [1, 2]` from a YAML file in place of the
    group's keys; the verb would then fail on attribute access. One line naming the key instead (a
    config file is checked before parsing too: jsonargparse reads some such files as no mapping at all)."""
    for key in _GROUPS.get(ns.verb, ()):
        value = ns[ns.verb][key]
        if not isinstance(value, Namespace):
            raise UserError(_group_message(key, value))


def parse(argv: Sequence[str]) -> Namespace:
    """Parse argv; a model preset (from the command line or a YAML file) becomes the defaults
    that explicit `--model.*` values override."""
    argv = [_config_key(a) for a in argv]
    _check_config_files(argv)
    # --print_config prints and exits inside parse_args: the first pass, which only finds the preset, must
    # not see it (it would print the defaults under the preset's name), nor check required options, as
    # --print_config does not; the last pass, with the preset's values as defaults, prints.
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    ns = build_parser().parse_args([a for a in argv if a not in printing], _skip_validation=bool(printing))
    _check_groups(ns)
    defaults = None
    if ns.verb == "pretrain" and ns.pretrain.model.preset:
        name = ns.pretrain.model.preset
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        defaults = {f"model.{k}": v for k, v in PRESETS[name].items()}
    if defaults or printing:
        ns = build_parser(defaults).parse_args(list(argv))
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if other_rank():  # rank 0 speaks for the run; errors still show
        sys.stdout = open(os.devnull, "w")
    stdout = sys.stdout
    if stdout is None:  # started with stdout closed (>&-): every verb's output or result would be lost
        if sys.stderr is not None:
            print("lmforge: error: stdout is closed; redirect it (> FILE, or > /dev/null to discard the output) "
                  "instead of closing it", file=sys.stderr)
        return 2
    sys.stdout = _Stdout(stdout)
    try:
        with _terminate_as_interrupt():
            return _run(argv)
    except BrokenPipeError:
        return _reader_gone()
    except _OutputFailed as e:
        _reader_gone()  # what is still buffered for stdout must not fail again at exit
        full = e.error.errno in _DISK_FULL
        why = "no space left on device" if full else f"writing to stdout failed ({e.error.strerror or e.error})"
        print(f"lmforge: error: {why} for the output (stdout); "
              + ("free space or redirect it elsewhere" if full else "redirect it elsewhere"), file=sys.stderr)
        return 2
    except Exception as e:
        message = _disk_full(e) or _out_of_memory(e)
        if message is None:  # a bug, not the machine: the traceback is what a report needs
            raise
        print(f"lmforge: error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler, `timeout`) ends a verb as Ctrl-C does, as KeyboardInterrupt: what
    it was writing cleans up (`atomic_dir` removes its temporary output) and the exit is one line,
    where the default action ended the process on the spot, leaving a hidden half-written folder. A
    verb that stops more gently sets its own handler over this one while it needs it (`pretrain`
    stops after the current step and saves) and puts this one back. Only where SIGTERM has its
    default action: a program that calls `main` and handles SIGTERM, or a parent that made it
    ignored, keeps its choice."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv: list[str]) -> int:
    try:
        ns = parse(argv)
        # Scaling fits solve thousands of 5-variable problems; OpenBLAS threads only slow those down.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from lmforge.cli import commands  # torch is imported only once the arguments are valid

        verb = {
            "tokenizer": lambda: f"tokenizer.{ns.tokenizer.action}",
            "scaling": lambda: f"scaling.{ns.scaling.action}",
            "import": lambda: f"import.{ns['import'].format}",  # `import` is a keyword: no attribute access
            "export": lambda: f"export.{ns.export.format}",
        }.get(ns.verb, lambda: ns.verb)()
        args = ns[verb]
        handler: Callable[[Namespace], dict[str, Any]] = commands.HANDLERS[verb]
        result = handler(args)
        if result is not None and args.get("json"):
            print(json.dumps(result, ensure_ascii=False))
        sys.stdout.flush()  # a stdout that cannot take the output fails here, not in the flush at exit
    except UserError as e:
        if not (e.every_process and other_rank()):
            print(f"lmforge: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except ArgumentError as e:
        message = " ".join(str(e).split())
        # A verb with actions (scaling plan, import hf) lists only them: the options are in the action's help.
        words = argv[:2] if len(argv) > 1 and argv[1] in ACTIONS.get(argv[0], ()) else argv[:1]
        hint = f"lmforge {' '.join(words)} --help" if argv and argv[0] in VERBS else "lmforge --help"
        print(f"lmforge: error: {message} (see `{hint}`)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not other_rank():  # torchrun's processes were all interrupted: one line
            print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


class _OutputFailed(Exception):
    """Writing to stdout failed (`> /dev/full`, a full disk behind `> file`): not a failure of the verb's --out."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Stdout:
    """sys.stdout, whose failed writes raise `_OutputFailed`, so that the one-line error can tell them from
    the verb's own files (an OSError from `write` names no file). A reader that has gone (BrokenPipeError)
    stays itself: that is a quiet stop."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        return self._guard(self._stream.flush)

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputFailed(e) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(e: BaseException) -> str | None:
    """The one-line message for a write that failed on a full disk (or quota), anywhere in `e`'s chain; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            where = f" ({e.filename})" if e.filename else ""
            return f"no space left on device{where}; free space or pass another --out"
        # safetensors' Rust writer reports the OS error in its message only.
        if type(e).__name__ == "SafetensorError" and ("No space left on device" in text or "Disk quota exceeded" in text):
            return "no space left on device; free space or pass another --out"
        # numpy's tofile reports a short write without an errno: what a full disk does to it.
        if isinstance(e, OSError) and e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", text):
            return f"a write stopped short ({text}): the disk is most likely full; free space or pass another --out"
        e = e.__cause__ or e.__context__
    return None


def _out_of_memory(e: BaseException) -> str | None:
    """The one-line message for an allocation that failed for want of memory; else None. Only the
    allocators' own errors: any other RuntimeError is a bug to see in full."""
    torch = sys.modules.get("torch")
    text = str(e)
    gpu = torch is not None and isinstance(e, torch.OutOfMemoryError)
    if not (gpu or isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in text)):
        return None
    size = re.search(r"allocate (\d+) bytes", text)  # torch's CPU allocator
    if size:
        detail = f"tried to allocate {_bytes(int(size.group(1)))}"
    else:  # CUDA: "Tried to allocate 20.00 GiB"; numpy: "Unable to allocate 8.00 PiB"
        size = re.search(r"allocate ([\d.]+ ?[KMGTPE]?i?B)", text)
        detail = f"tried to allocate {size.group(1)}" if size else first_line(e)
    return f"out of {'GPU ' if gpu else ''}memory ({detail}); lower the model or batch sizes"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def _reader_gone() -> int:
    """The reader of stdout has gone (`lmforge generate ... | head -3`): stop quietly, as `cat` does.
    stdout is pointed at /dev/null so that the flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (a test's capture): nothing flushes at exit
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a program the signal stopped


if __name__ == "__main__":
    raise SystemExit(main())
