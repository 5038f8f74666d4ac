"""`torch_compile` and `pad_to_multiple_of` in SFT change how the steps are computed, not what they compute."""

import json

import pytest


def _losses(tmp_path, tiny_model_dir, name: str, **kw) -> list[float]:
    from she.config import DataConfig, SFTJobConfig
    from she.data.sources import load_splits
    from she.training.sft import train_sft

    cfg = SFTJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / name), max_steps=3, save_steps=100,
                       batch_size=4, logging_steps=1, report_to="none", data=DataConfig(synthetic_queries=20),
                       bf16=False, resume=False, **kw)
    train_sft(cfg, load_splits(cfg.data)["train"])
    hist = json.loads((tmp_path / name / "log_history.json").read_text())
    return [float(h["loss"]) for h in hist if "loss" in h]


@pytest.mark.slow
def test_compiled_sft_matches_eager_and_really_compiles(tmp_path, tiny_model_dir):
    from torch._dynamo.utils import counters

    eager = _losses(tmp_path, tiny_model_dir, "eager")
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = _losses(tmp_path, tiny_model_dir, "compiled", torch_compile=True, pad_to_multiple_of=16)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo captured the model: not eager in disguise
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=2e-3)  # same batches, same maths; padding is masked out
    assert json.loads((tmp_path / "compiled" / "she_config.json").read_text())["torch_compile"] is True


def test_sft_config_takes_compile_switches():
    from she.config import SFTJobConfig, from_dict

    cfg = from_dict(SFTJobConfig, {"torch_compile": True, "pad_to_multiple_of": 8})
    assert cfg.torch_compile is True and cfg.pad_to_multiple_of == 8
    assert SFTJobConfig().torch_compile is False and SFTJobConfig().pad_to_multiple_of is None


def test_bench_sft_marginal_rate_leaves_the_warm_up_out(load_script):
    bench = load_script("bench_sft")
    hist = [{"loss": 1.0, "num_tokens": 100.0, "wall_s": 80.0, "step": 1},   # a slow first step: the compile
            {"loss": 0.9, "num_tokens": 300.0, "wall_s": 82.0, "step": 2},
            {"loss": 0.8, "num_tokens": 500.0, "wall_s": 84.0, "step": 3},
            {"loss": 0.7, "num_tokens": 700.0, "wall_s": 86.0, "step": 4},
            {"train_runtime": 86.0, "step": 4}]
    assert bench.marginal_rate(hist, 2) == (100.0, 2)  # (700 - 300) tokens / (86 - 82) s over steps 2..4
    assert bench.marginal_rate(hist, 4) is None  # one entry: no interval
    assert bench.marginal_rate([{k: v for k, v in h.items() if k != "wall_s"} for h in hist], 1) is None
