"""Difficulty filtering: keep the prompts the policy sometimes gets right and sometimes wrong.

Why: GRPO/SRPO advantages are *group-relative*. A prompt whose k rollouts all pass (pass rate 1) or all
fail (pass rate 0) has zero reward variance, so its outcome advantage is zero for every rollout and the
prompt costs a generation budget while teaching (almost) nothing -- TRL reports the share of such groups
as ``frac_reward_zero_std``. Estimating each prompt's pass rate once with the starting policy and
keeping the band ``0 < p < 1`` (the DAPO "dynamic sampling" idea applied offline, as in Skywork-OR1 /
Polaris style data filtering) spends RL steps where the policy can still move.

Pieces:

* :func:`pass_rate_band` and :func:`histogram` are pure functions on ``{id: pass rate}``.
* :func:`estimate_pass_rates` samples k rollouts per prompt (batched, with
  :class:`she.training.prm.PolicySampler`, which reuses :mod:`she.evaluation.generate`'s autocast),
  parses each with :func:`she.reasoning.parse.parse_trace` (a rollout passes when its parsed label equals
  the gold label) and appends one JSON line per prompt to a cache, so an interrupted run resumes where it
  stopped.
* :func:`difficulty_report` gives the histogram before and after the band (and an optional PNG).

The pass rate is measured with the *starting* policy; it drifts as RL trains. Re-estimating per
curriculum stage is possible (point each stage at a new cache) but is not automated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.schema import StepSchema

log = logging.getLogger(__name__)

# (records, k) -> k completion texts per record, in record order
GenerateFn = Callable[[Sequence[Record], int], list[list[str]]]


# ------------------------------------------------------------------------------------------ pure helpers


def _check_rate(rid: Any, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
        raise UserError(f"pass rate of {rid!r} must be a number in [0, 1], got {p!r}")
    return float(p)


def pass_rate_band(pass_rates: Mapping[str, float], low: float = 0.0, high: float = 1.0,
                   inclusive: bool = False) -> list[str]:
    """Ids whose pass rate lies in the band, in the mapping's order.

    ``inclusive=False`` (default) keeps ``low < p < high``: with the defaults, every prompt that is
    neither always solved nor never solved -- exactly the prompts with non-zero GRPO reward variance.
    ``inclusive=True`` keeps ``low <= p <= high``.
    """
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
        raise UserError(f"band limits must lie in [0, 1], got low={low}, high={high}")
    if low > high:
        raise UserError(f"band is empty: low={low} > high={high}")
    out = []
    for rid, p in pass_rates.items():
        p = _check_rate(rid, p)
        if (low <= p <= high) if inclusive else (low < p < high):
            out.append(rid)
    return out


def rollout_bin_edges(k: int) -> list[float]:
    """Bin edges with one bin per attainable pass rate ``0, 1/k, ..., 1`` (centred on each value).

    With k rollouts a pass rate can only be ``j/k``; equal-width bins on [0, 1] would merge some of
    these values, so the report uses these edges.
    """
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    h = 0.5 / k
    return [-h + j / k for j in range(k + 1)] + [1.0 + h]


def histogram(pass_rates: Mapping[str, float], bins: int | Sequence[float] = 10) -> dict[str, Any]:
    """Counts of pass rates per bin: ``{"edges": [...], "counts": [...], "n": N}``.

    ``bins`` is a number of equal-width bins on [0, 1] or explicit increasing edges. Bins are
    half-open ``[e_i, e_{i+1})`` except the last, which is closed, so 1.0 falls in the last bin with
    integer ``bins``. A rate outside all bins raises (nothing is silently dropped).
    """
    if isinstance(bins, int):
        if bins < 1:
            raise UserError(f"bins must be >= 1, got {bins}")
        edges = [j / bins for j in range(bins + 1)]
    else:
        edges = [float(e) for e in bins]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"bin edges must be at least two increasing numbers, got {list(bins)}")
    counts = [0] * (len(edges) - 1)
    for rid, p in pass_rates.items():
        p = _check_rate(rid, p)
        if p < edges[0] or p > edges[-1]:
            raise UserError(f"pass rate {p} of {rid!r} lies outside the bin edges [{edges[0]}, {edges[-1]}]")
        j = next(i for i in range(len(counts)) if p < edges[i + 1] or i == len(counts) - 1)
        counts[j] += 1
    return {"edges": edges, "counts": counts, "n": len(pass_rates)}


def difficulty_report(pass_rates: Mapping[str, float], kept_ids: Sequence[str], k: int | None = None,
                      png_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Histogram of the pass rates before and after filtering, plus the share of each extreme.

    ``k`` (rollouts per prompt) picks one bin per attainable rate; without it 10 equal bins are used.
    ``png_path`` also draws both histograms as a bar chart.
    """
    kept = set(kept_ids)
    missing = kept - set(pass_rates)
    if missing:
        raise UserError(f"{len(missing)} kept id(s) have no pass rate (first: {sorted(missing)[0]!r})")
    after = {rid: p for rid, p in pass_rates.items() if rid in kept}
    bins: int | list[float] = rollout_bin_edges(k) if k else 10
    n = max(len(pass_rates), 1)
    rep = {
        "n_before": len(pass_rates),
        "n_after": len(after),
        "share_all_fail": sum(1 for p in pass_rates.values() if p == 0.0) / n,
        "share_all_pass": sum(1 for p in pass_rates.values() if p == 1.0) / n,
        "mean_pass_rate_before": sum(pass_rates.values()) / n,
        "mean_pass_rate_after": sum(after.values()) / max(len(after), 1),
        "before": histogram(pass_rates, bins),
        "after": histogram(after, bins),
    }
    if png_path is not None:
        plot_histograms(rep["before"], rep["after"], Path(png_path))
        rep["plot"] = str(png_path)
    return rep


