"""Weight averaging (`she model average`): the pure average against hand-computed tensors, and the folder I/O."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from she.cli import main
from she.errors import UserError
from she.models.soup import WEIGHTS, average_models, average_state_dicts, soup_weights


def test_soup_weights_normalise_and_reject_bad_input():
    assert soup_weights(2) == [0.5, 0.5]
    assert soup_weights(3, [1, 1, 2]) == [0.25, 0.25, 0.5]
    with pytest.raises(UserError, match="at least 2"):
        soup_weights(1)
    with pytest.raises(UserError, match="2 numbers for 3"):
        soup_weights(3, [1, 2])
    with pytest.raises(UserError, match=">= 0"):
        soup_weights(2, [1, -1])


def test_average_is_the_weighted_sum_by_hand():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "ids": torch.tensor([7, 8])}
    b = {"w": torch.tensor([[3.0, 6.0], [-1.0, 0.0]]), "ids": torch.tensor([7, 8])}
    out = average_state_dicts([a, b], [0.25, 0.75])
    # 0.25 * a + 0.75 * b, written out: [[0.25 + 2.25, 0.5 + 4.5], [0.75 - 0.75, 1.0 + 0.0]]
    assert torch.equal(out["w"], torch.tensor([[2.5, 5.0], [0.0, 1.0]]))
    assert torch.equal(out["ids"], torch.tensor([7, 8]))


def test_average_keeps_bf16_and_accumulates_in_float32():
    # the float32 sum (1 + 2**-8, not a bf16 number) rounded once, back in the ingredients' dtype
    a = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([1.0078125], dtype=torch.bfloat16)}
    out = average_state_dicts([a, b], [0.5, 0.5])
    assert out["w"].dtype == torch.bfloat16
    loop = (0.5 * a["w"].float() + 0.5 * b["w"].float()).to(torch.bfloat16)
    assert torch.equal(out["w"], loop)


def test_average_of_a_model_with_itself_is_the_model(tiny_model_dir, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(tiny_model_dir, other)
    meta = {"prompt_style": "compact", "label_offsets": {"Exact": 0.3}, "label_offsets_computed": {"Exact": 0.1}}
    (other / "she.json").write_text(json.dumps(meta))
    out = average_models([other, tiny_model_dir], tmp_path / "soup")
    got, want = load_file(str(out / WEIGHTS)), load_file(str(tiny_model_dir / WEIGHTS))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    soup_meta = json.loads((out / "she.json").read_text())
    assert soup_meta["prompt_style"] == "compact"
    assert not any(k.startswith("label_offsets") for k in soup_meta)  # fitted on an ingredient: refit the soup
    assert soup_meta["soup"]["weights"] == [0.5, 0.5]
    assert (out / "config.json").is_file()


def test_mismatched_folders_name_the_file_and_tensor(tiny_model_dir, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(tiny_model_dir, other)
    state = load_file(str(other / WEIGHTS))
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3, dtype=state[key].dtype)
    save_file(state, str(other / WEIGHTS))
    with pytest.raises(UserError, match=rf"{other / WEIGHTS}: tensor '{key}' is \(3, 3\)"):
        average_models([tiny_model_dir, other], tmp_path / "soup")
    del state[key]
    save_file(state, str(other / WEIGHTS))
    lacks = re.escape(f"{other / WEIGHTS}: no tensor '{key}', which {tiny_model_dir / WEIGHTS} has")
    with pytest.raises(UserError, match=lacks):  # the first folder has it
        average_models([tiny_model_dir, other], tmp_path / "soup")
    with pytest.raises(UserError, match=lacks):  # the second folder has it
        average_models([other, tiny_model_dir], tmp_path / "soup")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        average_models([tiny_model_dir, tiny_model_dir], tmp_path / "a_file")
    with pytest.raises(UserError, match="no model.safetensors"):
        average_models([tiny_model_dir, tmp_path], tmp_path / "soup2")


def test_cli_average_writes_a_folder_and_refuses_a_used_one(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "soup"
    main(["model", "average", str(tiny_model_dir), str(tiny_model_dir), "--out", str(out), "--weights", "3", "1"])
    assert json.loads((out / "she.json").read_text())["soup"]["weights"] == [0.75, 0.25]
    assert "she calibrate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["model", "average", str(tiny_model_dir), str(tiny_model_dir), "--out", str(out)])
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err
