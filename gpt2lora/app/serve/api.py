"""The HTTP API: OpenAI's completions, chat completions and models, vLLM's ``/classify`` and adapter loading.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ...errors import GPT2LoRAError
from .engine import EngineStopped, GenerationRequest, QueueFull
from .models import Forbidden, NotFound, ServedModels, inside_root
from .schemas import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Sampling,
    parse_chat,
    parse_classify,
    parse_completion,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                   "param": param, "code": code}}, status_code=status)


def as_error(err: BaseException) -> JSONResponse:
    """The response of an error raised while handling a request."""
    if isinstance(err, BadRequest):
        return error(err.status, err.message, err.param, err.code)
    if isinstance(err, NotFound):
        return error(404, str(err), "model", "model_not_found")
    if isinstance(err, Forbidden):
        return error(403, str(err), "lora_path")
    if isinstance(err, QueueFull):
        return error(429, str(err))
    if isinstance(err, EngineStopped):
        return error(503, str(err))
    if isinstance(err, GPT2LoRAError):
        return error(400, " ".join(str(err).split()))
    raise err


class Stream:
    """Events of a request's choices, carried from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def emitter(self, index: int):
        def emit(text: str, token: int | None, reason: str | None) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, text, token, reason))
        return emit


class Api:
    """The routes of one server; ``api_key`` (None: open) and ``adapter_root`` (None: no loading at run time)."""

    def __init__(self, served: ServedModels, api_key: str | None = None, adapter_root: str | None = None,
                 shutdown_timeout: float = 30.0) -> None:
        self.served = served
        self.api_key = api_key
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.shutdown_timeout = shutdown_timeout

    # ------------------------------------------------------------------ plumbing

    def authorised(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    async def body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"the request body is not valid JSON: {err}") from None

    def route(self, handler):
        async def endpoint(request: Request) -> Response:
            if not self.authorised(request):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")
            try:
                return await handler(request)
            except Exception as err:  # noqa: BLE001 - an error response, whatever went wrong
                try:
                    return as_error(err)
                except Exception:  # noqa: BLE001
                    return error(500, f"internal error: {type(err).__name__}: {err}")
        return endpoint

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.route(self.models), methods=["GET"]),
                Route("/v1/completions", self.route(self.completions), methods=["POST"]),
                Route("/v1/chat/completions", self.route(self.chat), methods=["POST"]),
                Route("/classify", self.route(self.classify), methods=["POST"]),
                Route("/v1/load_lora_adapter", self.route(self.load_adapter), methods=["POST"]),
                Route("/v1/unload_lora_adapter", self.route(self.unload_adapter), methods=["POST"]),
                Route("/health", self.health, methods=["GET"])]

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.served.engine.stats()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.served.listing()})

    def tokens(self, prompt: str | list[int], params: Sampling, param: str) -> tuple[list[int], int]:
        """Token ids of ``prompt`` and the number of new tokens, checked against the context and the limits."""
        served = self.served
        ids = served.tokenizer.encode_ordinary(prompt) if isinstance(prompt, str) else prompt
        vocab = served.model.config.vocab_size
        if not ids:
            raise BadRequest(f"{param}: the prompt is empty; give at least one token", param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab - 1}]", param)
        context = served.context
        limit = served.max_tokens
        if params.max_tokens is not None and params.max_tokens > limit:
            raise BadRequest(f"max_tokens={params.max_tokens} is more than this server's limit of {limit} "
                             "(--max-tokens)", "max_tokens")
        if len(ids) >= context:
            raise BadRequest(f"{param}: the prompt has {len(ids)} tokens, the context length is {context}; "
                             "shorten it", param)
        new = params.max_tokens
        if new is None:
            new = min(16 if isinstance(params, CompletionRequest) else limit, limit, context - len(ids))
        if len(ids) + new > context:
            raise BadRequest(f"the prompt has {len(ids)} tokens and max_tokens={new}: {len(ids) + new} is more "
                             f"than the context length {context}; ask for at most {context - len(ids)} tokens",
                             "max_tokens")
        return ids, new

    def start(self, prompts: list[str | list[int]], params: Sampling, param: str, adapter: str
              ) -> tuple[Stream, list[GenerationRequest]]:
        stream = Stream(asyncio.get_running_loop())
        checked = [self.tokens(p, params, param) for p in prompts]
        seqs = [GenerationRequest(ids, adapter, new, stream.emitter(i), self.served.tokenizer.decode,
                                  temperature=params.temperature, top_p=params.top_p if params.top_p < 1 else None,
                                  seed=params.seed, stop=params.stop)
                for i, (ids, new) in enumerate(checked)]
        submitted = []
        try:
            for seq in seqs:
                self.served.engine.submit(seq)
                submitted.append(seq)
        except Exception:
            for seq in submitted:
                self.served.engine.cancel(seq)
            raise
        return stream, seqs

    async def completions(self, request: Request) -> Response:
        params = parse_completion(await self.body(request))
        adapter = self.served.get(params.model, "generate")
        stream, seqs = self.start(params.prompts, params, "prompt", adapter)
        return await self.respond(request, params, stream, seqs, chat=False)

    async def chat(self, request: Request) -> Response:
        params = parse_chat(await self.body(request))
        adapter = self.served.get(params.model, "generate")
        stream, seqs = self.start([params.prompt], params, "messages", adapter)
        return await self.respond(request, params, stream, seqs, chat=True)

    async def respond(self, request: Request, params: CompletionRequest | ChatRequest, stream: Stream,
                      seqs: list[GenerationRequest], chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if params.stream:
            return StreamingResponse(self.sse(rid, created, params, stream, seqs, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [""] * len(seqs)
        reasons: list[str | None] = [None] * len(seqs)
        try:
            while any(r is None for r in reasons):
                try:
                    index, text, _, reason = await asyncio.wait_for(stream.queue.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                texts[index] += text
                reasons[index] = reason or reasons[index]
        finally:
            self.cancel_unfinished(seqs)
        failed = [r for r in reasons if r and r.startswith("error")]
        if failed:
            return error(500, f"generation failed: {failed[0][len('error: '):]}")
        usage = usage_of(seqs)
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                        "finish_reason": reasons[0], "logprobs": None}]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": params.model, "choices": choices, "usage": usage})

    def cancel_unfinished(self, seqs: list[GenerationRequest]) -> None:
        for seq in seqs:
            if seq.finish_reason is None:
                self.served.engine.cancel(seq)

    async def sse(self, rid: str, created: int, params: CompletionRequest | ChatRequest, stream: Stream,
                  seqs: list[GenerationRequest], chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": params.model, "choices": choices,
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}])
            open_choices = len(seqs)
            while open_choices:
                index, text, _, reason = await stream.queue.get()
                if reason is not None and reason.startswith("error"):
                    payload = {"error": {"message": f"generation failed: {reason[len('error: '):]}",
                                         "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(payload)}\n\n"
                    open_choices -= 1
                    continue
                if not text and reason is None:
                    continue
                if chat:
                    delta = {"content": text} if text else {}
                    yield chunk([{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}])
                else:
                    yield chunk([{"index": index, "text": text, "finish_reason": reason, "logprobs": None}])
                if reason is not None:
                    open_choices -= 1
            if params.include_usage:
                yield chunk([], usage=usage_of(seqs))
            yield "data: [DONE]\n\n"
        finally:  # a client that went away (the task is cancelled) frees its slots now
            self.cancel_unfinished(seqs)

    async def classify(self, request: Request) -> Response:
        params = parse_classify(await self.body(request))
        served = self.served
        served.get(params.model, "classify")
        texts = [served.tokenizer.encode_ordinary(t) for t in params.inputs]
        for i, ids in enumerate(texts):
            if len(ids) > served.context:
                raise BadRequest(f"input[{i}] has {len(ids)} tokens, more than the context length {served.context}",
                                 "input")
        probs = await asyncio.get_running_loop().run_in_executor(None, served.classify, params.model, texts)
        labels = served.adapters[params.model].label_names
        data = [{"index": i, "label": labels[max(range(len(p)), key=p.__getitem__)], "probs": p,
                 "num_classes": len(p)} for i, p in enumerate(probs)]
        tokens = sum(len(t) for t in texts)
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": params.model, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    def _runtime_loading(self) -> Path:
        if self.adapter_root is None:
            raise BadRequest("loading adapters at run time is off; start the server with --adapter-root DIR",
                             status=404, code="not_enabled")
        return self.adapter_root

    async def load_adapter(self, request: Request) -> Response:
        root = self._runtime_loading()
        body = await self.body(request)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object with lora_name and lora_path")
        unknown = sorted(set(body) - {"lora_name", "lora_path", "load_inplace"})
        if unknown:
            raise BadRequest(f"unknown parameter {unknown[0]!r}", unknown[0])
        for key in ("lora_name", "lora_path"):
            if not isinstance(body.get(key), str):
                raise BadRequest(f"{key}: expected a string", key)
        path = inside_root(root, body["lora_path"])
        if not path.is_dir():
            raise BadRequest(f"lora_path {body['lora_path']!r}: no such folder under the adapter root", "lora_path")
        name = body["lora_name"]
        await asyncio.get_running_loop().run_in_executor(None, self.served.load, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        self._runtime_loading()
        body = await self.body(request)
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str):
            raise BadRequest("lora_name: expected a string", "lora_name")
        unknown = sorted(set(body) - {"lora_name", "lora_int_id"})
        if unknown:
            raise BadRequest(f"unknown parameter {unknown[0]!r}", unknown[0])
        name = body["lora_name"]
        await asyncio.get_running_loop().run_in_executor(None, self.served.unload, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def usage_of(seqs: list[GenerationRequest]) -> dict[str, int]:
    prompt = sum(len(s.prompt) for s in seqs)
    completion = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(served: ServedModels, api_key: str | None = None, adapter_root: str | None = None) -> Starlette:
    """The ASGI application serving ``served``; closing it (lifespan shutdown) stops the engine."""
    api = Api(served, api_key, adapter_root)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, served.close, api.shutdown_timeout)

    app = Starlette(routes=api.routes(), lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.api = api
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"no endpoint {request.method} {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}")
