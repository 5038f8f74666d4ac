"""The relevance service: a FastAPI app around one judge model and one dynamic batcher.

Endpoints (see docs/serving.md):

``POST /v1/relevance``          pairs in, per pair ``{id, label, probs, format_ok, reasoning?}`` out
``POST /v1/chat/completions``   OpenAI-compatible (one choice, ``usage``), e.g. for :class:`she.rewards.judge.RemoteJudge`
``GET /v1/models``              the one served model, OpenAI style
``GET /health``                 model loaded, name, taxonomy, fast-mode status
``GET /metrics``                requests, pairs, errors, batch sizes, latency p50/p99

Every error is JSON in the OpenAI shape ``{"error": {"message", "type", "param", ...}}``; bad input
is a 4xx whose message names the field (``pairs[3].query: Field required``), never a 500.
"""

# no ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at definition
# time, and the request models are imported inside create_app (fastapi is an optional extra)
import asyncio
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from she.errors import UserError

log = logging.getLogger(__name__)

# endpoints whose latency is worth a percentile (health/metrics polls would only dilute it)
TIMED = {"/v1/relevance": "relevance", "/v1/chat/completions": "chat"}


class _ClientError(Exception):
    def __init__(self, status: int, errors: list[tuple[str, str]], kind: str = "invalid_request_error") -> None:
        super().__init__(errors[0][1] if errors else "error")
        self.status, self.errors, self.kind = status, errors, kind


