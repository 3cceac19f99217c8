"""The OpenAI-compatible HTTP ingress, and the same API for Python through Serve handles.

`completions(body)` and `chat(body)` take the OpenAI request as a dict and return the response
object (or, with "stream": true, an async generator of chunk objects); the HTTP routes call them
and frame the result as JSON or server-sent events. Tokenization and detokenization happen
here; the scheduler sees token ids only.
"""
# No `from __future__ import annotations` here: FastAPI resolves route annotations at runtime.


import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.detokenize import TokenTexts
from deploy.outputs import Delta, OutputAssembler
from deploy.prepare import ModelLimits, PromptBuilder, check_length, check_vocab
from deploy.protocol import APIError, ChatRequest, CompletionRequest, parse
from deploy.responses import ChatFormat, CompletionFormat, new_id, usage
from deploy.scheduler_stream import SchedulerLost, SchedulerStream, Subscription
from deploy.tokenizer import load_tokenizer, served_model_name
from monitoring.metrics import CONTENT_TYPE

logger = logging.getLogger("fluidserve.ingress")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
SCHEDULER_RETRY_AFTER_S = 5  # what a client is told to wait when the scheduler is restarting

app = FastAPI(title="fluidserve", description="OpenAI-compatible LLM serving with Nested WAIT")


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error")
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "internal_error").body(),
                        status_code=500)


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    # Headers (200) are out already: a failure mid-stream can only be reported in-band, as an
    # OpenAI-style error event, and the stream still ends cleanly so clients do not hang.
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n".encode()
    except Exception as exc:
        logger.exception("stream failed")
        err = APIError(500, f"internal error: {type(exc).__name__}", "internal_error")
        yield f"data: {json.dumps(err.body())}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _scheduler_lost(exc: Exception) -> APIError:
    """The scheduler replica died under a request (Serve restarts it): a clear, retryable 503."""
    logger.warning("scheduler call failed: %s: %s", type(exc).__name__, exc)
    return APIError(503, "the scheduler restarted and could not take this request back; retry it",
                    "service_unavailable_error", code="scheduler_unavailable",
                    headers={"Retry-After": str(SCHEDULER_RETRY_AFTER_S)})


def _stream_error(msg: dict) -> APIError:
    """A request that failed after admission: a model error (500), a queue timeout (503 with
    Retry-After), no model actor left (503)."""
    status = int(msg.get("status") or 500)
    if status >= 500 and status != 503:
        return APIError(status, f"generation failed: {msg['error']}", "internal_error",
                        code=msg.get("code") or "model_error")
    retry = msg.get("retry_after_s")
    headers = {"Retry-After": str(max(1, round(retry)))} if retry else {}
    return APIError(status, msg["error"], "service_unavailable_error" if status == 503 else "invalid_request_error",
                    code=msg.get("code"), headers=headers)


