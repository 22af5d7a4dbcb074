"""The FastAPI app of `freevlm serve`: OpenAI's `POST /v1/chat/completions` (plain and server-sent events),
`GET /v1/models`, `GET /health` and `GET /metrics`, over one `Scheduler` running in a background thread, or in a
process of its own (`SchedulerProcess`, remote.py: what `freevlm serve` runs).

    app = create_app(ServedModel(bundle, ee, "my-model"), ServerConfig(max_batch=8))
    uvicorn.run(app)          # or wrap it: any ASGI server, a Ray Serve deployment
    scheduler = SchedulerProcess(load, config)      # or: the model loaded and decoding in a child process
    app = create_app(scheduler.model, config, scheduler)

A request is checked (api.py), its image read and its prompt laid out (chat.py), then submitted: the scheduler
refuses what can never fit (400) and a full queue (429 with Retry-After). Tokens come from the scheduler's thread to
the event loop through `Handle.watch` and a `Relay` (relay.py: one wake-up of the loop per decode step for all the
requests, never a blocked thread per request). A request that times out, a client that disconnects, and a stop
string each cancel the handle: its row is free at the next step.
`/` is a live page (page.py) that streams answers from this API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..decoding.generate import analytic_speedup
from ..serving import Handle, QueueFull, Scheduler, TokenEvent
from .api import APIError, ChatRequest, validation_error
from .chat import TextStream, decode, image_bytes, layout_prompt, the_image
from .config import ServerConfig
from .metrics import ServerMetrics
from .page import page_routes
from .relay import Relay
from .remote import SchedulerProcess
from .served import ServedModel

# response ids: unique per run and request, without a system call each (os.urandom took ~0.4 ms on a loaded machine)
RUN, REQUEST_NUMBERS = secrets.token_hex(6), itertools.count()
# stands for a token chunk's delta, token and exit layer while TokenChunks cuts a chunk into its constant parts: found
# nowhere else in a chunk (one per run, for the reason above)
SLOT = secrets.token_hex(8)
# how the scheduler's reasons read in OpenAI's finish_reason
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DONE = "data: [DONE]\n\n"  # a stream's last event
# DecodeConfig names in the scheduler's messages -> the request's names
PARAMS = {"max_new_tokens": "max_tokens", **{name: name for name in ("threshold", "mode", "kv", "top_p", "seed")}}


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class ChatService:
    """One chat completion from request to response, over the shared scheduler."""

    def __init__(
        self,
        model: ServedModel,
        config: ServerConfig,
        scheduler: Scheduler | SchedulerProcess,
        metrics: ServerMetrics,
    ):
        self.model, self.config, self.scheduler, self.metrics = model, config, scheduler, metrics
        self.num_layers = model.num_layers
        self.default_prompt = config.prompt if config.prompt is not None else (model.prompt or "")
        self.default_threshold = config.default_threshold(model)[0]
        # images decoded and inputs made off the event loop, one request at a time (a Hugging Face tokenizer is not
        # safe to call from two threads), while the app runs
        self.inputs_worker: ThreadPoolExecutor | None = None
        self._relay: Relay | None = None  # made on the first request, for the loop the app runs on

    # --- request -> handle ----------------------------------------------------------------------------------------
    def options(self, request: ChatRequest) -> dict:
        """The request's decoding options, as `Scheduler.submit` keywords."""
        sampling = {}
        if request.temperature:  # OpenAI's temperature 0 is greedy; absent, so is ours (the answer `caption` gives)
            sampling = {"do_sample": True, "temperature": request.temperature}
            sampling |= {
                name: getattr(request, name) for name in ("top_p", "seed") if getattr(request, name) is not None
            }
        options = {
            "max_new_tokens": request.max_new_tokens or self.config.max_tokens,
            "threshold": request.threshold if request.threshold is not None else self.default_threshold,
        }
        options |= {name: getattr(request, name) for name in ("mode", "kv") if getattr(request, name) is not None}
        options |= sampling
        early = options.get("mode", "early_exit") == "early_exit" and options["threshold"] < 1
        if early and not self.model.has_exits:
            raise APIError(
                400,
                "this server has no exits (started without --exits): threshold must be 1.0, or mode 'full'",
                "threshold",
                "no_exits",
            )
        return options

    async def submit(self, request: ChatRequest) -> tuple[Handle, int]:
        """The request checked, its image read and its prompt laid out, queued: (its handle, its prompt tokens)."""
        if request.model != self.model.name:
            raise APIError(
                404,
                f"model '{request.model}' is not served here: this server serves '{self.model.name}' (GET /v1/models)",
                "model",
                "model_not_found",
            )
        options = self.options(request)
        url = the_image(request.messages)
        prompt = layout_prompt(request.messages, self.model.bundle, self.default_prompt)
        data = await image_bytes(url, self.config)
        inputs = await asyncio.get_running_loop().run_in_executor(self.inputs_worker, self._inputs, data, prompt)
        try:  # the family's own inputs (Gemma 3's token types, LLaVA-NeXT's image sizes...) travel with the prompt
            if isinstance(self.scheduler, SchedulerProcess):
                handle = await self.scheduler.submit(**inputs, **options)
            else:
                handle = self.scheduler.submit(**inputs, **options)
        except QueueFull as err:
            raise APIError(
                429, str(err), None, "queue_full", "rate_limit_error", {"Retry-After": str(self.config.retry_after)}
            ) from err
        except ValueError as err:
            name = re.search(rf"\b({'|'.join(PARAMS)})\b", str(err))
            raise APIError(400, str(err), PARAMS[name.group()] if name else None, "invalid_value") from err
        return handle, int(inputs["attention_mask"].sum())

    def _inputs(self, data: bytes, prompt: str) -> dict:
        return self.model.bundle.inputs([decode(data)], [prompt])

    # --- handle -> tokens -----------------------------------------------------------------------------------------
    async def events(
        self,
        handle: Handle,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        every_token: bool = True,
    ) -> AsyncIterator[list[TokenEvent]]:
        """The handle's tokens as they come, a batch per wake-up (woken for each token, or with `every_token=False`
        at its end only); the handle is cancelled if the caller stops early, the request times out (`APIError` 504)
        or the client goes (`ClientGone`, checked every second)."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = Relay(loop)
        deadline = loop.time() + self.config.request_timeout
        feed = self._relay.feed(handle, deadline, every_token=every_token)
        try:
            while True:
                feed.wake.clear()
                batch, ended = handle.poll()
                if batch:
                    yield batch
                if ended:
                    break
                if loop.time() >= deadline:
                    raise APIError(
                        504,
                        f"the request did not finish within the server's {self.config.request_timeout:g} s",
                        None,
                        "timeout",
                        "timeout",
                    )
                if feed.ticked:
                    feed.ticked = False
                    if disconnected is not None and await disconnected():
                        raise ClientGone()
                await feed.wake.wait()
        finally:
            feed.close()
            if not handle.done:
                handle.cancel()
        if handle.finish_reason == "error":
            try:
                handle.result(timeout=0)
            except Exception as err:
                raise APIError(500, f"the model failed: {err}", None, "model_error", "server_error") from err

    # --- the two kinds of answer ------------------------------------------------------------------------------------
    async def complete(self, request: ChatRequest, raw: Request) -> dict:
        """A plain answer: the loop is woken at its end only, or for each token where a stop string may end it
        early (so that its row is freed at once)."""
        handle, prompt_tokens = await self.submit(request)
        text, layers = TextStream(self.model.bundle.tokenizer, request.stop), []
        outcome = "cancelled"
        try:
            async for batch in self.events(handle, raw.is_disconnected, every_token=bool(request.stop)):
                self._take(batch, text, layers)
                if text.stopped:
                    break
            outcome = "success"
        except APIError as err:
            outcome = err.outcome
            raise
        finally:
            self.metrics.finished(outcome, prompt_tokens, layers, self._timings(handle, layers))
        message = {"role": "assistant", "content": text.text}
        choice = {"index": 0, "message": message, "finish_reason": self._finish_reason(handle, text), "logprobs": None}
        return self._envelope("chat.completion") | {
            "choices": [choice],
            "usage": self._usage(prompt_tokens, layers),
            "freevlm": self._summary(layers, request),
        }

    async def stream(self, request: ChatRequest, handle: Handle, prompt_tokens: int) -> AsyncIterator[str]:
        """Server-sent events: the role, then a chunk per wake-up with the tokens that came (one, unless the loop
        fell behind the scheduler: their text joined, see `TokenChunks`), a last chunk with the finish reason and
        the summary, the usage chunk if asked for, then [DONE]. A failure mid-stream is an error event. What comes
        at one wake-up goes out in one write (the role with the first tokens, the last chunks together, with the
        end of the body: `EventStream`): a write costs more than its bytes."""
        envelope = self._envelope("chat.completion.chunk")
        text, layers = TextStream(self.model.bundle.tokenizer, request.stop), []
        tokens = TokenChunks(envelope)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse(envelope | {"choices": [choice]} | extra)

        outcome, tail = "cancelled", []
        head = chunk({"role": "assistant", "content": ""})  # in the first write, with the first tokens
        try:
            async for batch in self.events(handle):
                deltas = self._take(batch, text, layers)
                yield head + tokens.chunk(deltas, batch[: len(deltas)])
                head = ""
                if text.stopped:
                    break
            rest = text.finish()
            delta = {"content": rest} if rest else {}
            tail = [chunk(delta, self._finish_reason(handle, text), freevlm=self._summary(layers, request))]
            if request.stream_options is not None and request.stream_options.include_usage:
                tail.append(_sse(envelope | {"choices": [], "usage": self._usage(prompt_tokens, layers)}))
            outcome = "success"
        except APIError as err:
            outcome = err.outcome
            tail = [_sse(err.body())]
        finally:
            self.metrics.finished(outcome, prompt_tokens, layers, self._timings(handle, layers))
        yield "".join([head, *tail, DONE])  # the end in one write

    # --- pieces of a response ---------------------------------------------------------------------------------------
    @staticmethod
    def _take(batch: list[TokenEvent], text: TextStream, layers: list[int]) -> list[str]:
        """Add tokens to the answer (up to a stop string); returns the text each one taken made final."""
        deltas = []
        for event in batch:
            if text.stopped:
                break
            deltas.append(text.add(event.token))
            layers.append(event.exit_layer)
        return deltas

    @staticmethod
    def _timings(handle: Handle, layers: list[int]) -> list[float]:
        """For the metrics: when the request came, and when each token of its answer was made."""
        return [handle.submitted, *handle.timings[: len(layers)]]

    @staticmethod
    def _finish_reason(handle: Handle, text: TextStream) -> str:
        return "stop" if text.stopped else FINISH_REASONS.get(handle.finish_reason, "stop")

    def _envelope(self, kind: str) -> dict:
        return {
            "id": f"chatcmpl-{RUN}{next(REQUEST_NUMBERS):x}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model.name,
        }

    @staticmethod
    def _usage(prompt_tokens: int, layers: list[int]) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(layers),
            "total_tokens": prompt_tokens + len(layers),
        }

    def _summary(self, layers: list[int], request: ChatRequest) -> dict:
        """freevlm's early-exit facts about an answer (definitions as in `DecodeStats`)."""
        return {
            "exit_layers": layers,
            "num_layers": self.num_layers,
            "mean_layers_per_token": sum(layers) / len(layers) if layers else 0.0,
            "analytic_speedup": analytic_speedup(layers, self.num_layers),
            "threshold": self.options(request)["threshold"],
        }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class TokenChunks:
    """A stream's token chunks, each the event `_sse(envelope | {"choices": [...], "freevlm": {...}})` gives, from
    pieces serialised once per stream: a stream sends a chunk per wake-up, and serialising their constant parts each
    time cost more than the rest of a chunk's way out.

    A chunk's `delta.content` is its tokens' text; `freevlm` lists each token's id (`tokens`) and exit layer
    (`exit_layers`), in order, and, where it holds several, each one's own text (`texts`, joined: the content), so
    that a client can still show each token by its layer."""

    def __init__(self, envelope: dict):
        choice = {"index": 0, "delta": {"content": SLOT}, "finish_reason": None, "logprobs": None}
        made = {"tokens": [SLOT], "exit_layers": [SLOT], "texts": [SLOT]}
        self.parts = _sse(envelope | {"choices": [choice], "freevlm": made}).split(f'"{SLOT}"')

    def chunk(self, deltas: list[str], events: list[TokenEvent]) -> str:
        """The chunk of `events`' tokens, `deltas` the text each one made final."""
        start, after_delta, after_tokens, before_texts, end = self.parts
        if len(events) == 1:  # no `texts`: `end` closes the exit layers' list as it closes the texts'
            event = events[0]
            return f"{start}{json.dumps(deltas[0])}{after_delta}{event.token}{after_tokens}{event.exit_layer}{end}"
        tokens = ", ".join(str(event.token) for event in events)
        layers = ", ".join(str(event.exit_layer) for event in events)
        texts = ", ".join(json.dumps(delta) for delta in deltas)
        content = json.dumps("".join(deltas))
        return f"{start}{content}{after_delta}{tokens}{after_tokens}{layers}{before_texts}{texts}{end}"


