"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of a :class:`Scheduler`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both with ``stream: true`` (server-sent events, one chunk per generated token, then
``data: [DONE]``) or without; ``GET /v1/models``; ``GET /health``.

Every standard request field is accepted: the ones this server implements (sampling, penalties,
log-probabilities, stop strings, ...) at any valid value, the others (tools, logit_bias, response
formats, ...) at their default or no-op values only (``only(...)`` below), a 400 naming the field
otherwise.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed
JSON, unknown fields, wrong types and values out of range or over the server's limits, 404 for an
unknown model or route, 413 for a body over ``--max-request-bytes`` (answered before the body is
read), 429 when the queue is full, 503 while shutting down. A client that disconnects (streaming or
not) has its request cancelled and its slot freed. Prompts are tokenized on a worker thread, so a
long one does not hold up the event loop (running streams, ``/health``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lolcats.generation.sampling import Sampling
from lolcats.generation.text import chat_prompt
from lolcats.serving.logprobs import TokenPieces, chat_entry, completion_logprobs
from lolcats.serving.options import ServeOptions
from lolcats.serving.scheduler import Delta, Done, Failed, QueueFull, Request, Scheduler, ServerStopping

# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def only(*values) -> Any:
    """A field of a feature this server lacks: accepted left out, null or at one of ``values`` (its default
    or no-op values); anything else is refused with a 400 naming it (:func:`refuse_unsupported`)."""
    return Field(None, json_schema_extra={"only": list(values)})


def refuse_unsupported(body: BaseModel, prefix: str = "") -> None:
    for name, field in type(body).model_fields.items():
        allowed, value = (field.json_schema_extra or {}).get("only"), getattr(body, name)
        if allowed is None or value is None or any(type(value) is type(a) and value == a for a in allowed):
            continue
        accepted = " or ".join([json.dumps(a) for a in allowed] + ["null"])
        raise APIError(400, f"{prefix}{name} {json.dumps(value)[:80]} is not supported by this server (it accepts "
                            f"{accepted})", param=prefix + name, code="unsupported_value")


INT64 = Field(ge=-(2 ** 63), le=2 ** 63 - 1)


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # no-op: chunks are not padded


class _Sampling(_Body):
    """The fields both routes share; null is the default value for every optional field."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None  # 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None  # 1.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, INT64] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None
    logit_bias: Any = only({})
    ignore_eos: bool = False  # not OpenAI's: generate max_tokens whatever the model says (benchmarks)


class CompletionBody(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # the legacy form: how many top tokens
    echo: Any = only(False)
    best_of: Any = only(1)
    suffix: Any = only("")


class TextPart(_Body):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a caching hint: no-op


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: Any = only([])
    function_call: Any = only()
    audio: Any = only()


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Any = only([])
    tool_choice: Any = only("none", "auto")
    parallel_tool_calls: bool | None = None  # no-op without tools
    functions: Any = only([])
    function_call: Any = only("none", "auto")
    response_format: Any = only({"type": "text"})
    modalities: Any = only(["text"])
    audio: Any = only()
    prediction: Any = only()
    reasoning_effort: Any = only()
    verbosity: Any = only("medium")
    web_search_options: Any = only()
    store: Any = only(False)
    service_tier: Any = only("auto", "default")
    moderation: Any = only()
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # caching hints: no-ops
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None


# ---------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{}]
    mismatch = ("string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type")
    # of a union's errors, the deepest one (ties: not a mere type mismatch) says most about what was meant
    err = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") not in mismatch))
    if err.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})",
                              code="invalid_json")
    branches = ("str", "int", "float", "bool", "list[str]", "list[int]", "list[TextPart]")  # union members
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and p not in branches]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if param is None and kind == "missing":
        return error_response(400, "the request body is empty; expected a JSON object", code="empty_body")
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return error_response(400, "the request body must be a JSON object", code="invalid_body")
    if kind == "extra_forbidden":
        msg = f"unknown field {param!r}"
    elif kind == "missing":
        msg = f"missing field {param!r}"
    else:
        msg = f"{param or 'body'}: {err.get('msg', 'invalid value')}"
    return error_response(400, msg, param=param, code=kind or None)


# ---------------------------------------------------------------- the app


class Server:
    """Tokenizes, checks limits, submits to the scheduler and turns its events into OpenAI responses."""

    def __init__(self, scheduler: Scheduler, tokenizer, opts: ServeOptions, info: dict | None = None):
        self.scheduler, self.tok, self.opts = scheduler, tokenizer, opts
        self.info = info or {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="lolcats-tokenize")  # off the event loop
        self.pieces = TokenPieces(tokenizer)  # token texts and bytes of log-probabilities

    # -- events from the scheduler thread
    def deliver(self, events) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fan_out, events)

    @staticmethod
    def _fan_out(events) -> None:
        for req, ev in events:
            req.sink.put_nowait(ev)

    # -- requests
    def check(self, body: CompletionBody | ChatBody) -> None:
        """The model name, and the fields of features this server lacks at their no-op values only."""
        if body.model != self.opts.served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.opts.served_model_name!r}", param="model", code="model_not_found")
        refuse_unsupported(body)
        for i, m in enumerate(getattr(body, "messages", [])):
            refuse_unsupported(m, f"messages.{i}.")
        if getattr(body, "top_logprobs", None) and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    async def tokenize(self, prompt_ids, body) -> list[int]:
        """``prompt_ids(body)`` on the tokenizer's thread: the event loop goes on serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, prompt_ids, body)

    def _prompt_ids(self, body: CompletionBody) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            bad = [t for t in p if not 0 <= t < self.info.get("vocab_size", 1 << 62)]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
            return list(p)
        text = p[0] if isinstance(p, list) else p
        return self.tok(text)["input_ids"]

    def _chat_ids(self, body: ChatBody) -> list[int]:
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(x.text for x in m.content or [])}
                for m in body.messages]
        return self.tok(chat_prompt(self.tok, msgs), add_special_tokens=False)["input_ids"]

    def make_request(self, ids: list[int], max_tokens: int | None, body: _Sampling,
                     logprobs: int | None = None) -> Request:
        """``logprobs``: None, or how many top tokens to report with each token's log-probability."""
        o = self.opts
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", param="prompt")
        if len(ids) > o.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{o.max_prompt_tokens} (--max-prompt-tokens)", param="prompt",
                           code="context_length_exceeded")
        max_tokens = o.max_new_tokens if max_tokens is None else max_tokens
        if max_tokens > o.max_new_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {o.max_new_tokens} "
                                "(--max-new-tokens)", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        sampling = Sampling(_or(body.temperature, 1.0), _or(body.top_p, 1.0), seed, _or(body.frequency_penalty, 0.0),
                            _or(body.presence_penalty, 0.0), logprobs)
        return Request(ids, max_tokens, sampling, self.tok, stop, body.ignore_eos, sink=asyncio.Queue())

    def submit(self, req: Request) -> None:
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except ServerStopping as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    async def run(self, http: HTTPRequest, req: Request, body: _Sampling, chat: bool):
        """The response for ``req``: an SSE stream, or one JSON body when the sequence ends."""
        self.submit(req)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": self.opts.served_model_name,
                "object": "chat.completion.chunk" if chat and body.stream else
                ("chat.completion" if chat else "text_completion")}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(req, meta, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(http, req, meta, chat)

    def _logprobs(self, lps: list[tuple], chat: bool, offset: int = 0) -> dict:
        """Tokens ``lps`` (the ``logprobs`` of Deltas) as a choice's ``logprobs``; ``offset``: the text before."""
        if chat:
            return {"content": [chat_entry(self.pieces, lp) for lp in lps], "refusal": None}
        return completion_logprobs(self.pieces, lps, offset)

    async def _events(self, req: Request):
        """The request's events until its end, as lists of those already delivered (one when the consumer
        keeps up; more when it falls behind, so a response writes them at once); cancels the request if
        the consumer stops early."""
        try:
            while True:
                evs = [await req.sink.get()]
                while not req.sink.empty():
                    evs.append(req.sink.get_nowait())
                yield evs
                if isinstance(evs[-1], (Done, Failed)):  # the last event of a request
                    return
        finally:
            if not req.done:
                self.scheduler.cancel(req)

    async def _whole(self, http: HTTPRequest, req: Request, meta: dict, chat: bool) -> JSONResponse:
        async def collect():
            parts, lps = [], []
            async for evs in self._events(req):
                for ev in evs:
                    if isinstance(ev, Delta):
                        parts.append(ev.text)
                        lps += [ev.logprobs] if ev.logprobs else []
                    elif isinstance(ev, Failed):
                        raise APIError(503 if ev.stopping else 500, ev.message, type="server_error",
                                       code="shutting_down" if ev.stopping else None)
                    else:
                        return "".join(parts), lps, ev

        async def disconnected():
            while (await http.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: cancelling the collector cancels the request
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return error_response(499, "the client closed the request", code="client_closed")
        watch.cancel()
        text, lps, done = work.result()
        logprobs = None if req.sampling.logprobs is None else self._logprobs(lps, chat)
        choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": logprobs}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(done)})

    async def _sse(self, req: Request, meta: dict, chat: bool, include_usage: bool):
        head = json.dumps(meta)[:-1]  # '{"id": ..., "model": ...' : the fields every chunk repeats

        def chunk(choices, **extra) -> str:
            return f"data: {head}, {json.dumps({'choices': choices, **extra})[1:]}\n\n"

        offset = 0  # of the legacy logprobs' text_offset

        def choice(text: str | None, finish: str | None, lp: tuple | None = None) -> dict:
            nonlocal offset
            logprobs = None if lp is None else self._logprobs([lp], chat, offset)
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            offset += len(logprobs["tokens"][0]) if logprobs else 0
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

        # a text delta without log-probabilities, the chunk of nearly every token: its JSON around the text's
        before, _, after = chunk([choice("\0", None)]).rpartition(json.dumps("\0"))
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}])
        async for evs in self._events(req):  # one event per chunk; the chunks of a batch in one write
            out = []
            for ev in evs:
                if isinstance(ev, Delta) and ev.logprobs is None:
                    out.append(before + json.dumps(ev.text) + after)
                elif isinstance(ev, Delta):
                    out.append(chunk([choice(ev.text, None, ev.logprobs)]))
                elif isinstance(ev, Failed):
                    error = {"message": ev.message, "type": "server_error", "param": None,
                             "code": "shutting_down" if ev.stopping else None}
                    yield "".join(out) + f"data: {json.dumps({'error': error})}\n\n"
                    return
                else:
                    out.append(chunk([choice(None, ev.finish_reason)]))
                    if include_usage:
                        out.append(chunk([], usage=_usage(ev)))
                    out.append("data: [DONE]\n\n")
            yield "".join(out)


