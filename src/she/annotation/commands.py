"""``she annotate serve``: argument parsing and the command (kept out of she.cli; imports nothing heavy)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    an = sub.add_parser("annotate", help="human step annotation web app (docs/annotation.md)")
    ans = an.add_subparsers(dest="annotate_cmd", required=True)
    s = ans.add_parser("serve", help="rank the examiner's doubtful steps and serve them to annotators")
    s.add_argument("--data", required=True, help="the records (JSONL/CSV/... as `she data validate` reads)")
    s.add_argument("--format", default="auto", dest="data_format",
                   help="format of --data: auto (by extension), home-depot, esci, wands or jsonl")
    s.add_argument("--facts", required=True, help="the fact store the answers go into (created when missing)")
    s.add_argument("--tokens", required=True, help='JSON {"annotator": "token (>= 16 chars)", ...}')
    s.add_argument("--model", default=None, help="policy folder: its greedy traces are annotated")
    s.add_argument("--judge", default=None, help="step judge folder (`she train prm`): ranks by its doubt")
    s.add_argument("--traces", default=None, help='traces JSONL {"id", "trace"} instead of --model')
    s.add_argument("--queue", default=None, help='explicit queue JSONL {"id", "trace"?, "need"?}, in order')
    s.add_argument("--qc-share", type=float, default=0.1, help="share of random items annotated twice (kappa)")
    s.add_argument("--seed", type=int, default=0, help="seed of the queue's random quality-control share")
    s.add_argument("--lease-s", type=float, default=600.0, help="how long an item stays with one annotator")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    s.add_argument("--port", type=int, default=8080, help="TCP port of the page")
    s.add_argument("--secure-cookie", action="store_true", help="behind HTTPS: send the sign-in cookie only over TLS")


def cmd_annotate(a) -> None:
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"she: error: annotate needs fastapi, uvicorn and jinja2 ({e}); pip install 'she[annotate]'",
              file=sys.stderr)
        sys.exit(2)
    from she.annotation.app import load_tokens, prepare, serve

    load_tokens(a.tokens)  # a bad tokens file fails before the (maybe slow) queue is built
    n = prepare(a.data, a.facts, traces=a.traces, queue=a.queue, model=a.model, judge=a.judge, qc_share=a.qc_share,
                seed=a.seed, data_format=a.data_format)
    print(f"{n} items in the queue; serving http://{a.host}:{a.port}/", flush=True)
    serve(a.facts, a.tokens, host=a.host, port=a.port, lease_s=a.lease_s, secure_cookie=a.secure_cookie)
