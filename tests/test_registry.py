import pytest

from she.models.registry import count_parameters, load_model_and_tokenizer, resolve_model


def test_tiny_model_is_small_and_chat_ready(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert 50_000 < count_parameters(model) < 1_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "drill"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = tok("Verdict: Exact ünïcode 🙂")["input_ids"]
    assert tok.decode(ids) == "Verdict: Exact ünïcode 🙂"


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_unprepared_name_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="she model prepare tiny"):
        resolve_model("tiny", prepare_if_missing=False)
