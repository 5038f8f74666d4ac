"""Crash and resume of `she train srpo`, in real subprocesses killed with SIGKILL.

Reference: one uninterrupted 6-step run (tiny model, synthetic data, verifier examiner, a checkpoint every
2 steps, seed 0). Crash: the same command, killed while it is saving checkpoint-4 -- after HF has written
the folder, before the manifest (so the newest folder *looks* complete but is not) -- and after
checkpoint-2's manifest appeared. Resume: the same command again. It must skip checkpoint-4 with a message,
resume from checkpoint-2, and end with exactly the reference's step 3-6 metrics and final weights.
Then a file of the reference's newest checkpoint is truncated: a rerun must go back to checkpoint-4
(with a message naming the damage) and again reproduce the reference weights.

Exact equality is expected and asserted (torch.equal): on CPU with one thread every kernel is
deterministic, and HF restores the model, AdamW moments, LR schedule, data order and the Python/NumPy/torch
RNG states (sampling of the rollouts) from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The child is `she train srpo ...` run through this wrapper, which changes two things, identically in
# every run:
# * the outcome reward of a completion is a fixed function of its text. The random tiny model never writes
#   a label, so the real reward is always 0, every advantage is 0 and the weights never move -- and
#   "same final weights" would hold trivially. The completions are still really sampled (so the sampler's
#   RNG state must be restored for the resume to match), only their score is made to vary;
# * with STALL_AT_STEP it stalls the save of that step inside ManifestCallback.on_save (HF has written the
#   folder, the manifest is not written yet), so the test knows exactly where the SIGKILL lands.
WRAPPER = r"""
import os, sys, time
from pathlib import Path
from she.training import checkpoints as C
import she.training.srpo as S

real_outcome = S.rollout_outcome

def text_outcome(text, record, schema, **kw):
    _, parsed = real_outcome(text, record, schema, **kw)
    return (sum(map(ord, text)) % 5) / 4, parsed

S.rollout_outcome = text_outcome

stall = int(os.environ.get("STALL_AT_STEP", "0"))
orig = C.ManifestCallback.on_save

def on_save(self, args, state, control, **kw):
    if state.global_step == stall:
        Path(os.environ["STALL_MARKER"]).write_text(str(stall))
        time.sleep(600)  # the test kills us here
    return orig(self, args, state, control, **kw)

C.ManifestCallback.on_save = on_save
from she.cli import main
main(sys.argv[1:])
"""

STEPS = 6
COMPARED = ("loss", "reward", "reward_std", "rewards/outcome/mean", "srpo/outcome_reward", "grad_norm",
            "learning_rate", "completions/mean_length")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env


def _argv(tiny_model_dir: Path, data: Path, cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, "train", "srpo", "--config", str(cfg), "--model", str(tiny_model_dir),
            "--data", str(data), "--output-dir", str(out)]


def _run(argv, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _step_logs(out: Path) -> dict[int, dict]:
    hist = json.loads((out / "log_history.json").read_text())
    return {h["step"]: h for h in hist if "loss" in h}


def _assert_same_metrics(ref: dict[int, dict], got: dict[int, dict], steps) -> None:
    for s in steps:
        for k in COMPARED:
            assert k in ref[s], f"step {s}: {k} not logged"
            assert got[s][k] == ref[s][k], f"step {s}: {k} = {got[s][k]} after resume, {ref[s][k]} uninterrupted"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from she.cli import main

    root = tmp_path_factory.mktemp("resume")
    data = root / "d.jsonl"
    main(["data", "generate", "--out", str(data), "--queries", "12", "--seed", "1"])
    cfg = root / "rl.yaml"
    cfg.write_text(f"examiner: verifier\nmax_steps: {STEPS}\nnum_generations: 2\nprompts_per_step: 1\n"
                   "max_completion_length: 12\nbf16: false\nreport_to: none\nsave_steps: 2\nseed: 0\n"
                   "learning_rate: 0.001\n")
    ref = root / "reference"
    _run(_argv(tiny_model_dir, data, cfg, ref))
    # not vacuous: the rewards vary within groups, so the reference run really changed the weights
    logs = _step_logs(ref)
    assert any(h["reward_std"] > 0 for h in logs.values()) and any(h["grad_norm"] > 0 for h in logs.values())
    initial, final = _weights(tiny_model_dir), _weights(ref / "final")
    assert any(not __import__("torch").equal(initial[k], final[k]) for k in final)
    return root, data, cfg, ref


def test_killed_run_resumes_to_the_same_result(setup, tiny_model_dir):
    root, data, cfg, ref = setup
    out = root / "crashed"
    marker = root / "stalled"
    argv = _argv(tiny_model_dir, data, cfg, out)
    proc = subprocess.Popen(argv, env=_env(STALL_AT_STEP="4", STALL_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "checkpoint-2" / "she_manifest.json").exists() and marker.exists()):
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # the crash left checkpoint-4 complete-looking (HF wrote all of it) but without a manifest
    assert (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "checkpoint-4" / "she_manifest.json").exists()
    assert not (out / "final").exists()

    res = _run(argv)
    assert "checkpoint-4 is not usable: no she_manifest.json" in res.stderr
    assert "resuming from checkpoint-2 instead of the newer checkpoint-4" in res.stderr

    ref_logs, got = _step_logs(ref), _step_logs(out)
    assert sorted(got) == sorted(ref_logs) == list(range(1, STEPS + 1))
    _assert_same_metrics(ref_logs, got, range(3, STEPS + 1))
    _assert_same_weights(_weights(ref / "final"), _weights(out / "final"))
    # the re-saved checkpoint-4 got its manifest this time, and it matches the reference's
    m_ref = json.loads((ref / "checkpoint-4" / "she_manifest.json").read_text())
    m_got = json.loads((out / "checkpoint-4" / "she_manifest.json").read_text())
    assert m_got["files"]["model.safetensors"] == m_ref["files"]["model.safetensors"]
    # what HF puts in a checkpoint is what an exact resume needs
    assert m_ref["contents"] == {"model": True, "optimizer": True, "scheduler": True, "rng_state": True,
                                 "trainer_state": True}


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(setup, tiny_model_dir):
    root, data, cfg, ref = setup
    expected = _weights(ref / "final")
    weights = ref / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)

    res = _run(_argv(tiny_model_dir, data, cfg, ref))
    assert f"checkpoint-6 is not usable: model.safetensors has {size // 2} bytes, the manifest says {size}" in res.stderr
    assert "resuming from checkpoint-4 instead of the newer checkpoint-6" in res.stderr
    _assert_same_weights(expected, _weights(ref / "final"))
    assert (ref / "checkpoint-6" / "model.safetensors").stat().st_size == size  # re-saved whole
