"""The relevance service: a FastAPI app around one judge model and one dynamic batcher.

Endpoints (see docs/serving.md):

``POST /v1/relevance``          pairs in, per pair ``{id, label, probs, format_ok, reasoning?}`` out
``POST /v1/chat/completions``   OpenAI-compatible (one choice, ``usage``), e.g. for :class:`she.rewards.judge.RemoteJudge`
``GET /v1/models``              the one served model, OpenAI style
``GET /health``                 model loaded, name, taxonomy, fast-mode status (open even with an API key)
``GET /metrics``                requests, pairs, errors, batch sizes, latency p50/p99

Every error is JSON in the OpenAI shape ``{"error": {"message", "type", "param", ...}}``; bad input
is a 4xx whose message names the field (``pairs[3].query: Field required``), never a 500.

Started with an API key (``she serve --api-key`` or ``SHE_API_KEY``), every path but ``/health`` needs
``Authorization: Bearer <key>`` (401 otherwise). A full queue answers 503 with ``Retry-After``; a client may
bound a request's time with the ``X-Deadline-S`` header (504 when it passes, its queued pairs dropped).
"""

# no ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at definition
# time, and the request models are imported inside create_app (fastapi is an optional extra)
import asyncio
import hashlib
import hmac
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
# answered without the API key: a load balancer's or orchestrator's liveness probe carries no secret
OPEN_PATHS = frozenset({"/health"})
API_KEY_ENV = "SHE_API_KEY"