class EventStream(StreamingResponse):
    """A stream of server-sent events whose last event (it ends with `data: [DONE]`) goes out with the end of the
    body in one write, not two: a write to the socket costs more than its bytes."""

    async def stream_response(self, send: Callable[[dict], Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:
            if not ended:
                ended = chunk.endswith(DONE)
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(
    model: ServedModel, config: ServerConfig | None = None, scheduler: SchedulerProcess | None = None
) -> FastAPI:
    """The server for one model: its scheduler (a `Scheduler` in a thread, or the `SchedulerProcess` given, which
    loaded `model`) starts with the app and stops (after running requests) with it."""
    config = config or ServerConfig()
    config.validate()
    if scheduler is None:
        scheduler = config.scheduler(model.ee)
    metrics = ServerMetrics(scheduler, model.num_layers)
    service = ChatService(model, config, scheduler, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        service.inputs_worker = ThreadPoolExecutor(  # at the torch threads this one has, as the scheduler's thread
            1,
            thread_name_prefix="freevlm-inputs",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        try:
            yield
        finally:
            service.inputs_worker.shutdown()
            scheduler.stop()

    app = FastAPI(title="freevlm", summary="early-exit vision-language model server", lifespan=lifespan)
    app.state.service = service
    app.include_router(
        page_routes(
            model.name,
            service.num_layers,
            list(model.exit_layers) if model.has_exits else [],
            threshold=service.default_threshold,
            max_tokens=config.max_tokens,
            prompt=service.default_prompt,
        )
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            metrics.requests.labels(err.outcome).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return APIError(
            err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:  # a bug: logged by the server
        return APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, raw: Request):
        if not request.stream:
            try:
                return await service.complete(request, raw)
            except ClientGone:
                return Response(status_code=499)
        handle, prompt_tokens = await service.submit(request)
        return EventStream(service.stream(request, handle, prompt_tokens), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model.name)]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str) -> dict:
        if name != model.name:
            raise APIError(
                404, f"model '{name}' is not served here: this server serves '{model.name}'", "model", "model_not_found"
            )
        return _model_card(model.name)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if scheduler.alive else "stopped",
            "model": model.name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
        }
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


START = int(time.time())


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": START, "owned_by": "freevlm"}
