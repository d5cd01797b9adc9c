"""The ASGI app of `specdec serve` (Starlette): OpenAI's chat and completions endpoints, models,
health and Prometheus metrics, over one worker thread (worker.py).

Every error is OpenAI-style JSON with its status; no traceback reaches a client (it goes to the
server's log), and a failed request leaves the server running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from specdec.errors import SpecdecError
from specdec.serve import api
from specdec.serve.api import ApiError
from specdec.serve.metrics import ServerMetrics
from specdec.serve.worker import Job, Worker

logger = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting for a row; more are answered 503
    api_key: str | None = None  # when set, /v1/* need "Authorization: Bearer <key>"
    timeout: float = 300.0  # seconds a request may take, queueing included
    max_body: int = 1_000_000  # bytes of a request body


DRAIN = 64_000_000  # bytes of an oversized body read before answering 413


class ClientGone(Exception):
    pass


def create_app(decoder, model: str, settings: ServeSettings) -> Starlette:
    metrics = ServerMetrics(settings.max_batch)
    worker = Worker(decoder, settings.max_batch, settings.max_queue, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()  # after the server stopped taking requests: cancels what still runs

    def endpoint(name: str, handler, protected: bool = True):
        async def run(request: Request) -> Response:
            try:
                if protected:
                    _authorize(request, settings.api_key)
                response = await handler(request)
            except ApiError as error:
                headers = {"Retry-After": "1"} if error.status == 503 else None
                response = JSONResponse(error.body(), error.status, headers)
            except ClientGone:
                response = Response(status_code=499)
            except Exception:
                logger.exception("request to %s failed", name)
                response = JSONResponse({"error": {"message": "internal error; see the server log", "type": "server_error",
                                                   "code": None, "param": None}}, 500)
            metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return run

    async def complete(request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        parsed = api.parse(await _read_json(request, settings.max_body), chat, model)
        try:
            prepared = decoder.prepare(parsed.prompt, parsed.messages, parsed.generation, parsed.fit_context)
        except SpecdecError as error:
            code = "context_length_exceeded" if "context" in str(error) else None
            raise ApiError(400, str(error), code) from None
        job = Job(prepared, time.monotonic() + settings.timeout, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {settings.max_queue} requests are waiting already; retry later",
                           "queue_full") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        text = api.Text(decoder.tokenizer, prepared.stopper.stop)
        answer = Answer(chat, ident, int(time.time()), model, len(prepared.prompt_ids), text, start, metrics)
        if parsed.stream:
            return StreamingResponse(answer.stream(job, parsed.include_usage), media_type="text/event-stream")
        while True:
            kind, value = await _next_event(job, request)
            if kind == "tokens":
                answer.tokens(value)
            else:
                return JSONResponse(answer.final(kind, value))

    async def chat(request):
        return await complete(request, True)

    async def completions(request):
        return await complete(request, False)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "specdec"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": model, "running": len(worker.jobs),
                             "queued": worker.queue.qsize()})

    async def prometheus(request):
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            error = ApiError(404, f"no route {request.method} {request.url.path}", "not_found")
        else:
            error = ApiError(exc.status_code, exc.detail)
        return JSONResponse(error.body(), exc.status_code)

    routes = [
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/models", endpoint("models", models)),
        Route("/health", endpoint("health", health, protected=False)),
        Route("/metrics", endpoint("metrics", prometheus, protected=False)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.worker, app.state.metrics = worker, metrics
    return app


class Answer:
    """One request's answer, built from its job's events: a JSON body, or server-sent events."""

    def __init__(self, chat, ident, created, model, prompt_tokens, text: api.Text, start: float, metrics: ServerMetrics):
        self.chat, self.ident, self.created, self.model = chat, ident, created, model
        self.prompt_tokens, self.text, self.start, self.metrics = prompt_tokens, text, start, metrics
        self.first_token = False

    def tokens(self, block: list[int]) -> str:
        if not self.first_token:
            self.first_token = True
            self.metrics.first_token_seconds.observe(time.perf_counter() - self.start)
        return self.text.add(block)

    def final(self, kind: str, sequence) -> dict:
        """The whole answer (or raise the job's error)."""
        self._check(kind, sequence)
        return api.response(self.chat, self.ident, self.created, self.model, self.text.full(), api.finish_reason(sequence),
                            self._usage(sequence), api.speculative(sequence.metrics))

    async def stream(self, job: Job, include_usage: bool):
        """Chunks as OpenAI streams them, then `data: [DONE]`. A client that leaves cancels the job."""
        head = (self.chat, self.ident, self.created, self.model)
        try:
            if self.chat:
                yield _sse(api.chunk(*head, text="", first=True))
            while True:
                kind, value = await job.events.get()
                if kind == "tokens":
                    delta = self.tokens(value)
                    if delta:
                        yield _sse(api.chunk(*head, text=delta))
                    continue
                try:
                    self._check(kind, value)
                except ApiError as error:
                    yield _sse(error.body())
                    break
                last = api.chunk(*head, text=self.text.rest(), reason=api.finish_reason(value))
                last["metrics"] = api.speculative(value.metrics)
                yield _sse(last)
                if include_usage:
                    yield _sse({**api.chunk(*head), "usage": self._usage(value), "metrics": last["metrics"]})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # finished, or the client left: the worker drops it if it still runs

    def _check(self, kind: str, sequence) -> None:
        if kind == "timeout":
            raise ApiError(504, "the request ran past the server's time limit (--timeout); ask for fewer tokens", "timeout")
        if kind == "cancelled":
            raise ApiError(503, "the server is shutting down; retry on another", "shutting_down")
        if kind == "error":
            raise ApiError(500, sequence, "decoding_failed")
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.generation_tokens.inc(len(sequence.generated))
        self.metrics.request_seconds.observe(time.perf_counter() - self.start)

    def _usage(self, sequence) -> dict:
        return api.usage(self.prompt_tokens, len(sequence.generated))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key>", "invalid_api_key")


async def _read_json(request: Request, limit: int):
    """The body as JSON. A body over `limit` bytes is read on (and dropped) up to DRAIN bytes
    before the 413, so that a client still sending gets the answer instead of a reset connection."""
    body, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            body += part
        elif size > DRAIN:
            break
    if size > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body)", "request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})", "invalid_json") from None


async def _next_event(job: Job, request: Request):
    """The job's next event; a client that disconnected meanwhile cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), 0.25)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise ClientGone from None
