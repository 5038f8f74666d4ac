"""Reasoning-path diversity of rollout groups: how many *different* step-conclusion paths the G rollouts of
one prompt take. With TRL's own ``entropy`` log it makes entropy / mode collapse visible during RL
(:class:`she.training.srpo.SRPOTrainer` logs :func:`mean_group_path_diversity` as ``srpo/path_diversity``).
"""

from __future__ import annotations

from collections.abc import Sequence

from she.reasoning.parse import parse_trace
from she.reasoning.schema import default_schema


def path_signature(text: str, schema=None, taxonomy: str = "hd3") -> tuple:
    """The sequence of step conclusions of one rollout, free-text steps left out.

    Free-text steps (the query / product analysis) are paraphrase-level: two rollouts that reach the
    same type relation, attribute checks and label took the same *reasoning path* even when they word
    the analysis differently. Unparseable rollouts all share the empty signature.
    """
    parsed = parse_trace(text, schema or default_schema(taxonomy))
    sig = []
    for s in parsed.steps:
        if s.kind == "free":
            continue
        c = s.conclusion
        sig.append((s.name, tuple(sorted(c.items())) if isinstance(c, dict) else c))
    return tuple(sig)


def path_diversity(group_texts: Sequence[str], schema=None, taxonomy: str = "hd3") -> float:
    """Share of distinct step-conclusion sequences in a rollout group: 1/G (collapsed) .. 1 (all different).

    When every rollout of a prompt walks the same path, GRPO has no contrast to learn from even if the
    reward could differ; a falling mean of this over training is the reasoning-level face of entropy
    collapse.
    """
    if not group_texts:
        raise ValueError("path_diversity: empty rollout group")
    return len({path_signature(t, schema, taxonomy) for t in group_texts}) / len(group_texts)


def mean_group_path_diversity(texts: Sequence[str], group_size: int, schema=None, taxonomy: str = "hd3") -> float:
    """Mean :func:`path_diversity` over consecutive groups of ``group_size`` rollouts (GRPO's layout:
    the G rollouts of one prompt are adjacent). Logged by SRPOTrainer as ``srpo/path_diversity``."""
    if group_size < 1 or not texts or len(texts) % group_size:
        raise ValueError(f"mean_group_path_diversity: {len(texts)} texts do not form groups of {group_size}")
    groups = [texts[i:i + group_size] for i in range(0, len(texts), group_size)]
    return sum(path_diversity(g, schema, taxonomy) for g in groups) / len(groups)


__all__ = ["mean_group_path_diversity", "path_diversity", "path_signature"]
