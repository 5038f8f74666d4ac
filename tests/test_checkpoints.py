"""Checkpoint manifests on hand-made folders (no training): what counts as intact, what is skipped and why."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from she.training.checkpoints import (
    MANIFEST,
    ManifestCallback,
    checkpoint_contents,
    invalidate_manifest,
    last_good_checkpoint,
    list_checkpoints,
    mark_run,
    verify_checkpoint,
    write_manifest,
)

FILES = {"model.safetensors": b"w" * 1000, "optimizer.pt": b"o" * 2000, "scheduler.pt": b"s",
         "rng_state.pth": b"r" * 10, "trainer_state.json": b'{"global_step": 2}', "sub/extra.json": b"{}"}


def _ckpt(root: Path, step: int, manifest: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    for rel, data in FILES.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    if manifest:
        write_manifest(d)
    return d


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    d = _ckpt(tmp_path, 2)
    m = json.loads((d / MANIFEST).read_text())
    assert m["step"] == 2 and m["version"] == 1
    assert sorted(m["files"]) == sorted(FILES)
    assert m["files"]["optimizer.pt"] == {"size": 2000, "sha256": hashlib.sha256(b"o" * 2000).hexdigest()}
    assert m["contents"] == {"model": True, "optimizer": True, "scheduler": True, "rng_state": True,
                             "trainer_state": True}
    assert not [p for p in d.iterdir() if p.name.startswith(".she_manifest")]  # no temp file left behind
    assert verify_checkpoint(d) == (True, "ok")


def test_checkpoint_contents_from_names():
    assert checkpoint_contents(["adapter_model.safetensors", "trainer_state.json", "rng_state_3.pth"]) == {
        "model": True, "optimizer": False, "scheduler": False, "rng_state": True, "trainer_state": True}


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "optimizer.pt has 1000 bytes, the manifest says 2000"),
    ("flip", "optimizer.pt does not match its SHA-256"),
    ("delete", "optimizer.pt is missing"),
    ("no_manifest", "no she_manifest.json"),
    ("bad_json", "she_manifest.json is unreadable"),
])
def test_damage_is_detected_with_a_reason(tmp_path, damage, reason):
    d = _ckpt(tmp_path, 4)
    opt = d / "optimizer.pt"
    if damage == "truncate":
        with open(opt, "r+b") as f:
            f.truncate(1000)
    elif damage == "flip":
        opt.write_bytes(b"o" * 1999 + b"x")  # same size, different bytes
    elif damage == "delete":
        opt.unlink()
    elif damage == "no_manifest":
        (d / MANIFEST).unlink()
    else:
        (d / MANIFEST).write_text('{"files": ')
    ok, why = verify_checkpoint(d)
    assert not ok and why.startswith(reason)


def test_size_only_check_misses_same_size_damage(tmp_path):
    d = _ckpt(tmp_path, 4)
    (d / "optimizer.pt").write_bytes(b"o" * 1999 + b"x")
    assert verify_checkpoint(d, check_hashes=False) == (True, "ok")
    assert not verify_checkpoint(d)[0]


def test_last_good_checkpoint_goes_back_and_says_why(tmp_path, caplog):
    _ckpt(tmp_path, 9)
    good = _ckpt(tmp_path, 10)
    bad = _ckpt(tmp_path, 12)
    _ckpt(tmp_path, 14, manifest=False)  # killed before its manifest
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-14", "checkpoint-12", "checkpoint-10",
                                                            "checkpoint-9"]  # numeric, not string, order
    with caplog.at_level(logging.WARNING, logger="she.training.checkpoints"):
        assert last_good_checkpoint(tmp_path) == good
    text = caplog.text
    assert "checkpoint-14 is not usable: no she_manifest.json" in text
    assert "checkpoint-12 is not usable: model.safetensors has 10 bytes, the manifest says 1000" in text
    assert "resuming from checkpoint-10 instead of the newer checkpoint-14, checkpoint-12" in text


def test_no_good_checkpoint(tmp_path, caplog):
    assert last_good_checkpoint(tmp_path / "nope") is None
    mark_run(tmp_path)  # the run writes manifests (ManifestCallback.on_train_begin) ...
    _ckpt(tmp_path, 2, manifest=False)  # ... but was killed before the first one
    with caplog.at_level(logging.WARNING, logger="she.training.checkpoints"):
        assert last_good_checkpoint(tmp_path) is None
    assert "no usable checkpoint" in caplog.text and "1 found" in caplog.text


def test_runs_without_manifests_fall_back_to_the_newest_with_a_trainer_state(tmp_path, caplog):
    """A trainer without ManifestCallback: nothing to verify against; the newest folder that has HF's
    last-written file is used, with a warning. The same folders in a marked run are all rejected."""
    _ckpt(tmp_path, 2, manifest=False)
    c4 = _ckpt(tmp_path, 4, manifest=False)
    c6 = _ckpt(tmp_path, 6, manifest=False)
    (c6 / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="she.training.checkpoints"):
        assert last_good_checkpoint(tmp_path) == c4
    assert "checkpoint-6 is not usable: no trainer_state.json" in caplog.text
    assert "have no manifests" in caplog.text and "checkpoint-4, unverified" in caplog.text
    mark_run(tmp_path)
    assert last_good_checkpoint(tmp_path) is None


def test_last_checkpoint_of_sft_uses_the_validation(tmp_path):
    from she.training.trainer_setup import last_checkpoint

    good = _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 4, manifest=False)
    assert last_checkpoint(tmp_path) == str(good)
    assert last_checkpoint(tmp_path / "missing") is None


def test_a_crash_while_writing_the_manifest_leaves_no_manifest(tmp_path, monkeypatch):
    d = _ckpt(tmp_path, 2, manifest=False)

    def crash(*a):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(d)
    monkeypatch.undo()
    assert not (d / MANIFEST).exists()
    assert verify_checkpoint(d)[0] is False
    write_manifest(d)  # a later save ignores the stray temp file
    assert verify_checkpoint(d) == (True, "ok")
    assert ".she_manifest." not in json.dumps(json.loads((d / MANIFEST).read_text())["files"])


def test_callback_drops_a_stale_manifest_before_a_save_and_writes_one_after(tmp_path):
    d = _ckpt(tmp_path, 4)  # e.g. left by a run that is now re-saving step 4 after resuming from step 2
    cb = ManifestCallback(fsync=False)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    state = SimpleNamespace(global_step=4)
    cb.on_train_begin(args, state, SimpleNamespace(should_save=False))
    assert json.loads((tmp_path / "she_checkpoints.json").read_text())["manifests"] == MANIFEST
    cb.on_step_end(args, state, SimpleNamespace(should_save=False))
    assert (d / MANIFEST).exists()  # no save coming: left alone
    cb.on_step_end(args, state, SimpleNamespace(should_save=True))
    assert not (d / MANIFEST).exists()
    (d / "model.safetensors").write_bytes(b"new weights")
    cb.on_save(args, state, SimpleNamespace(should_save=True))
    assert verify_checkpoint(d) == (True, "ok")
    assert json.loads((d / MANIFEST).read_text())["files"]["model.safetensors"]["size"] == len(b"new weights")
    assert invalidate_manifest(d) and not invalidate_manifest(d)


def test_remove_checkpoints_takes_every_trainer_checkpoint_and_nothing_else(tmp_path):
    from she.training.checkpoints import remove_checkpoints

    made = [tmp_path / "checkpoint-3", tmp_path / "stage-0-easy" / "checkpoint-10",
            tmp_path / "stage-1-main" / "checkpoint-2"]
    for d in made:
        (d / "inner").mkdir(parents=True)
        (d / "inner" / "w.bin").write_bytes(b"w")
    keep = [tmp_path / "final", tmp_path / "checkpoint-last", tmp_path / "stage-1-main" / "final",
            tmp_path / "stage-0-easy" / "old-checkpoint-4"]
    for d in keep:
        d.mkdir(parents=True)
    removed = remove_checkpoints(tmp_path)
    assert sorted(removed) == sorted(made)
    assert not any(d.exists() for d in made) and all(d.is_dir() for d in keep)
    assert remove_checkpoints(tmp_path) == [] and remove_checkpoints(tmp_path / "absent") == []


def test_remove_checkpoints_unlinks_a_linked_checkpoint_and_keeps_its_target(tmp_path):
    from she.training.checkpoints import remove_checkpoints

    kept = tmp_path / "elsewhere" / "weights"
    kept.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-7").symlink_to(kept.parent, target_is_directory=True)
    assert remove_checkpoints(run) == [run / "checkpoint-7"]
    assert not (run / "checkpoint-7").exists() and kept.is_dir()
