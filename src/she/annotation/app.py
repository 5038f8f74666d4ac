"""``she annotate serve``: the annotation web app (FastAPI, server-rendered HTML, no external assets).

Routes (all but ``/login`` and ``/healthz`` need an annotator token: ``Authorization: Bearer <token>``, or
the ``she_annotator`` cookie set by ``POST /login``; none -> 401):

* ``GET /``              -- lease the next item for this annotator and redirect to it (or "queue empty").
* ``GET /item/{id}``     -- the page: query, product, gold label, the policy's steps; per step right/wrong
  and the facts of its vocabulary; keyboard shortcuts for every action. 409 while another annotator
  holds the item's lease.
* ``POST /api/answer``   -- ``{"item_id", "steps": {"0": "right"}, "facts": {"brand": "match"}}``: validated
  as a whole (unknown values -> 422, nothing stored), then stored in one transaction.
* ``POST /api/finish``, ``POST /api/skip`` -- ``{"item_id"}``: done / release, then ``{"next": url}``.
* ``GET /stats`` (HTML), ``GET /api/stats`` (JSON) -- progress, per-annotator counts, Cohen's kappa.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from she.annotation.items import FACT_VOCAB, implied_facts
from she.annotation.stats import split_units
from she.annotation.templates import render
from she.data.annotations import AnnotationStore, AnswerError, latest_by_annotator
from she.data.validation import DataError

log = logging.getLogger(__name__)
COOKIE = "she_annotator"
MAX_BODY = 64 * 1024


class _Unauthorized(Exception):
    pass


class _ClientError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def load_tokens(path: str | Path) -> dict[str, str]:
    """``{annotator: token}`` from a JSON object file; each token at least 16 characters, all distinct."""
    p = Path(path)
    if not p.is_file():
        raise DataError("no such tokens file (a JSON object {\"annotator\": \"token\", ...})", path=p)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", path=p, line=e.lineno) from None
    return check_tokens(obj, where=str(p))


def check_tokens(obj: Any, where: str = "tokens") -> dict[str, str]:
    if not isinstance(obj, dict) or not obj:
        raise DataError("must be a non-empty JSON object {\"annotator\": \"token\", ...}", path=where)
    for name, tok in obj.items():
        if not name.strip() or len(name) > 64:
            raise DataError("annotator names are 1..64 characters", path=where, field=name)
        if not isinstance(tok, str) or len(tok) < 16:
            raise DataError("token must be a string of at least 16 characters", path=where, field=name)
    if len(set(obj.values())) != len(obj):
        raise DataError("two annotators share a token", path=where)
    return dict(obj)


def who_is(token: str | None, tokens: Mapping[str, str]) -> str | None:
    """The annotator whose token this is, compared in constant time against every token (no early exit,
    so the time does not tell which prefix matched or how many annotators there are before the match)."""
    if not token:
        return None
    found = None
    given = token.encode("utf-8")
    for name, tok in tokens.items():
        if hmac.compare_digest(given, tok.encode("utf-8")):
            found = name
    return found


def item_state(store: AnnotationStore, item_id: str, record_id: str) -> dict[str, dict[str, Any]]:
    """What the page shows per question: the latest step mark (any annotator, with who and what it replaced)
    and the record's current fact values (the store's, with the answer that set it when there is one)."""
    state: dict[str, dict[str, Any]] = {}
    for a in store.answers(item_id):
        if a.target.startswith("step:"):
            state[a.target] = None if a.value is None else {"value": a.value, "by": a.annotator,
                                                            "previous": a.previous, "previous_src": a.previous_src}
    last_fact = {a.target: a for a in store.answers(item_id) if a.target.startswith("fact:")}
    facts, src = store.facts_of(record_id)
    for name, value in facts.items():
        a = last_fact.get(f"fact:{name}")
        by = a.annotator if a is not None and a.value == value else (src or "")
        state[f"fact:{name}"] = {"value": value, "by": by, "previous": a.previous if a is not None else None,
                                 "previous_src": a.previous_src if a is not None else None}
    return {k: v for k, v in state.items() if v is not None}


def create_app(store_path: str | Path, tokens: Mapping[str, str], *, lease_s: float = 600.0,
               secure_cookie: bool = False) -> FastAPI:
    """The app over an existing (migrated) store whose queue is already set (:meth:`AnnotationStore.set_queue`)."""
    tokens = check_tokens(dict(tokens))
    store = AnnotationStore(store_path)
    app = FastAPI(title="she annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        request.state.nonce = secrets.token_urlsafe(16)
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{request.state.nonce}'; style-src 'nonce-{request.state.nonce}'; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.exception_handler(_Unauthorized)
    async def _on_401(request: Request, _exc: _Unauthorized):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "annotator token required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return HTMLResponse(render("login", nonce=request.state.nonce, error="Sign in with your annotator token."),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_ClientError)
    async def _on_client_error(_request: Request, exc: _ClientError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    def annotator(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        name = who_is(token, tokens)
        if name is None:
            raise _Unauthorized()
        return name

    def header(who: str) -> dict[str, Any]:
        progress = store.progress()
        return {"who": who, "progress": progress,
                "mine": progress["annotators"].get(who, {"done": 0, "answers": 0})}

    async def body_of(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _ClientError(415, "send application/json")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise _ClientError(413, f"body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _ClientError(400, "body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("item_id"), str):
            raise _ClientError(422, "item_id: missing or not a string")
        return body

    def owned_item(item_id: str, who: str):
        it = store.item(item_id)
        if it is None:
            raise _ClientError(404, f"item_id: no item {item_id!r} in the queue")
        holder = store.lease_holder(item_id)
        if holder is not None and holder != who:
            raise _ClientError(409, f"item {item_id!r} is leased to another annotator")
        return it

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return render("login", nonce=request.state.nonce, error=None)

    @app.post("/login")
    async def login(request: Request):
        form = (await request.body()).decode("utf-8", "replace")
        from urllib.parse import parse_qs

        token = (parse_qs(form).get("token") or [""])[0]
        if who_is(token, tokens) is None:
            return HTMLResponse(render("login", nonce=request.state.nonce, error="Unknown token."), status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure_cookie, max_age=12 * 3600)
        return resp

    @app.get("/", response_class=HTMLResponse)
    def next_item(request: Request):
        who = annotator(request)
        iid = store.lease_next(who, ttl_s=lease_s)
        if iid is None:
            return render("empty", nonce=request.state.nonce, **header(who))
        from urllib.parse import quote

        return RedirectResponse(f"/item/{quote(iid, safe='')}", status_code=303)

    @app.get("/item/{item_id}", response_class=HTMLResponse)
    def page(item_id: str, request: Request):
        who = annotator(request)
        it = store.item(item_id)
        if it is None:
            return HTMLResponse("no such item", status_code=404)
        holder = store.lease_holder(item_id)
        if holder is not None and holder != who:
            return HTMLResponse("this item is being annotated by another annotator; <a href=\"/\">next item</a>",
                                status_code=409)
        return render("item", nonce=request.state.nonce, item=it, rec=it.payload["record"], vocab=FACT_VOCAB,
                      state=item_state(store, it.item_id, it.record_id), **header(who))

    @app.post("/api/answer")
    async def answer(request: Request):
        who = annotator(request)
        body = await body_of(request)
        it = owned_item(body["item_id"], who)
        steps_in, facts_in = body.get("steps") or {}, body.get("facts") or {}
        if not isinstance(steps_in, dict) or not isinstance(facts_in, dict):
            raise _ClientError(422, "steps and facts must be JSON objects")
        unknown = sorted(set(body) - {"item_id", "steps", "facts"})
        if unknown:
            raise _ClientError(422, f"unknown field(s): {', '.join(unknown)}")
        steps: dict[int, str | None] = {}
        for k, v in steps_in.items():
            if not (isinstance(k, str) and k.isdigit()):
                raise _ClientError(422, f"steps: key {k!r} is not a step index")
            steps[int(k)] = v
        for name in facts_in:
            if name not in FACT_VOCAB:
                raise _ClientError(422, f"facts.{name}: not a fact the page sets; allowed: {', '.join(FACT_VOCAB)}")
        facts = dict(facts_in)
        for k, v in steps.items():  # a right step also states the facts it concluded (unless set explicitly)
            if v == "right" and 0 <= k < len(it.payload["steps"]):
                s = it.payload["steps"][k]
                for name, value in implied_facts(s["name"], s["conclusion"]).items():
                    facts.setdefault(name, value)
        try:
            stored = store.answer(it.item_id, who, steps=steps, facts=facts, ttl_s=lease_s)
        except AnswerError as e:
            raise _ClientError(422, str(e)) from None
        return {"stored": len(stored), "state": item_state(store, it.item_id, it.record_id), "mine": header(who)["mine"]}

    @app.post("/api/{action}")
    async def finish_or_skip(action: str, request: Request):
        """``finish``: the item is done by this annotator; ``skip``: release it. Either drops the lease."""
        who = annotator(request)
        if action not in ("finish", "skip"):
            return JSONResponse({"detail": "not found"}, status_code=404)
        it = owned_item((await body_of(request))["item_id"], who)
        (store.finish if action == "finish" else store.release)(it.item_id, who)
        return {"next": "/"}

    def stats_data() -> dict[str, Any]:
        return {"progress": store.progress(), "agreement": split_units(latest_by_annotator(store.answers()))}

    @app.get("/api/stats")
    def stats_json(request: Request):
        annotator(request)
        return stats_data()

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request):
        who = annotator(request)
        d = stats_data()
        return render("stats", nonce=request.state.nonce, agreement=d["agreement"], **header(who))

    return app


def prepare(data: str, facts: str, *, traces: str | None = None, queue: str | None = None, model: str | None = None,
            judge: str | None = None, qc_share: float = 0.1, seed: int = 0, data_format: str = "auto") -> int:
    """Load the data, attach the store's facts, build (rank) the queue and write it into the store (creating
    an empty store when ``facts`` does not exist yet). Returns the queue length."""
    from she.annotation.items import build_items, load_queue_file, load_traces, policy_traces, rule_traces
    from she.data.factstore import attach_facts, FactStore
    from she.data.loaders import load_records

    records, _ = load_records(data, data_format)
    store = AnnotationStore(facts, create=True)
    with FactStore.open(facts) as fs:
        records, _ = attach_facts(records, fs)
    if traces:
        tr = load_traces(traces)
    elif model:
        tr = policy_traces(model, records)
    else:
        tr = rule_traces(records)
    j = None
    if judge:
        from she.rewards.judge import StepJudge

        j = StepJudge.from_pretrained(judge)
    explicit = load_queue_file(queue) if queue else None
    items = build_items(records, tr, judge=j, qc_share=qc_share, seed=seed, explicit=explicit)
    store.set_queue(items)
    store.close()
    return len(items)


def serve(facts: str, tokens_file: str, *, host: str = "127.0.0.1", port: int = 8080, lease_s: float = 600.0,
          secure_cookie: bool = False) -> None:
    import uvicorn

    uvicorn.run(create_app(facts, load_tokens(tokens_file), lease_s=lease_s, secure_cookie=secure_cookie),
                host=host, port=port, log_level="info")


__all__ = ["check_tokens", "create_app", "item_state", "load_tokens", "prepare", "serve", "who_is"]
