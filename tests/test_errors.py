"""User errors have their own type; it stays a ValueError so existing callers and tests keep working.

The CLI prints a user error as one line and exits with status 2; any other exception (an internal bug, such as
a shape check's ValueError) propagates with its traceback."""

import pytest

import she.cli
from she.config import ConfigError
from she.data.validation import DataError
from she.errors import UserError


def test_config_and_data_errors_are_user_errors_and_value_errors():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)
    assert issubclass(DataError, UserError)
    e = DataError("not a number: 'abc'", path="train.csv", line=17, field="relevance")
    assert str(e) == "train.csv:17: field 'relevance': not a number: 'abc'"


def test_cli_prints_a_user_error_as_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SHE_DEBUG", raising=False)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("learning_rate: 1\nno_such_key: 3\n")
    with pytest.raises(SystemExit) as e:
        she.cli.main(["train", "sft", "--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("she: error: ") and err.count("\n") == 1 and "no_such_key" in err, err
    assert "Traceback" not in err


def test_cli_user_error_raised_in_a_handler_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("SHE_DEBUG", raising=False)

    def bad_input(a):
        raise UserError("bad.jsonl:3: field 'query': must be a non-empty string")

    monkeypatch.setattr(she.cli, "_cmd_predict", bad_input)
    with pytest.raises(SystemExit) as e:
        she.cli.main(["predict", "--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "she: error: bad.jsonl:3: field 'query': must be a non-empty string\n"


@pytest.mark.parametrize("exc", [ValueError("shapes [4, 3] and [4, 2] differ"), KeyError("step"),
                                 RuntimeError("impossible state")])
def test_cli_internal_errors_propagate_with_their_traceback(exc, capsys, monkeypatch):
    monkeypatch.delenv("SHE_DEBUG", raising=False)

    def internal_bug(a):
        raise exc

    monkeypatch.setattr(she.cli, "_cmd_predict", internal_bug)
    with pytest.raises(type(exc)) as e:
        she.cli.main(["predict", "--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"])
    assert e.value is exc and not isinstance(e.value, UserError)
    assert "she: error" not in capsys.readouterr().err
