"""Precedence for every config-driven command: built-in defaults < the YAML < explicit flags (issue 14 item 1).

A flag the user did not type never overrides the YAML (the old bug: `--format auto` / `--on-error fail`
defaults overwrote `data: {format: jsonl, on_error: skip}`). Each command is checked three ways through the real
parser and loader (`she.cli.job_config`): YAML only, YAML plus flags, and generic `--KEY VALUE` overrides."""

import logging

import pytest

from she import cli
from she.config import NULL, ConfigError, DataConfig, SFTJobConfig, load_config, parse_overrides

DATA_YAML = "data:\n  format: jsonl\n  on_error: skip\n  taxonomy: esci4\n  max_train: 7\n"


def load(argv):
    a, extras = cli.build_parser().parse_known_args(argv)
    a.argv, a.extras = argv, extras
    return cli.job_config(a)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# command -> (YAML body, getter of the data section, key the YAML sets, its value, flag + value, flag's value)
JOBS = {
    "train sft": (DATA_YAML + "learning_rate: 0.5\n", lambda c: c.data, lambda c: c.learning_rate, 0.5,
                  ["--learning-rate", "0.25"], 0.25),
    "train srpo": (DATA_YAML + "max_steps: 9\n", lambda c: c.data, lambda c: c.max_steps, 9, ["--max-steps", "3"], 3),
    "train grpo": (DATA_YAML + "max_steps: 9\n", lambda c: c.data, lambda c: c.max_steps, 9, ["--max-steps", "3"], 3),
    "train prm": (DATA_YAML + "policy: p1\n", lambda c: c.data, lambda c: c.policy, "p1", ["--policy", "p2"], "p2"),
    "train dpo": (DATA_YAML + "model: m1\n", lambda c: c.data, lambda c: c.model, "m1", ["--model", "m2"], "m2"),
    "train rm": (DATA_YAML + "output_dir: o1\n", lambda c: c.data, lambda c: c.output_dir, "o1",
                 ["--output-dir", "o2"], "o2"),
    "train cross-encoder": (DATA_YAML + "per_device_train_batch_size: 5\n", lambda c: c.data,
                            lambda c: c.per_device_train_batch_size, 5, ["--batch-size", "6"], 6),
    "demo": (DATA_YAML + "sft:\n  max_steps: 4\n", lambda c: c.data, lambda c: c.sft.max_steps, 4,
             ["--max-steps", "2"], 2),
    "train curriculum": ("rl:\n  " + DATA_YAML.replace("\n  ", "\n    ") + "  model: m1\n"
                         "curriculum:\n  stages:\n    - name: all\n", lambda c: c.rl.data, lambda c: c.rl.model, "m1",
                         ["--model", "m2"], "m2"),
    "compare": (DATA_YAML + "output_dir: o1\nrows: [majority]\n", lambda c: c.data, lambda c: c.output_dir, "o1",
                ["--output-dir", "o2"], "o2"),
}


def argv_for(cmd, path):
    return ["compare", path] if cmd == "compare" else [*cmd.split(), "--config", path]


@pytest.mark.parametrize("cmd", sorted(JOBS))
def test_yaml_wins_over_defaults_and_flags_win_over_yaml(cmd, tmp_path):
    body, data_of, key_of, yaml_value, flag, flag_value = JOBS[cmd]
    path = write(tmp_path, body)
    cfg = load(argv_for(cmd, path))  # no flags: the YAML's data section survives whole
    d = data_of(cfg)
    assert (d.format, d.on_error, d.taxonomy, d.max_train) == ("jsonl", "skip", "esci4", 7)
    assert key_of(cfg) == yaml_value
    assert d.split_seed == DataConfig().split_seed  # not in the YAML: the built-in default

    data_flags = ["--format", "wands", "--on-error", "fail", "--data", "x.tsv"]
    if cmd == "compare":  # no data flags of its own: the generic keys
        data_flags = ["--data.format", "wands", "--data.on_error", "fail", "--data.path", "x.tsv"]
    cfg = load(argv_for(cmd, path) + data_flags + flag)
    d = data_of(cfg)
    assert (d.format, d.on_error, d.path, d.taxonomy) == ("wands", "fail", "x.tsv", "esci4")
    assert key_of(cfg) == flag_value


@pytest.mark.parametrize("cmd", sorted(JOBS))
def test_generic_overrides(cmd, tmp_path):
    body, data_of, _key_of, _v, _f, _fv = JOBS[cmd]
    path = write(tmp_path, body)
    prefix = "--rl." if cmd == "train curriculum" else "--"
    cfg = load(argv_for(cmd, path) + [f"{prefix}data.max_train", "11", f"{prefix}data.split_seed=3"])
    d = data_of(cfg)
    assert (d.max_train, d.split_seed, d.format) == (11, 3, "jsonl")


def test_grpo_is_grpo_whatever_the_yaml_says(tmp_path):
    path = write(tmp_path, "step_rewards: true\n")
    assert load(["train", "srpo", "--config", path]).step_rewards is True
    assert load(["train", "grpo", "--config", path]).step_rewards is False


