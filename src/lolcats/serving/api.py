"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of a :class:`Scheduler`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both with ``stream: true`` (server-sent events, one chunk per generated token, then
``data: [DONE]``) or without; ``GET /v1/models``; ``GET /health``.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed
JSON, unknown fields, wrong types and values out of range or over the server's limits, 404 for an
unknown model or route, 429 when the queue is full, 503 while shutting down. A client that
disconnects (streaming or not) has its request cancelled and its slot freed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lolcats.generation.text import chat_prompt
from lolcats.serving.engine import Sampling
from lolcats.serving.options import ServeOptions
from lolcats.serving.scheduler import Delta, Done, Failed, QueueFull, Request, Scheduler, ServerStopping

# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: bool = False  # not OpenAI's: generate max_tokens whatever the model says (benchmarks)


class CompletionBody(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


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

    # -- events from the scheduler thread
    def deliver(self, events) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fan_out, events)

    @staticmethod
    def _fan_out(events) -> None:
        for req, ev in events:
            req.sink.put_nowait(ev)

    # -- requests
    def _check_model(self, name: str) -> None:
        if name != self.opts.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.opts.served_model_name!r}", param="model", code="model_not_found")

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
                 "content": m.content if isinstance(m.content, str) else "".join(x.text for x in m.content)}
                for m in body.messages]
        return self.tok(chat_prompt(self.tok, msgs), add_special_tokens=False)["input_ids"]

    def make_request(self, ids: list[int], max_tokens: int | None, body: _Sampling) -> Request:
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
        sampling = Sampling(body.temperature, body.top_p, seed)
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
            parts = []
            async for evs in self._events(req):
                for ev in evs:
                    if isinstance(ev, Delta):
                        parts.append(ev.text)
                    elif isinstance(ev, Failed):
                        raise APIError(500, ev.message, type="server_error")
                    else:
                        return "".join(parts), ev

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
        text, done = work.result()
        choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(done)})

    async def _sse(self, req: Request, meta: dict, chat: bool, include_usage: bool):
        head = json.dumps(meta)[:-1]  # '{"id": ..., "model": ...' : the fields every chunk repeats

        def chunk(choices, **extra) -> str:
            return f"data: {head}, {json.dumps({'choices': choices, **extra})[1:]}\n\n"

        def choice(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}])
        async for evs in self._events(req):  # one event per chunk; the chunks of a batch in one write
            out = []
            for ev in evs:
                if isinstance(ev, Delta):
                    out.append(chunk([choice(ev.text, None)]))
                elif isinstance(ev, Failed):
                    error = {"message": ev.message, "type": "server_error", "param": None, "code": None}
                    yield "".join(out) + f"data: {json.dumps({'error': error})}\n\n"
                    return
                else:
                    out.append(chunk([choice(None, ev.finish_reason)]))
                    if include_usage:
                        out.append(chunk([], usage=_usage(ev)))
                    out.append("data: [DONE]\n\n")
            yield "".join(out)


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

    app = FastAPI(title="lolcats", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

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
        server._check_model(body.model)
        req = server.make_request(server._prompt_ids(body), body.max_tokens, body)
        return await server.run(http, req, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        server._check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req = server.make_request(server._chat_ids(body), max_tokens, body)
        return await server.run(http, req, body, chat=True)

    return app