def plot_histograms(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = before["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = (edges[1] - edges[0]) * 0.4
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([c - width / 2 for c in centres], before["counts"], width=width, label=f"before (n={before['n']})")
    ax.bar([c + width / 2 for c in centres], after["counts"], width=width, label=f"after (n={after['n']})")
    ax.set_xlabel("pass rate of the starting policy")
    ax.set_ylabel("prompts")
    ax.set_title("difficulty filter")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- the cache


def read_cache(cache_path: str | os.PathLike, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """``{id: entry}`` from a pass-rate cache (JSONL, one prompt per line).

    A last line without its newline that is not valid JSON is what a crash during an append leaves: it
    is ignored with a warning (and cut off the file when ``repair`` is true, so the next append starts
    on a clean line). Any other bad line raises ``ValueError`` naming the file, line and field.
    """
    p = Path(cache_path)
    if not p.exists():
        return {}
    data = p.read_bytes()
    out: dict[str, dict[str, Any]] = {}
    lines = data.split(b"\n")
    offset = 0
    for n, raw in enumerate(lines, 1):
        last = n == len(lines)
        start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if last:  # no newline after it: an interrupted append
                log.warning("%s:%d: ignoring a truncated last line (%s)", p, n, e)
                if repair:
                    with open(p, "r+b") as f:
                        f.truncate(start)
                break
            raise UserError(f"{p}:{n}: invalid JSON: {e}") from None
        for key in ("id", "k", "passes"):
            if key not in d:
                raise UserError(f"{p}:{n}: field {key!r} is missing")
        if not isinstance(d["k"], int) or not isinstance(d["passes"], int) or not 0 <= d["passes"] <= d["k"]:
            raise UserError(f"{p}:{n}: field 'passes' must be an integer in [0, k], got {d['passes']!r} (k={d['k']!r})")
        out[str(d["id"])] = d
    else:
        if repair and data and not data.endswith(b"\n"):  # a whole last entry that lost only its newline
            with open(p, "ab") as f:
                f.write(b"\n")
    return out


def load_pass_rates(cache_path: str | os.PathLike) -> dict[str, float]:
    """``{id: pass rate}`` from a cache written by :func:`estimate_pass_rates`."""
    return {rid: d["passes"] / d["k"] for rid, d in read_cache(cache_path).items()}


def score_rollouts(record: Record, texts: Sequence[str], schema: StepSchema | None = None) -> dict[str, Any]:
    """The cache entry of one prompt: parsed labels of its rollouts (in ``schema``; None = the built-in schema of
    the record's taxonomy) and how many equal the gold label."""
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import default_schema

    schema = schema or default_schema(record.taxonomy)
    labels = [parse_trace(t, schema).label for t in texts]
    passes = sum(lab is not None and lab == record.label for lab in labels)
    return {"id": record.id, "gold": record.label, "k": len(texts), "passes": passes,
            "pass_rate": passes / max(len(texts), 1), "labels": labels}


# ----------------------------------------------------------------------------------------- estimation


def model_generate_fn(model_dir_or_model: Any, *, batch_size: int = 32, temperature: float = 1.0,
                      max_new_tokens: int = 96, prompt_style: str | None = None, top_p: float = 1.0,
                      bf16: bool = False, seed: int = 0, schema: StepSchema | None = None) -> GenerateFn:
    """A :data:`GenerateFn` sampling from a policy folder / registered name, or a ``(model, tokenizer)`` pair.

    ``prompt_style`` defaults to the style the model was trained with (``she.json``), else ``full``; ``schema``
    is the step schema of the prompts (None = the built-in one).
    ``batch_size`` is the number of sequences per ``generate`` call (k rollouts of a prompt count k).
    """
    from she.training.prm import PolicySampler

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        from she.models.metadata import prompt_style_of
        from she.models.registry import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_dir_or_model)
        style = prompt_style or prompt_style_of(model_dir_or_model)
    elif isinstance(model_dir_or_model, tuple) and len(model_dir_or_model) == 2:
        model, tok = model_dir_or_model
        style = prompt_style or "full"
    else:
        raise TypeError("model_dir_or_model must be a model folder/name, a (model, tokenizer) pair or a "
                        f"generate function (records, k) -> texts; got {type(model_dir_or_model).__name__}")
    sampler = PolicySampler(model, tok, prompt_style=style, top_p=top_p, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, bf16=bf16, seed=seed, schema=schema)

    def generate(records: Sequence[Record], k: int) -> list[list[str]]:
        return sampler([(r, "") for r in records], k, temperature)

    return generate


def estimate_pass_rates(
    model_dir_or_model: Any,
    records: Sequence[Record],
    k: int,
    cache_path: str | os.PathLike,
    *,
    batch_size: int = 32,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    prompt_style: str | None = None,
    taxonomy: str | None = None,
    chunk_prompts: int | None = None,
    bf16: bool = False,
    seed: int = 0,
    progress: bool = True,
    schema: StepSchema | None = None,
) -> dict[str, float]:
    """Pass rate of every record under k sampled rollouts, cached and resumable.

    ``model_dir_or_model`` is a model folder or registered name, a ``(model, tokenizer)`` pair, or a
    generate function ``(records, k) -> [[text] * k per record]`` (tests inject a fake one). Records
    already in the cache are not sampled again; the others are sampled ``chunk_prompts`` prompts at a
    time (default ``max(1, batch_size // k)``, one generate batch) and each prompt's entry is appended
    and flushed as soon as its chunk is done. ``taxonomy`` overrides the records' own taxonomy for
    parsing. ``schema`` is the step schema the policy writes (prompts and parsing); None = the model's own
    (``she.json``; the built-in one for a ``(model, tokenizer)`` pair or a generate function). A cached entry
    whose ``k`` or gold label differs from this call raises: mixing pass rates measured under other settings
    would be silent corruption. Returns ``{id: pass rate}`` for ``records`` (in their order).
    """
    from tqdm.auto import tqdm

    from she.data.validation import check_labelled_unique
    from she.models.metadata import model_step_schema
    from she.reasoning.schema import schema_for

    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    check_labelled_unique(records, "pass rates need labelled records")
    cache = Path(cache_path)
    cached = read_cache(cache, repair=True)
    for r in records:
        d = cached.get(r.id)
        if d is None:
            continue
        if d["k"] != k:
            raise UserError(f"{cache}: record {r.id} was cached with k={d['k']}, this run asks for k={k}; "
                            "use another cache file")
        if d.get("gold") is not None and d["gold"] != r.label:
            raise UserError(f"{cache}: record {r.id} was cached with gold label {d['gold']!r}, the data now says "
                            f"{r.label!r}; use another cache file")
    todo = [r for r in records if r.id not in cached]
    if todo:
        schema = schema or model_step_schema(model_dir_or_model, taxonomy or todo[0].taxonomy)
        if callable(model_dir_or_model) and not isinstance(model_dir_or_model, tuple) \
                and not _is_module(model_dir_or_model):
            generate: GenerateFn = model_dir_or_model
        else:
            generate = model_generate_fn(model_dir_or_model, batch_size=batch_size, temperature=temperature,
                                         max_new_tokens=max_new_tokens, prompt_style=prompt_style, bf16=bf16,
                                         seed=seed, schema=schema)
        schemas: dict[str, Any] = {}
        chunk = chunk_prompts or max(1, batch_size // k)
        cache.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="pass rates", unit="prompt",
                   disable=not progress)
        with open(cache, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                texts = generate(part, k)
                if len(texts) != len(part) or any(len(t) != k for t in texts):
                    raise ValueError(f"generate function returned {[len(t) for t in texts]} texts for {len(part)} "
                                     f"prompt(s); expected {k} each")
                for r, ts in zip(part, texts):
                    tax = taxonomy or r.taxonomy
                    entry = score_rollouts(r, ts, schemas.setdefault(tax, schema_for(schema, tax)))
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    cached[r.id] = entry
                f.flush()
                bar.update(len(part))
        bar.close()
    return {r.id: cached[r.id]["passes"] / cached[r.id]["k"] for r in records}


def _is_module(x: Any) -> bool:
    try:
        import torch

        return isinstance(x, torch.nn.Module)
    except ImportError:  # pragma: no cover
        return False


def filter_by_pass_rate(records: Sequence[Record], pass_rates: Mapping[str, float], low: float = 0.0,
                        high: float = 1.0, inclusive: bool = False) -> list[Record]:
    """The records whose pass rate lies in the band (see :func:`pass_rate_band`), in input order.

    A record without a pass rate raises: filtering must never drop a record just because it was not
    measured.
    """
    missing = [r.id for r in records if r.id not in pass_rates]
    if missing:
        raise UserError(f"{len(missing)} record(s) have no pass rate (first: {missing[0]!r}); "
                        "estimate them first (`she data filter`)")
    keep = set(pass_rate_band({r.id: pass_rates[r.id] for r in records}, low, high, inclusive))
    return [r for r in records if r.id in keep]


__all__ = [
    "GenerateFn",
    "difficulty_report",
    "estimate_pass_rates",
    "filter_by_pass_rate",
    "histogram",
    "load_pass_rates",
    "model_generate_fn",
    "pass_rate_band",
    "plot_histograms",
    "read_cache",
    "rollout_bin_edges",
    "score_rollouts",
]