def _or(value, default):
    """A request field's value, ``default`` where it was left out or null."""
    return default if value is None else value


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app reads it: at once by its
    Content-Length, or (chunked) as soon as the bytes read pass the limit, before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if int(length) > self.limit:
                return await self._refuse(scope, receive, send, f"is {int(length)} bytes")
            return await self.app(scope, receive, send)
        read, size = [], 0  # no Content-Length: read up to the limit, then hand the app what was read
        while not read or (read[-1]["type"] == "http.request" and read[-1].get("more_body")):
            read.append(await receive())
            size += len(read[-1].get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send, f"is over {self.limit} bytes")

        async def replay():
            return read.pop(0) if read else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        await error_response(413, f"the request body {size}; this server accepts at most {self.limit} bytes "
                                  "(--max-request-bytes)", code="request_too_large")(scope, receive, send)


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def create_app(server: Server) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler thread."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.loop = asyncio.get_running_loop()
        server.scheduler.deliver = server.deliver
        if server.scheduler.thread is None:
            server.scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.stop)
        server.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lolcats", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=server.opts.request_bytes_limit())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "stopping" if server.scheduler.stopping else "ok", **server.scheduler.stats(),
                **server.info}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.opts.served_model_name, "object": "model",
                                            "created": server.info.get("created", 0), "owned_by": "lolcats"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        server.check(body)
        ids = await server.tokenize(server._prompt_ids, body)
        req = server.make_request(ids, body.max_tokens, body, body.logprobs)
        return await server.run(http, req, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        server.check(body)
        ids = await server.tokenize(server._chat_ids, body)
        max_tokens = _or(body.max_completion_tokens, body.max_tokens)
        req = server.make_request(ids, max_tokens, body, _or(body.top_logprobs, 0) if body.logprobs else None)
        return await server.run(http, req, body, chat=True)

    return app