@serve.ingress(app)
class Ingress:
    def __init__(self, scheduler: DeploymentHandle, model: str, model_name: str | None = None,
                 api_key_env: str | None = "FLUIDSERVE_API_KEY", metrics_api_key_env: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.scheduler = scheduler
        self.subscription = Subscription(scheduler)  # all this replica's streams in one
        self.model = model
        self.model_name = model_name or served_model_name(model)
        self.tokenizer = load_tokenizer(model)
        self.prompts = PromptBuilder(self.tokenizer)
        self.token_texts = TokenTexts(self.tokenizer)
        # Keys come from the environment only (a K8s secret, or forwarded by build_app), never
        # from the config; an unset or empty variable leaves that route open.
        self.api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
        self.metrics_key = (os.environ.get(metrics_api_key_env) or None) if metrics_api_key_env else None
        self.max_body_bytes = max_body_bytes
        self._info: dict | None = None

    def __del__(self) -> None:
        # Serve calls this when the replica shuts down: the scheduler cancels its requests at once.
        self.subscription.close()

    # -- the Python API (Serve handles) ----------------------------------------------------------
    async def completions(self, body: dict) -> dict | AsyncIterator[dict]:
        """An OpenAI completion (or, with stream, its chunks); errors come back as {"error": ...}."""
        try:
            return await self._completions(parse(CompletionRequest, body))
        except APIError as exc:
            return exc.body()

    async def chat(self, body: dict) -> dict | AsyncIterator[dict]:
        """An OpenAI chat completion (or, with stream, its chunks)."""
        try:
            return await self._chat(parse(ChatRequest, body))
        except APIError as exc:
            return exc.body()

    # -- HTTP ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        self._authorize(request, self.api_key)
        body = await self._read_json(request)
        if isinstance(body, dict) and isinstance(body.get("prompt"), list):
            # Before validating a huge id list element by element: its length alone may decide.
            check_length(len(body["prompt"]), await self._limits(), "prompt")
        req = parse(CompletionRequest, body)
        return self._respond(await self._completions(req))

    @app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        self._authorize(request, self.api_key)
        req = parse(ChatRequest, await self._read_json(request))
        return self._respond(await self._chat(req))

    @app.get("/v1/models")
    async def http_models(self, request: Request) -> dict:
        self._authorize(request, self.api_key)
        info = await self._model_info()
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "fluidserve",
            "max_model_len": info["max_model_len"], "root": self.model,
        }]}

    @app.get("/health")
    async def http_health(self) -> JSONResponse:
        try:
            state = await asyncio.wait_for(self.scheduler.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the scheduler replica is down or restarting
            state = {"ready": False, "reason": f"scheduler unavailable: {type(exc).__name__}"}
        return JSONResponse({"status": "ok" if state.get("ready") else "unavailable", **state},
                            status_code=200 if state.get("ready") else 503)

    @app.get("/metrics")
    async def http_metrics(self, request: Request) -> Response:
        self._authorize(request, self.metrics_key)
        # Classic text format on purpose: the OpenMetrics encoder mangles "fluidserve:" names.
        body = await self.scheduler.metrics_text.remote()
        return Response(body, media_type=CONTENT_TYPE)

    # -- shared ----------------------------------------------------------------------------------
    @staticmethod
    def _authorize(request: Request, key: str | None) -> None:
        if not key:
            return
        sent = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        # Constant-time comparison: response timing must not reveal how much of a guess matched.
        if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        if not raw:
            raise APIError(400, "the request body is empty; send a JSON object")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc.msg} at position {exc.pos}") from None

    @staticmethod
    def _respond(result: dict | AsyncIterator[dict]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(_sse(result), media_type="text/event-stream")

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.scheduler.info.remote()
        return self._info

    async def _limits(self) -> ModelLimits:
        return ModelLimits.from_info(await self._model_info())

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.model):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    async def _completions(self, req: CompletionRequest):
        self._check_model(req.model)
        limits = await self._limits()
        ids = await self.prompts.completion(req, limits)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        fmt = CompletionFormat(new_id("cmpl"), self.model_name, self.token_texts, req.wants_logprobs)
        return await self._answer(req, ids, max_tokens, limits, fmt)

    async def _chat(self, req: ChatRequest):
        self._check_model(req.model)
        limits = await self._limits()
        ids = await self.prompts.chat(req, limits)
        max_tokens = req.max_completion_tokens or req.max_tokens  # None: up to the context
        fmt = ChatFormat(new_id("chatcmpl"), self.model_name, self.token_texts, req.wants_logprobs)
        return await self._answer(req, ids, max_tokens, limits, fmt)

    async def _answer(self, req, ids: list[int], max_tokens: int | None, limits: ModelLimits, fmt):
        check_vocab(req.stop_token_ids or [], limits, "stop_token_ids")
        prompt_tokens, deltas = await self._generate(ids, req, max_tokens)
        if req.stream:
            return self._stream_chunks(req, fmt, prompt_tokens, deltas)
        parts, tokens, last = [], [], Delta("", None, 0)
        async for last in deltas:
            parts.append(last.text)
            tokens += last.tokens
        return fmt.response("".join(parts), last.finish_reason, tokens,
                            usage(prompt_tokens, last.completion_tokens))

    async def _generate(self, ids: list[int], req, max_tokens: int | None):
        """Submit to the scheduler; returns (prompt_tokens, async iterator of Deltas). Admission
        errors (400/429/503) raise here, before any response is started."""
        stream = SchedulerStream(self.subscription, {
            "prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
            "stop_token_ids": req.stop_token_ids or [], "ignore_eos": req.ignore_eos,
            "logprobs": req.wants_logprobs, "top_logprobs": req.num_top_logprobs,
        })
        try:
            first = await stream.open()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the scheduler is a 503
            raise _scheduler_lost(exc) from None
        if "error" in first:
            err = first["error"]
            status = err["status"]
            retry = status in (429, 503)
            headers = {"Retry-After": str(max(1, round(err.get("retry_after_s") or 1)))} if retry else {}
            kind = {429: "rate_limit_error", 503: "service_unavailable_error"}.get(status, "invalid_request_error")
            raise APIError(status, err["message"], code=err["code"], type_=kind, headers=headers)
        output = OutputAssembler(self.tokenizer, req.stop or [], req.wants_logprobs)
        return first["prompt_tokens"], self._deltas(stream, output)

    @staticmethod
    async def _deltas(stream: SchedulerStream, output: OutputAssembler) -> AsyncIterator[Delta]:
        """One Delta per scheduler message, up to the finishing one (across a scheduler restart:
        see deploy.scheduler_stream). A stop string found here ends the request as a finish (the
        scheduler is told after how many tokens) before the stream is closed, which would count
        as a cancellation."""
        try:
            async for msg in stream.messages():
                if msg.get("error"):
                    raise _stream_error(msg)
                delta = output.feed(msg)
                if delta.finish_reason and msg["finish_reason"] is None:
                    await stream.finish(delta.completion_tokens)
                yield delta
                if delta.finish_reason:
                    return
        except SchedulerLost as exc:
            raise _scheduler_lost(exc) from None
        finally:
            stream.close()  # frees the KV of an abandoned request at once

    @staticmethod
    async def _stream_chunks(req, fmt, prompt_tokens: int, deltas) -> AsyncIterator[dict]:
        """The chunks of a stream. With stream_options.include_usage, as OpenAI: `usage: null` on
        every chunk (the usage so far with continuous_usage_stats, as vLLM), then a last chunk
        with `choices: []` and the usage. Without stream_options (fluidserve's default, kept for
        clients that read it there): the usage on the finishing chunk only."""
        first, count = True, 0
        async for d in deltas:
            count = d.completion_tokens
            if not (d.text or d.finish_reason or d.tokens or first):
                continue  # nothing new to say (a character still incomplete, a held-back stop)
            use = usage(prompt_tokens, count)
            if req.include_usage:
                yield fmt.chunk(d.text, d.finish_reason, d.tokens, first,
                                use if req.continuous_usage else None, with_usage=True)
            else:
                final = d.finish_reason is not None and req.stream_options is None
                yield fmt.chunk(d.text, d.finish_reason, d.tokens, first, use, with_usage=final)
            first = False
        if req.include_usage:
            yield fmt.usage_chunk(usage(prompt_tokens, count))
