"""An OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat
template), server-sent-event streaming with `stream: true`, GET /health, GET /metrics
(Prometheus), and vLLM's POST /tokenize and /detokenize. Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for
a bad request (a prompt plus max_tokens over the context included), 401 without the API key,
404 for an unknown model, 429 when the queue is full. Besides OpenAI's fields, requests take
vLLM's `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`. A completion with `echo` and
`logprobs` (and `max_tokens` 0 or 1) scores its prompt, as lm-evaluation-harness's
`local-completions` model asks for a loglikelihood.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import secrets
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Union, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.infer import Engine, LanguageModel, QueueFull, SamplingParams, encode_chat
from lmforge.infer import Request as EngineRequest
from lmforge.serve.runner import EngineRunner
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


_dumps = json.JSONEncoder(ensure_ascii=False).encode


# ---- request bodies (their JSON schema is the server's OpenAPI schema) -----------------------


def _admits_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


@functools.cache
def _defaulted(model: type[BaseModel]) -> set[str]:
    """The fields of `model` that have a default and whose type has no null of its own."""
    return {name for name, f in model.model_fields.items() if not f.is_required() and not _admits_none(f.annotation)}


def _null_in_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema says what `_Body` takes: null too, for those fields."""
    for name in _defaulted(model) & schema.get("properties", {}).keys():
        prop = schema["properties"][name]
        keep = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **keep}


class _Body(BaseModel):
    """A request body in which an explicit null, for a field with a default, means that default:
    OpenAI types most of its fields "X or null" (temperature, n, stream, ...), and clients send
    null for "not given"."""

    model_config = ConfigDict(json_schema_extra=_null_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings that end the text")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string) -> a number added to its logits; -100 bans it")
    top_k: int = Field(0, ge=-1, description="vLLM extension; 0 or -1 (vLLM's default) disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension; 0 disables")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="vLLM extension; 1 disables")
    ignore_eos: bool = Field(False, description="vLLM extension: do not stop at end-of-text")
    stop_token_ids: list[StrictInt] | None = Field(None, description="vLLM extension: token ids that end the text")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text")


# How pydantic names the member of a union in an error's location ("content", "str", ...).
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]] = Field(
        description="text, texts, token ids, or lists of token ids (one completion per prompt)")
    max_tokens: int | None = Field(16, ge=0, description="0 (with echo) scores the prompt without generating")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="put the prompt's text (and with logprobs, its tokens' log-probabilities) "
                                          "before each completion's")


class TextPart(BaseModel):
    type: str = "text"
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "TextPart":  # an image or audio part would otherwise read as a bad string
        if self.type != "text":
            raise ValueError(f"only text content parts are supported, not {self.type!r}")
        if self.text is None:
            raise ValueError("a text content part needs its `text`")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = Field(None, union_mode="left_to_right")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text (with the prompt prefix completions give it, unless
    add_special_tokens is false), or messages through the checkpoint's chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


async def _on_disconnect(request: Request, then) -> None:
    """Call `then()` when the client goes away. The body has been read by now, so the next ASGI
    message is http.disconnect (as vLLM listens for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    then()


class _ApiKey:
    """Pure ASGI middleware (streams and client disconnects pass straight through): /v1, /metrics,
    /tokenize and /detokenize need `Authorization: Bearer KEY`; /health stays open for probes."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/metrics", "/tokenize", "/detokenize")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key; send `Authorization: Bearer KEY`", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- log-probabilities of byte-level tokens ------------------------------------------------------


def token_text(tok: Tokenizer, token: int) -> str:
    """A token's text for logprobs. A byte-level token may hold part of a multi-byte character
    (an emoji is often 2-4 tokens); OpenAI writes such a token as "bytes:" and its bytes escaped,
    "bytes:\\xf0\\x9f", where decoding the token alone would give U+FFFD."""
    raw = tok.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + raw.decode("utf-8", "backslashreplace")