def create_app(
    model_dir: str | os.PathLike | None = None,
    *,
    max_batch_pairs: int = 64,
    max_request_pairs: int = 256,
    max_text_chars: int = 2000,
    batch_wait_ms: float = 5,
    max_new_tokens: int = 96,
    max_chat_tokens: int = 512,
    max_chat_chars: int = 20_000,
    max_queue_pairs: int = 4096,
    request_timeout_s: float = 300,
    taxonomy: str | None = None,
    device: str = "auto",
    bf16: bool | None = None,
    backend: Any = None,
):
    """Build the app. The model is loaded now (so ``/health`` is true once this returns).

    ``backend`` replaces the model (tests): any object with ``name``, ``taxonomy``, ``labels``,
    ``fast_exact``, ``info()`` and ``run(key, items)`` like :class:`~she.serving.backend.JudgeBackend`.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from she.data.schema import Product, Record
    from she.serving.backend import ChatItem, ItemError, JudgeBackend
    from she.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull
    from she.serving.metrics import ServiceMetrics
    from she.serving.schemas import (
        ChatRequest, RelevanceRequest, chat_errors, error_body, message_text, pydantic_errors, relevance_errors,
    )

    if max_request_pairs < 1 or max_batch_pairs < 1 or max_text_chars < 1:
        raise UserError("max_request_pairs, max_batch_pairs and max_text_chars must be >= 1")
    if max_queue_pairs < max_request_pairs:
        raise UserError(f"max_queue_pairs ({max_queue_pairs}) must be >= max_request_pairs ({max_request_pairs})")
    if backend is None:
        if model_dir is None:
            raise UserError("create_app needs a model folder (or a backend)")
        backend = JudgeBackend.load(model_dir, taxonomy=taxonomy, device=device, bf16=bf16,
                                    max_new_tokens=max_new_tokens)
    batcher = DynamicBatcher(backend.run, max_batch=max_batch_pairs, max_wait_ms=batch_wait_ms,
                             max_queue=max_queue_pairs)
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="she relevance service", version="1", lifespan=lifespan)
    app.state.backend, app.state.batcher, app.state.metrics = backend, batcher, metrics
    app.state.limits = {"max_batch_pairs": max_batch_pairs, "max_request_pairs": max_request_pairs,
                        "max_text_chars": max_text_chars, "batch_wait_ms": batch_wait_ms,
                        "max_chat_tokens": max_chat_tokens, "max_queue_pairs": max_queue_pairs}

    # -- errors: always JSON, always naming the field -------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_req: Request, exc: RequestValidationError):
        errs = pydantic_errors(exc.errors())
        status = 400 if any(p == "body" and m.startswith("invalid JSON") for p, m in errs) else 422
        return JSONResponse(error_body(errs), status_code=status)

    @app.exception_handler(_ClientError)
    async def _on_client_error(_req: Request, exc: _ClientError):
        return JSONResponse(error_body(exc.errors, exc.kind), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_req: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body([("path" if exc.status_code == 404 else "request", str(exc.detail))]),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _on_crash(_req: Request, exc: Exception):  # a bug, not bad input: log it, no traceback to clients
        log.exception("internal error")
        return JSONResponse(error_body([("server", f"internal error ({type(exc).__name__})")], "server_error"),
                            status_code=500)

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.observe(TIMED.get(request.url.path, request.url.path), status, time.perf_counter() - t0)

    async def _submit(key, items: list[Any]) -> list[Any]:
        try:
            fut = batcher.submit(key, items)
        except QueueFull as e:
            raise _ClientError(503, [("server", f"overloaded: {e}")], "server_busy") from None
        except BatcherClosed:
            raise _ClientError(503, [("server", "shutting down")], "server_busy") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), request_timeout_s)
        except asyncio.TimeoutError:
            raise _ClientError(504, [("server", f"no answer within {request_timeout_s} s")], "timeout") from None

    # -- endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model_loaded": True, **backend.info()}

    @app.get("/metrics")
    async def get_metrics():
        return {**metrics.snapshot(batcher.stats_dict()), "limits": app.state.limits}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "owned_by": "she"}]}

    @app.post("/v1/relevance")
    async def relevance(req: RelevanceRequest):
        errs = relevance_errors(req, max_request_pairs=max_request_pairs, max_text_chars=max_text_chars)
        if errs:
            raise _ClientError(422, errs)
        ids = [p.id if p.id is not None else i for i, p in enumerate(req.pairs)]
        records = [Record(id=str(ids[i]), query=p.query,
                          product=Product(title=p.title, brand=p.brand, color=p.color, description=p.description),
                          taxonomy=backend.taxonomy) for i, p in enumerate(req.pairs)]
        results = await _submit((req.mode,), records)
        bad = [(f"pairs[{i}]", r.message) for i, r in enumerate(results) if isinstance(r, ItemError)]
        if bad:
            raise _ClientError(422, bad)
        metrics.add_pairs(req.mode, len(records))
        out = []
        for pid, j in zip(ids, results):
            d: dict[str, Any] = {"id": pid, "label": j.label, "probs": j.probs, "format_ok": j.format_ok}
            if req.mode == "fast":
                d["label_mass"] = getattr(j, "label_mass", None)
            if req.return_reasoning:
                d["reasoning"] = j.text
            out.append(d)
        return {"model": backend.name, "taxonomy": backend.taxonomy, "mode": req.mode,
                "approximate": req.mode == "fast" and not backend.fast_exact, "results": out}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        errs = chat_errors(req, max_chat_tokens=max_chat_tokens, max_chat_chars=max_chat_chars)
        if errs:
            raise _ClientError(422, errs)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(256, max_chat_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        item = ChatItem(tuple((m.role, message_text(m.content, f"messages[{i}]")) for i, m in enumerate(req.messages)),
                        stop)
        temperature = round(float(req.temperature), 4)
        top_p = round(float(req.top_p), 4) if temperature > 0 else 1.0  # greedy ignores top_p: share batches
        (res,) = await _submit(("chat", int(max_tokens), temperature, top_p), [item])
        if isinstance(res, ItemError):
            raise _ClientError(422, [("messages", res.message)])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": backend.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": res.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                      "total_tokens": res.prompt_tokens + res.completion_tokens},
        }

    return app


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs: Any) -> None:
    """Load the model, build the app and run it with uvicorn until interrupted (``she serve``)."""
    import uvicorn

    app = create_app(model_dir, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve"]
