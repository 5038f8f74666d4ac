import pytest

from she.config import ConfigError, DemoConfig, SFTJobConfig, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny\nepochs: 2\ndata:\n  cuts: [1.5, 2.25]\n  max_train: 10\n")
    cfg = load_config(SFTJobConfig, p, {"learning_rate": 0.5, "data.path": "x.csv", "lora": None})
    assert cfg.model == "tiny" and cfg.epochs == 2.0 and isinstance(cfg.epochs, float)
    assert cfg.data.cuts == (1.5, 2.25) and cfg.data.max_train == 10 and cfg.data.path == "x.csv"
    assert cfg.learning_rate == 0.5
    assert cfg.lora is False  # a None override leaves the default


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sft:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.sft: unknown key\(s\) \['epocs'\]"):
        load_config(DemoConfig, p)


def test_type_errors(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        load_config(SFTJobConfig, p)
    p.write_text("bf16: 1\n")
    with pytest.raises(ConfigError, match="bf16: expected true/false"):
        load_config(SFTJobConfig, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTJobConfig, tmp_path / "missing.yaml")


def test_partial_section_keeps_parent_defaults():
    cfg = load_config(DemoConfig, None, {"data.path": "x.csv", "sft.epochs": 2})
    assert cfg.data.path == "x.csv"
    assert cfg.data.max_train == DemoConfig().data.max_train == 480  # the demo's sizing survives
    assert cfg.sft.epochs == 2.0 and cfg.sft.save_steps == DemoConfig().sft.save_steps == 30


def test_train_cap_does_not_change_test_sample():
    from she.config import DataConfig
    from she.data.sources import load_splits

    a = load_splits(DataConfig(synthetic_queries=60, max_train=50, max_eval=20))
    b = load_splits(DataConfig(synthetic_queries=60, max_train=80, max_eval=20))
    assert [r.id for r in a["test"]] == [r.id for r in b["test"]]
    assert len(a["train"]) == 50 and len(b["train"]) == 80 and len(a["test"]) == 20
