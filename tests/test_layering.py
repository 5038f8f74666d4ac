"""The package layers of docs/design.md ("Layers"), checked on every import of every module -- top-level and
function-local alike (a local import is still an arrow; it only hides a cycle until run time).

A module may import from its own package, from any package of a lower tier, and, inside one tier, only in
the direction listed in ``SAME_TIER``. ``cli`` (a module) counts as a package of the top tier.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "she"

# lowest first; docs/design.md draws the same picture
TIERS: list[tuple[str, ...]] = [
    ("errors", "runtime", "patching", "config", "algorithms", "data", "reasoning", "models"),  # core
    ("rewards", "evaluation"),
    ("training", "sampling"),
    ("recipes", "serving", "annotation", "cli"),
]
# inside a tier: (importer, imported) pairs that are allowed; everything else between two packages of one tier
# is refused
SAME_TIER = {
    ("config", "errors"), ("data", "errors"), ("data", "config"), ("reasoning", "errors"), ("reasoning", "data"),
    ("runtime", "errors"), ("models", "errors"), ("models", "data"), ("models", "reasoning"), ("models", "patching"),
    ("algorithms", "errors"),
    ("evaluation", "rewards"),
    ("sampling", "training"),
    ("cli", "recipes"), ("cli", "serving"), ("cli", "annotation"),
}
TIER = {pkg: i for i, tier in enumerate(TIERS) for pkg in tier}


def _package(module: str) -> str:
    """``she.training.sft`` -> ``training``; ``she.cli`` -> ``cli``."""
    return module.split(".")[1]


def _module_name(path: Path, root: Path = SRC) -> str:
    parts = ("she",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported she module) of every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path, root)
    pkg_parts = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "she"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "she":
                continue
            if name == "she":  # `from she import training` names packages
                out += [(node.lineno, f"she.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return out


def _allowed(src: str, dst: str) -> bool:
    if src == dst:
        return True
    if src not in TIER or dst not in TIER:
        return False
    if TIER[dst] < TIER[src]:
        return True
    return TIER[dst] == TIER[src] and (src, dst) in SAME_TIER


def _violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        src = _package(_module_name(path))
        for line, target in _imports(path):
            if target.count(".") < 1:
                continue
            dst = _package(target)
            if not _allowed(src, dst):
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {src} imports {target}")
    return bad


def test_every_package_is_in_a_tier():
    found = {_package(_module_name(p)) for p in SRC.rglob("*.py")}
    assert found <= set(TIER), f"packages missing from the layers (add them to TIERS and docs/design.md): {found - set(TIER)}"


def test_no_import_runs_against_the_layers():
    bad = _violations()
    assert not bad, "imports against the layers of docs/design.md:\n" + "\n".join(bad)


def test_the_checker_sees_local_and_relative_imports(tmp_path):
    """The rule itself: a function-local upward import is caught, a downward one is not."""
    assert not _allowed("training", "recipes") and not _allowed("rewards", "evaluation")
    assert _allowed("training", "evaluation") and _allowed("evaluation", "rewards") and _allowed("cli", "recipes")
    pkg = tmp_path / "she" / "training"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from she.recipes.compare import run_compare\n    from . import sft\n"
                 "    from ..models import metadata\n")
    assert [t for _, t in _imports(f, tmp_path / "she")] == ["she.recipes.compare", "she.training", "she.models"]
