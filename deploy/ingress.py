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

from deploy.detokenize import TextStream
from deploy.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_object,
    completion_object,
    new_id,
    parse,
    usage,
)
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


def _completion_lp(lps: list | None) -> dict | None:
    return {"token_logprobs": lps} if lps else None


def _chat_lp(lps: list | None) -> dict | None:
    return {"content": [{"logprob": lp} for lp in lps]} if lps else None


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
    return APIError(503, "the scheduler restarted and this request was lost; retry it",
                    "service_unavailable_error", code="scheduler_unavailable",
                    headers={"Retry-After": str(SCHEDULER_RETRY_AFTER_S)})


@serve.ingress(app)
class Ingress:
    def __init__(self, scheduler: DeploymentHandle, model: str, model_name: str | None = None,
                 api_key_env: str | None = "FLUIDSERVE_API_KEY", metrics_api_key_env: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.scheduler = scheduler
        self.model = model
        self.model_name = model_name or served_model_name(model)
        self.tokenizer = load_tokenizer(model)
        # Keys come from the environment only (a K8s secret, or forwarded by build_app), never
        # from the config; an unset or empty variable leaves that route open.
        self.api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
        self.metrics_key = (os.environ.get(metrics_api_key_env) or None) if metrics_api_key_env else None
        self.max_body_bytes = max_body_bytes
        self._info: dict | None = None

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
        req = parse(CompletionRequest, await self._read_json(request))
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

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.model):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    async def _completions(self, req: CompletionRequest):
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            ids = self._tokenize(req.prompt, "prompt")
        else:
            ids = await self._checked_ids(req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        gen = self._generate(ids, req, max_tokens, logprobs=bool(req.logprobs))
        rid = new_id("cmpl")

        def build(text, finish, use, chunk, first=False, lp=None):
            return completion_object(rid, self.model_name, text, finish, use, chunk, _completion_lp(lp))

        return await self._finish(gen, req.stream, build)

    async def _chat(self, req: ChatRequest):
        self._check_model(req.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template rejects this conversation (e.g. role order)
            raise APIError(400, f"the messages do not fit the model's chat template: {exc}",
                           param="messages") from None
        ids = self._tokenize(text, "messages", add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens  # None: up to the context
        gen = self._generate(ids, req, max_tokens, logprobs=req.logprobs)
        rid = new_id("chatcmpl")

        def build(text, finish, use, chunk, first=False, lp=None):
            return chat_object(rid, self.model_name, text, finish, use, chunk, first, _chat_lp(lp))

        return await self._finish(gen, req.stream, build)

    def _tokenize(self, text: str, param: str, **kwargs: Any) -> list[int]:
        try:
            # JSON escapes can carry lone surrogates ("\\ud800"), which no tokenizer encodes.
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the text contains invalid unicode (a lone surrogate)", param=param) from None
        return self.tokenizer(text, **kwargs)["input_ids"]

    async def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = (await self._model_info())["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        return ids

    async def _generate(self, ids: list[int], req, max_tokens: int | None, logprobs: bool):
        """Submit to the scheduler; returns (prompt_tokens, async iterator of deltas). Admission
        errors (400/429/503) raise here, before any response is started."""
        temperature = req.temperature
        stream = self.scheduler.options(stream=True).generate.remote({
            "prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": req.top_p, "top_k": max(0, req.top_k), "seed": req.seed,
            "stop_token_ids": req.stop_token_ids or [], "ignore_eos": req.ignore_eos,
            "logprobs": logprobs,
        })
        try:
            first = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the scheduler is a 503
            raise _scheduler_lost(exc) from None
        if "error" in first:
            err = first["error"]
            headers = {"Retry-After": str(max(1, round(err.get("retry_after_s") or 1)))} if err["status"] == 429 else {}
            raise APIError(err["status"], err["message"], code=err["code"],
                           type_="rate_limit_error" if err["status"] == 429 else "invalid_request_error",
                           headers=headers)
        return first["prompt_tokens"], self._deltas(stream, req.stop or [])

    async def _deltas(self, stream, stop: list[str]) -> AsyncIterator[tuple[str, str | None, int, list]]:
        """(text delta, finish reason, completion tokens so far, logprobs) per scheduler message."""
        text = TextStream(self.tokenizer, stop)
        count = 0
        try:
            while True:
                try:
                    msg = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - the scheduler died mid-stream
                    raise _scheduler_lost(exc) from None
                if msg.get("error"):
                    raise APIError(500, f"generation failed: {msg['error']}", "internal_error")
                count += len(msg["token_ids"])
                lps = [lp for lp in msg.get("logprobs") or [] if lp is not None]
                delta = text.add(msg["token_ids"])
                finish = "stop" if text.stopped else msg["finish_reason"]
                if finish:
                    yield delta + text.flush(), finish, count, lps
                    return
                yield delta, None, count, lps
        finally:
            stream.cancel()  # no-op when finished; frees the KV of an abandoned request at once

    async def _finish(self, gen, streaming: bool, build):
        prompt_tokens, deltas = await gen
        if streaming:
            return self._stream_chunks(prompt_tokens, deltas, build)
        parts, finish, count, lps = [], None, 0, []
        async for delta, finish, count, lp in deltas:
            parts.append(delta)
            lps += lp
        return build("".join(parts), finish, usage(prompt_tokens, count), False, lp=lps or None)

    @staticmethod
    async def _stream_chunks(prompt_tokens: int, deltas, build) -> AsyncIterator[dict]:
        first = True
        async for delta, finish, count, lp in deltas:
            use = usage(prompt_tokens, count) if finish else None
            if delta or finish or first:
                yield build(delta, finish, use, True, first=first, lp=lp or None)
                first = False