class TextOffsets:
    """Where each token of one choice starts in its text (completions' `text_offset`): the length
    of the text that the bytes before it decode to, so a token that goes on with a character begun
    by the one before has that character's index. Called chunk after chunk, it goes on counting."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.chars = tok, 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back an unfinished character

    def __call__(self, tokens: list[int], within: int | None = None) -> list[int]:
        """The offsets of `tokens`, capped at `within` (the text's length so far: a stop string cuts it)."""
        offsets = []
        for t in tokens:
            offsets.append(self.chars if within is None else min(self.chars, within))
            self.chars += len(self._utf8.decode(self.tok.token_bytes(t)))
        return offsets


# ---- the app ------------------------------------------------------------------------------------


def build_app(lm: LanguageModel, engine: Engine, model_name: str = "lmforge", api_key: str | None = None,
              writes_per_step: int = 8) -> FastAPI:
    """The FastAPI app serving `lm` through `engine`; `app.state.runner` owns the engine thread
    (`writes_per_step`: see `EngineRunner`)."""
    app = FastAPI(title="lmforge", description="OpenAI-compatible API over an lmforge checkpoint", version="1")
    runner = EngineRunner(engine, writes_per_step=writes_per_step)
    app.state.runner = runner
    app.router.on_shutdown.append(runner.close)
    tok = lm.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its "loc" is ("body", character), not a field
            at = first.get("loc", (None, None))[-1]
            reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
            return APIError(400, f"the request body is not valid JSON: {reason} (at character {at})").response()
        # A value that fits no member of a union (content: a text or parts) fails once per member; the
        # deepest failure is the telling one (a part that is an image, not the content that is no string).
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default=first)
        loc = [p for p in first.get("loc", ())[1:] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
        where = ".".join(map(str, loc)) or None
        hint = ""
        if where is None and "json" not in request.headers.get("content-type", ""):  # `curl -d` sends a form
            hint = "; send the JSON with the header Content-Type: application/json"
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}{hint}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.running, "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runner.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    def encode(text: str, prefix: bool = True) -> list[int]:
        """A text prompt's ids, after the prompt prefix (a BOS) unless `prefix` is false."""
        try:
            return tok.encode_prompt(text) if prefix else tok.encode(text)
        except Exception:  # e.g. a lone surrogate that JSON allowed but UTF-8 cannot carry
            raise APIError(400, "the prompt is not valid Unicode text", param="prompt") from None

    def params_for(body: _Sampling, n_prompt: int, index: int, logprobs: int | None, max_tokens: int | None,
                   prompt_logprobs: int | None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop takes at most 4 strings", param="stop")
        if max_tokens is None:  # the rest of the context, which a prompt that fills it leaves none of
            if n_prompt >= engine.max_seq_len:
                raise APIError(400, f"the prompt is {n_prompt} tokens, which leaves none of the context of "
                               f"{engine.max_seq_len} to reply in; shorten the prompt", code="context_length_exceeded")
            max_tokens = engine.max_seq_len - n_prompt
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids, such as \"50256\"", param="logit_bias") from None
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, stop=tuple(stop), ignore_eos=body.ignore_eos,
            seed=None if body.seed is None else body.seed + index, logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=bias,
            stop_token_ids=tuple(body.stop_token_ids or ()), skip_special_tokens=body.skip_special_tokens,
        )

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           code="model_not_found", param="model")

    def encode_messages(messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        plain = []
        for m in messages:
            # text parts are joined by a newline, as vLLM joins them
            content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
            plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:  # a message that spells a special token gets its text, not the token
            return encode_chat(lm, plain, add_generation_prompt, name=model_name)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception:  # e.g. a lone surrogate that JSON allowed but UTF-8 cannot carry
            raise APIError(400, "the messages are not valid Unicode text", param="messages") from None

    async def start(body: _Sampling, prompts: list[list[int]], logprobs: int | None, max_tokens: int | None,
                    prompt_logprobs: int | None):
        """Submit n requests per prompt; returns the event queue and request ids (choice i = prompt i // n)."""
        check_model(body)
        queue: asyncio.Queue = asyncio.Queue()
        try:
            ids = runner.submit([(prompt, params_for(body, len(prompt), j, logprobs, max_tokens, prompt_logprobs), p * body.n + j)
                                 for p, prompt in enumerate(prompts) for j in range(body.n)], queue,
                                prompt_tokens=sum(len(p) for p in prompts))  # as usage() counts them
        except QueueFull as e:
            runner.metrics.rejected.labels("429").inc()
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="rate_limit_exceeded") from None
        except UserError as e:
            runner.metrics.rejected.labels("400").inc()
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
        return queue, ids

    def completion_logprobs(entries: list[dict], text_offset: list[int]) -> dict[str, Any]:
        """An entry with logprob None (an echoed prompt's first token: nothing predicts it) gets null, as OpenAI's."""
        return {
            "tokens": [token_text(tok, e["token"]) for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            # As OpenAI's and vLLM's: the `logprobs` likeliest tokens and always the sampled one (up to logprobs + 1).
            "top_logprobs": [None if e["logprob"] is None else
                             {**{token_text(tok, t): lp for t, lp in e["top"]}, token_text(tok, e["token"]): e["logprob"]}
                             for e in entries],
            "text_offset": text_offset,
        }

    def echoed_logprobs(req: EngineRequest, echo_text: str) -> tuple[list[dict], list[int]]:
        """The entries of an echoed prompt's tokens and their offsets in `echo_text`."""
        entries = [{"token": req.prompt[0], "logprob": None, "top": None}, *req.prompt_logprobs]
        return entries, TextOffsets(tok)(req.prompt, within=len(echo_text))

    def chat_logprobs(entries: list[dict]) -> dict[str, Any]:
        item = lambda t, lp: {"token": token_text(tok, t), "logprob": lp, "bytes": list(tok.token_bytes(t))}
        return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                            for e in entries]}

    def usage(prompts: list[list[int]], completion: int) -> dict[str, int]:
        n_prompt = sum(len(p) for p in prompts)
        return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}

    async def respond(request: Request, body: _Sampling, prompts: list[list[int]], chat: bool, logprobs: int | None,
                      max_tokens: int | None, echo: list[str | list[int]] | None = None):
        """`echo`: per prompt, its text or token ids, whose text goes before each of its completions."""
        # With echo and logprobs, each choice's logprobs begin with its prompt's (an evaluation harness's loglikelihood).
        scored = echo is not None and logprobs is not None
        queue, ids = await start(body, prompts, logprobs, max_tokens, logprobs if scored else None)
        if echo is not None:  # decoded only now that the engine has checked the ids
            echo = [p if isinstance(p, str) else tok.decode(p) for p in echo]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "object": kind + (".chunk" if chat and body.stream else ""), "created": int(time.time()),
                "model": model_name}
        n_choices = len(ids)

        def lp_block(entries: list[dict], text_offset: list[int]):
            if logprobs is None:
                return None
            return chat_logprobs(entries) if chat else completion_logprobs(entries, text_offset)

        if not body.stream:
            texts, reasons, lps, generated = [""] * n_choices, [None] * n_choices, [[] for _ in ids], 0
            done: list[EngineRequest | None] = [None] * n_choices
            pending = n_choices
            # A client that gives up (a timeout: the openai client then sends it all again, twice)
            # must free its slots now, not after max_tokens: the watcher's None ends the wait.
            watcher = asyncio.create_task(_on_disconnect(request, lambda: queue.put_nowait((None, None))))
            try:
                while pending:
                    tag, ev = await queue.get()
                    if tag is None:
                        return Response(status_code=499)  # nginx's "client closed request"; no one reads it
                    if ev.logprob is not None:
                        lps[tag].append(ev.logprob)
                    if ev.finished and ev.request.finish_reason == "error":
                        raise APIError(500, "the engine failed while generating; see the server log", type="server_error")
                    if ev.finished:
                        texts[tag], reasons[tag], pending = ev.request.text, ev.request.finish_reason, pending - 1
                        done[tag] = ev.request
                        generated += len(ev.request.output)
            finally:
                watcher.cancel()
                for r in ids:
                    runner.abort(r)
            choices = []
            for i in range(n_choices):
                entries = lps[i]
                offsets = TextOffsets(tok)([e["token"] for e in entries], within=len(texts[i])) if logprobs is not None else []
                if scored:
                    echoed, at = echoed_logprobs(done[i], echo[i // body.n])
                    entries, offsets = echoed + entries, at + [o + len(echo[i // body.n]) for o in offsets]
                c: dict[str, Any] = {"index": i, "finish_reason": reasons[i], "logprobs": lp_block(entries, offsets)}
                if chat:
                    c["message"] = {"role": "assistant", "content": texts[i]}
                else:
                    c["text"] = (echo[i // body.n] if echo else "") + texts[i]
                choices.append(c)
            return {**head, "choices": choices, "usage": usage(prompts, generated)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        # A chunk is the fixed head, one choice and (with include_usage) "usage": null; the head is
        # serialised once per response, not once per chunk.
        chunk_head = "data: " + _dumps(head)[:-1] + ', "choices": ['
        chunk_tail = ("], \"usage\": null}\n\n" if include_usage else "]}\n\n")

        async def events() -> AsyncIterator[str]:
            sent = lambda obj: f"data: {_dumps(obj)}\n\n"
            offsets, written = [TextOffsets(tok) for _ in range(n_choices)], [0] * n_choices
            # Per choice, the (entry, offset) pairs whose offset lies past the text written so far: the
            # engine holds back text that may begin a stop string, and a stop string would cap those
            # offsets at the final text's length. They go out once the text reaches them, or at the end,
            # so that the stream's offsets are the whole answer's.
            held: list[list[tuple[dict, int]]] = [[] for _ in range(n_choices)]
            generated, pending = 0, n_choices
            # An echoed prompt scored with logprobs goes out with its first event (its prefill is done then);
            # the completion's offsets then count from the end of the echoed text.
            unechoed = set(range(n_choices)) if scored else set()
            try:
                if chat:
                    for i in range(n_choices):
                        yield chunk_head + _dumps({"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}) + chunk_tail
                elif echo and not scored:
                    for i in range(n_choices):
                        yield chunk_head + _dumps({"index": i, "logprobs": None, "finish_reason": None,
                                                   "text": echo[i // body.n]}) + chunk_tail
                while pending:
                    # Whatever arrived while we were writing goes out together: one chunk per choice,
                    # so a loaded server sends fewer, larger chunks instead of falling behind.
                    arrived = [await queue.get()]
                    while not queue.empty():
                        arrived.append(queue.get_nowait())
                    merged: dict[int, list] = {}
                    for tag, ev in arrived:
                        merged.setdefault(tag, []).append(ev)
                    for tag, evs in merged.items():
                        if tag in unechoed:
                            unechoed.discard(tag)
                            echoed, at = echoed_logprobs(evs[0].request, echo[tag // body.n])
                            yield chunk_head + _dumps({"index": tag, "logprobs": lp_block(echoed, at), "finish_reason": None,
                                                       "text": echo[tag // body.n]}) + chunk_tail
                        text = "".join(ev.text for ev in evs)
                        entries = [ev.logprob for ev in evs if ev.logprob is not None]
                        last = evs[-1]
                        reason = last.request.finish_reason if last.finished else None
                        written[tag] += len(text)
                        if not chat and logprobs is not None:
                            held[tag] += zip(entries, offsets[tag]([e["token"] for e in entries]))
                            ready = len(held[tag]) if last.finished else sum(o <= written[tag] for _, o in held[tag])
                            out, held[tag] = held[tag][:ready], held[tag][ready:]
                            shift = len(echo[tag // body.n]) if scored else 0
                            entries, text_offset = [e for e, _ in out], [min(o, written[tag]) + shift for _, o in out]
                        else:
                            text_offset = []
                        if not text and reason is None and not entries:
                            continue
                        c: dict[str, Any] = {"index": tag, "logprobs": lp_block(entries, text_offset), "finish_reason": reason}
                        if chat:
                            c["delta"] = {"content": text} if text else {}
                        else:
                            c["text"] = text
                        if last.finished:
                            pending -= 1
                            generated += len(last.request.output)
                        yield chunk_head + _dumps(c) + chunk_tail
                if include_usage:
                    yield sent({**head, "choices": [], "usage": usage(prompts, generated)})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free every slot at once
                for r in ids:
                    runner.abort(r)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt: a text or a list of token ids
        if not prompt or any(len(p) == 0 for p in prompt):
            raise APIError(400, "prompt is empty", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing; it is for scoring a prompt with echo and logprobs",
                           param="max_tokens")
        return await respond(request, body, [encode(p) if isinstance(p, str) else p for p in prompt], False, body.logprobs,
                             body.max_tokens, prompt if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(request, body, [encode_messages(body.messages)], True, logprobs,
                             body.max_completion_tokens or body.max_tokens)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's: the token ids a completion (or chat completion) would give the model."""
        check_model(body)
        if body.messages is not None:
            ids = encode_messages(body.messages, body.add_generation_prompt)
        else:
            ids = encode(body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's: the text of token ids, special tokens included."""
        check_model(body)
        V = lm.model.config.vocab_size
        if (bad := next((t for t in body.tokens if not 0 <= t < V), None)) is not None:
            raise APIError(400, f"tokens hold token id {bad}, outside the model's vocabulary of {V}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app