class _ClientError(Exception):
    def __init__(self, status: int, errors: list[tuple[str, str]], kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(errors[0][1] if errors else "error")
        self.status, self.errors, self.kind, self.headers = status, errors, kind, headers


# -- the API key ----------------------------------------------------------------------------------------
def check_api_key(key: str, source: str) -> str:
    """``key`` if it can travel in an ``Authorization: Bearer`` header; else a ``UserError`` naming ``source``."""
    if not key:
        raise UserError(f"{source} is empty: give a key, or leave it unset to run without authentication")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise UserError(f"{source}: the API key must be printable ASCII without spaces (it is sent in an HTTP header)")
    return key


def resolve_api_key(flag: str | None, environ: Any = os.environ) -> tuple[str | None, str | None]:
    """(key, where it came from): ``--api-key`` wins over ``$SHE_API_KEY`` (the explicit setting of this run
    over the ambient one); (None, None) when neither is set. A set but empty value is an error, never a silent
    "no authentication"."""
    if flag is not None:
        return check_api_key(flag, "--api-key"), "--api-key"
    if API_KEY_ENV in environ:
        return check_api_key(environ[API_KEY_ENV], API_KEY_ENV), API_KEY_ENV
    return None, None


def bearer_problem(authorization: str | None, key_digest: bytes) -> str | None:
    """Why an ``Authorization`` header does not carry the key whose SHA-256 is ``key_digest``; None if it does.

    The token is hashed and the digests compared with :func:`hmac.compare_digest`: constant time, and equal
    lengths, so neither the key's characters nor its length leak through response times."""
    if not authorization:
        return "missing; send 'Authorization: Bearer <API key>'"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "must be 'Bearer <API key>'"
    if not hmac.compare_digest(hashlib.sha256(token.strip().encode("utf-8")).digest(), key_digest):
        return "the bearer token is not this server's API key"
    return None


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
    fast_batch_size: int | None = None,
    api_key: str | None = None,
    backend: Any = None,
):
    """Build the app. The model is loaded now (so ``/health`` is true once this returns).

    ``backend`` replaces the model (tests): any object with ``name``, ``taxonomy``, ``labels``,
    ``fast_exact``, ``info()`` and ``run(key, items)`` like :class:`~she.serving.backend.JudgeBackend`.
    ``api_key``: when given, every path but ``/health`` needs ``Authorization: Bearer <api_key>`` (the
    environment is not read here; ``she serve`` resolves ``--api-key`` / ``SHE_API_KEY``, :func:`resolve_api_key`).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from she.data.schema import Product, Record
    from she.serving.backend import ChatItem, ItemError, JudgeBackend
    from she.serving.batcher import BatcherClosed, DeadlineExceeded, DynamicBatcher, QueueFull
    from she.serving.metrics import ServiceMetrics
    from she.serving.schemas import (
        DEADLINE_HEADER, ChatRequest, RelevanceRequest, chat_errors, error_body, message_text, parse_deadline_s,
        pydantic_errors, relevance_errors,
    )

    if max_request_pairs < 1 or max_batch_pairs < 1 or max_text_chars < 1:
        raise UserError("max_request_pairs, max_batch_pairs and max_text_chars must be >= 1")
    if max_queue_pairs < max_request_pairs:
        raise UserError(f"max_queue_pairs ({max_queue_pairs}) must be >= max_request_pairs ({max_request_pairs})")
    if not request_timeout_s > 0:
        raise UserError(f"request_timeout_s must be > 0, got {request_timeout_s}")
    key_digest = None if api_key is None else hashlib.sha256(check_api_key(api_key, "api_key").encode()).digest()
    if backend is None:
        if model_dir is None:
            raise UserError("create_app needs a model folder (or a backend)")
        backend = JudgeBackend.load(model_dir, taxonomy=taxonomy, device=device, bf16=bf16,
                                    max_new_tokens=max_new_tokens, fast_batch_size=fast_batch_size)
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
                        "max_chat_tokens": max_chat_tokens, "max_queue_pairs": max_queue_pairs,
                        "request_timeout_s": request_timeout_s}

    # -- errors: always JSON, always naming the field -------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_req: Request, exc: RequestValidationError):
        errs = pydantic_errors(exc.errors())
        status = 400 if any(p == "body" and m.startswith("invalid JSON") for p, m in errs) else 422
        return JSONResponse(error_body(errs), status_code=status)

    @app.exception_handler(_ClientError)
    async def _on_client_error(_req: Request, exc: _ClientError):
        return JSONResponse(error_body(exc.errors, exc.kind), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_req: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body([("path" if exc.status_code == 404 else "request", str(exc.detail))]),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _on_crash(_req: Request, exc: Exception):  # a bug, not bad input: log it, no traceback to clients
        log.exception("internal error")
        return JSONResponse(error_body([("server", f"internal error ({type(exc).__name__})")], "server_error"),
                            status_code=500)

    # Middleware added later wraps the earlier one: _timing is outermost, so refused requests (401) are counted
    # in /metrics too, and request.state.received is set before anything else runs.
    if key_digest is not None:
        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path in OPEN_PATHS:
                return await call_next(request)
            problem = bearer_problem(request.headers.get("authorization"), key_digest)
            if problem is None:
                return await call_next(request)
            # RFC 6750: a bare challenge when no credentials came, invalid_token when wrong ones did
            challenge = 'Bearer error="invalid_token"' if request.headers.get("authorization") else "Bearer"
            return JSONResponse(error_body([("Authorization", problem)], "authentication_error"), status_code=401,
                                headers={"WWW-Authenticate": challenge})

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        request.state.received = time.monotonic()  # X-Deadline-S counts from here
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.observe(TIMED.get(request.url.path, request.url.path), status, time.perf_counter() - t0)

    async def _submit(request: Request, key, items: list[Any]) -> list[Any]:
        """Queue ``items`` and await their results, within the request's deadline: ``X-Deadline-S`` seconds
        after it was received, or the server's ``request_timeout_s``, whichever is sooner. When it passes the
        answer is 504, and pairs still queued are dropped (the batcher skips them), never scored."""
        try:
            client_s = parse_deadline_s(request.headers.get(DEADLINE_HEADER))
        except ValueError as e:
            raise _ClientError(422, [(DEADLINE_HEADER, str(e).partition(": ")[2])]) from None
        allowed = request_timeout_s if client_s is None else min(client_s, request_timeout_s)
        who = DEADLINE_HEADER if client_s is not None and client_s <= request_timeout_s else "server"
        deadline = request.state.received + allowed
        try:
            fut = batcher.submit(key, items, deadline=deadline)
        except QueueFull as e:
            raise _ClientError(503, [("server", f"overloaded: {e}")], "server_busy",
                               {"Retry-After": str(e.retry_after_s)}) from None
        except BatcherClosed:
            raise _ClientError(503, [("server", "shutting down")], "server_busy") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, deadline - time.monotonic()))
        except DeadlineExceeded as e:
            raise _ClientError(504, [(who, f"{e} (deadline {allowed:g} s)")], "timeout") from None
        except asyncio.TimeoutError:
            raise _ClientError(504, [(who, f"no answer within the deadline of {allowed:g} s; the request's pairs "
                                           "not yet scored were dropped")], "timeout") from None

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
    async def relevance(req: RelevanceRequest, request: Request):
        errs = relevance_errors(req, max_request_pairs=max_request_pairs, max_text_chars=max_text_chars)
        if errs:
            raise _ClientError(422, errs)
        ids = [p.id if p.id is not None else i for i, p in enumerate(req.pairs)]
        records = [Record(id=str(ids[i]), query=p.query,
                          product=Product(title=p.title, brand=p.brand, color=p.color, description=p.description),
                          taxonomy=backend.taxonomy) for i, p in enumerate(req.pairs)]
        results = await _submit(request, (req.mode,), records)
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
    async def chat(req: ChatRequest, request: Request):
        errs = chat_errors(req, max_chat_tokens=max_chat_tokens, max_chat_chars=max_chat_chars)
        if errs:
            raise _ClientError(422, errs)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(256, max_chat_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        item = ChatItem(tuple((m.role, message_text(m.content, f"messages[{i}]")) for i, m in enumerate(req.messages)),
                        stop)
        temperature = round(float(req.temperature), 4)
        top_p = round(float(req.top_p), 4) if temperature > 0 else 1.0  # greedy ignores top_p: share batches
        (res,) = await _submit(request, ("chat", int(max_tokens), temperature, top_p), [item])
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


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          api_key: str | None = None, **kwargs: Any) -> None:
    """Load the model, build the app and run it with uvicorn until interrupted (``she serve``).

    ``api_key`` is the ``--api-key`` flag: it wins over ``$SHE_API_KEY`` (:func:`resolve_api_key`)."""
    import uvicorn

    key, source = resolve_api_key(api_key)
    app = create_app(model_dir, api_key=key, **kwargs)
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key (--api-key / %s): anyone who can reach %s:%d can use the service", API_KEY_ENV,
                    host, port)
    else:
        log.info("API key from %s: every path but /health needs 'Authorization: Bearer <key>'", source)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["API_KEY_ENV", "OPEN_PATHS", "bearer_problem", "check_api_key", "create_app", "resolve_api_key", "serve"]
