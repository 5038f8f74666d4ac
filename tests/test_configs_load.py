"""Every config in configs/ is accepted by the command its own header names (issue 11 item 4, issue 14 item 2).

Each `she ...` command written in a config's leading comment block (also the `-m she.cli ...` lines of the
accelerate configs) is parsed by the real CLI parser and its config loaded by the loader that command uses
(`she.cli.job_config`): unknown keys, wrong types, bad option values and unknown flags all fail here. Nothing
is trained and no data is read."""

import re
import shlex
from pathlib import Path

import pytest

from she import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ACCELERATE = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXAMPLES = {"sft.yaml": ("train", "sft"), "rl.yaml": ("train", "srpo"), "prm.yaml": ("train", "prm"),
            "dpo.yaml": ("train", "dpo"), "rm.yaml": ("train", "rm"), "ce.yaml": ("train", "cross-encoder")}


def header_commands(path: Path) -> list[str]:
    """The she commands of the leading comment block (continuation lines joined, trailing comments cut)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        m = re.search(r"(?:^|\s)(?:she|-m she\.cli)\s+(\w.*)$", line)
        if m and ("--config" in line or " compare " in f" {m.group(1)}"):
            out.append(re.split(r"\s{2,}#|\s+\(", m.group(1))[0].split("`")[0].strip())
    return out


def load_through_cli(command: str):
    argv = shlex.split(command)
    parser = cli.build_parser()
    a, extras = parser.parse_known_args(argv)
    a.argv, a.extras = argv, extras
    assert cli._job_class(a) is not None, f"{command!r} is not a config-driven command"
    cwd = Path.cwd()
    try:
        import os

        os.chdir(REPO)  # the commands are written for the repository root
        return cli.job_config(a)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_names_its_command_and_loads_through_it(path):
    commands = header_commands(path)
    own = [c for c in commands if f"configs/{path.name}" in c]
    assert own, f"{path.name}: the header names no she command that runs this config"
    for command in own:
        load_through_cli(command)


@pytest.mark.parametrize("path", CONFIGS + ACCELERATE, ids=lambda p: p.name)
def test_every_command_in_a_header_loads(path):
    """Headers also name the commands of the configs they build on (a compare config lists its SFT and PRM
    runs; an accelerate config its she job): those must run as written too."""
    for command in header_commands(path):
        load_through_cli(command)


def test_accelerate_headers_point_at_a_config_that_exists():
    for path in ACCELERATE:
        commands = header_commands(path)
        assert commands, path.name
        for command in commands:
            for name in re.findall(r"--config (\S+)", command):
                assert (REPO / name).is_file(), f"{path.name}: {name} does not exist"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_per_job_kind(name):
    path = REPO / "configs" / name
    commands = [c for c in header_commands(path) if f"configs/{name}" in c]
    assert any(shlex.split(c)[:2] == list(EXAMPLES[name]) for c in commands), commands
    cfg = load_through_cli(f"{' '.join(EXAMPLES[name])} --config configs/{name}")
    assert cfg.output_dir.startswith("runs/")


def test_docs_point_at_configs_that_exist():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for name in re.findall(r"configs/[\w./-]+\.yaml", doc.read_text(encoding="utf-8")):
            assert (REPO / name).is_file(), f"{doc.name} names {name}, which does not exist"


def test_header_parser_finds_commands(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("# text\n#   she train sft --config configs/x.yaml --lora   # a comment\n"
                 "#   accelerate launch --config_file a.yaml \\\n#       -m she.cli train srpo --config configs/rl.yaml\n"
                 "model: m\n# she train dpo --config configs/not-in-header.yaml\n")
    assert header_commands(p) == ["train sft --config configs/x.yaml --lora",
                                  "train srpo --config configs/rl.yaml"]


def test_pyproject_package_data_exists():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    for pkg, globs in meta.get("tool", {}).get("setuptools", {}).get("package-data", {}).items():
        for g in globs:
            assert list((REPO / "src" / pkg.replace(".", "/")).glob(g)), f"package-data {pkg}: {g} matches nothing"


def test_data_section_reads_any_configs_split(tmp_path):
    """`data_section` (the scripts' --data-config): a compare config's and a job config's data: section alike; a
    file without one is a config error naming it."""
    from she.config import ConfigError, DataConfig, data_section

    d = data_section(REPO / "configs" / "compare-cpu-decision-3k.yaml")
    assert isinstance(d, DataConfig) and d.max_eval == 1000 and d.cuts == (1.75, 2.5) and d.balance_train
    assert data_section(REPO / "configs" / "ce-hd-3k.yaml").max_train == 3000
    bad = tmp_path / "nodata.yaml"
    bad.write_text("model: x\n")
    with pytest.raises(ConfigError, match="nodata.yaml: no `data:` section"):
        data_section(bad)
    bad.write_text("data: [1, 2]\n")
    with pytest.raises(ConfigError, match="no `data:` section"):
        data_section(bad)