def test_eval_data_config_precedence(tmp_path, monkeypatch):
    """`she eval --data-config`: the job's data section, then the flags given (only those)."""
    path = write(tmp_path, DATA_YAML)
    seen = {}

    def fake_eval_records(cfg, split):
        seen["cfg"], seen["split"] = cfg, split
        raise SystemExit(0)

    monkeypatch.setattr("she.data.sources.eval_records", fake_eval_records)
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "m", "--out", str(tmp_path / "o"), "--data-config", path])
    assert (seen["cfg"].format, seen["cfg"].on_error, seen["cfg"].max_train) == ("jsonl", "skip", 7)
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "m", "--out", str(tmp_path / "o"), "--data-config", path, "--format", "esci",
                  "--data.max_train", "2"])
    assert (seen["cfg"].format, seen["cfg"].on_error, seen["cfg"].max_train) == ("esci", "skip", 2)


def test_sft_flags_from_the_issue(tmp_path):
    path = write(tmp_path, "lora: true\nseed: 4\nreport_to: wandb\n")
    cfg = load(["train", "sft", "--config", path])
    assert (cfg.lora, cfg.seed, cfg.report_to) == (True, 4, "wandb")
    cfg = load(["train", "sft", "--config", path, "--no-lora", "--seed", "5", "--report-to", "none",
                "--batch-size", "3", "--num-train-epochs", "2", "--out", "o"])
    assert (cfg.lora, cfg.seed, cfg.report_to, cfg.per_device_train_batch_size, cfg.num_train_epochs,
            cfg.output_dir) == (False, 5, "none", 3, 2.0, "o")


def test_override_syntax():
    o = parse_overrides(SFTJobConfig, ["--learning_rate", "1e-5", "--data.max_train=100", "--lora", "--no-resume",
                                       "--lr-scheduler-type", "linear", "--traces_file", "null", "--schema", "007"])
    assert o == {"learning_rate": "1e-5", "data.max_train": 100, "lora": True, "resume": False,
                 "lr_scheduler_type": "linear", "traces_file": NULL, "schema": "007"}
    cfg = load_config(SFTJobConfig, None, o)
    assert cfg.learning_rate == 1e-5 and cfg.data.max_train == 100 and cfg.schema == "007"
    assert parse_overrides(SFTJobConfig, ["--lora", "false"]) == {"lora": False}
    with pytest.raises(ConfigError, match="unknown option --lerning_rate"):
        parse_overrides(SFTJobConfig, ["--lerning_rate", "1"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(SFTJobConfig, ["--learning_rate"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(SFTJobConfig, ["stray"])
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got 'fast'"):
        load_config(SFTJobConfig, None, parse_overrides(SFTJobConfig, ["--learning_rate", "fast"]))


def test_a_null_flag_sets_the_key_and_is_not_taken_for_a_flag_not_given(tmp_path):
    # `she demo --config best-cpu.yaml --rl null` once went on to train the RL stage: the null read as "not given"
    path = write(tmp_path, "rl:\n  max_steps: 3\nsft:\n  seed: 4\n")
    assert load(["demo", "--config", path]).rl is not None
    assert load(["demo", "--config", path, "--rl", "null"]).rl is None
    assert load(["demo", "--config", path, "--rl=null"]).rl is None
    assert load(["train", "sft", "--traces-file", "x.jsonl", "--traces-file", "null"]).traces_file is None
    with pytest.raises(ConfigError, match="learning_rate"):  # a key that cannot be null says so
        load_config(SFTJobConfig, None, parse_overrides(SFTJobConfig, ["--learning_rate", "null"]))
    assert load_config(SFTJobConfig, None, {"lora": None}).lora is False  # None: a flag not given, as before


def test_unknown_flag_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "sft", "--lerning-rate", "1", "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown option --lerning-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # commands without a config keep argparse's strict check
        cli.main(["data", "stats", "x.jsonl", "--learning_rate", "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_deprecated_keys_still_load_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, "epochs: 2\nbatch_size: 3\n")
    with caplog.at_level(logging.WARNING, logger="she.config"):
        cfg = load_config(SFTJobConfig, path)
    assert cfg.num_train_epochs == 2.0 and cfg.per_device_train_batch_size == 3
    assert cfg.epochs == 2.0 and cfg.batch_size == 3  # the old attribute names read the new fields
    assert "use num_train_epochs" in caplog.text and "use per_device_train_batch_size" in caplog.text
    # the flag overrides the key whatever name the file used
    assert load_config(SFTJobConfig, path, {"num_train_epochs": 5}).num_train_epochs == 5.0
    path2 = write(tmp_path, "epochs: 2\nnum_train_epochs: 3\n", "both.yaml")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(SFTJobConfig, path2)


def test_literal_options_are_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.format: 'csv' is not one of"):
        load_config(SFTJobConfig, write(tmp_path, "data:\n  format: csv\n"))
    with pytest.raises(ConfigError, match=r"target: 'labels' is not one of \['reasoning', 'label'\]"):
        load_config(SFTJobConfig, write(tmp_path, "target: labels\n", "t.yaml"))


def test_version_and_help_on_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("she ")
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if action.option_strings and not action.help and action.dest != "help":
                missing.append(f"{path} {action.option_strings[0]}")
            if action.choices and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(cli.build_parser(), "she")
    assert missing == []
