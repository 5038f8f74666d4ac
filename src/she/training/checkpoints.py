"""Checkpoint manifests: tell a complete checkpoint from a half-written or damaged one.

The HF ``Trainer`` writes ``checkpoint-N/`` file by file (weights, ``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth``, ``trainer_state.json``) straight into its final folder. A run killed halfway through
a save -- preemption, OOM killer, a full disk -- leaves a folder that *looks* like a checkpoint, and
``get_last_checkpoint`` would happily resume from it (and then crash on a truncated ``optimizer.pt``, or
worse, load it without noticing).

So after the Trainer has finished a save, :class:`ManifestCallback` writes ``she_manifest.json`` into
the folder: every file with its size and SHA-256. It is written to a temporary file, flushed, fsync'd
and renamed with ``os.replace`` (atomic on POSIX) as the **last** act of the save, after the files
themselves were fsync'd. Hence the rule: *a checkpoint without a valid manifest is incomplete*. Before a
save starts the callback removes any old manifest from the target folder (a run resumed from an earlier
checkpoint re-saves into the same ``checkpoint-N``; the stale manifest must not vouch for files being
rewritten).

:func:`last_good_checkpoint` checks the checkpoints newest-first against their manifests and returns the
newest intact one, logging which newer folders it skipped and why.

Runs of trainers that do not use the callback write no manifests; their ``output_dir`` lacks the run
marker ``she_checkpoints.json`` that :class:`ManifestCallback` writes when training begins. For them
(and only when no checkpoint has a manifest) :func:`last_good_checkpoint` falls back to the newest folder
with a ``trainer_state.json`` (the last file HF writes), with a warning that it cannot verify more. The
marker is what keeps a run *with* the callback strict even before its first manifest exists.

Why SHA-256 and not only sizes: sizes catch truncation (the common crash damage), hashes also catch
bit rot and files that were overwritten in place with the same length; hashing a 135M-parameter model
with its AdamW state (~1.6 GB) takes a second or two with hardware SHA, negligible next to the minutes
between saves. ``check_hashes=False`` validates sizes only where that matters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

MANIFEST = "she_manifest.json"
MANIFEST_VERSION = 1
RUN_MARKER = "she_checkpoints.json"  # in output_dir: "this run's checkpoints carry manifests"
_TMP_PREFIX = ".she_manifest."
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20


# -- pure-ish helpers --------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, *, fsync: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks. ``fsync`` also flushes the file to disk first (it is
    being vouched for in a manifest, so it must survive a power loss as well as a crash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    """Every regular file under ``ckpt`` except the manifest and its temporaries, sorted."""
    out = []
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith(_TMP_PREFIX):
            out.append(p)
    return out


def checkpoint_contents(files: list[str]) -> dict[str, bool]:
    """What a checkpoint carries, from its file names: the model weights, the optimizer and LR-scheduler
    state, the RNG states and the trainer state -- all five are needed to resume *exactly*."""
    names = [Path(f).name for f in files]
    return {
        "model": any(n.endswith(".safetensors") or n in ("pytorch_model.bin", "adapter_model.bin") for n in names),
        "optimizer": any(n.startswith("optimizer") for n in names),
        "scheduler": "scheduler.pt" in names,
        "rng_state": any(n.startswith("rng_state") and n.endswith(".pth") for n in names),
        "trainer_state": "trainer_state.json" in names,
    }


def build_manifest(ckpt_dir: str | os.PathLike, *, fsync: bool = False) -> dict[str, Any]:
    """The manifest of a checkpoint folder as it is on disk now (see the module docstring)."""
    ckpt = Path(ckpt_dir)
    files = {}
    for p in _files(ckpt):
        rel = p.relative_to(ckpt).as_posix()
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p, fsync=fsync)}
    m = _CHECKPOINT_RE.match(ckpt.name)
    return {
        "format": "she-checkpoint-manifest",
        "version": MANIFEST_VERSION,
        "step": int(m.group(1)) if m else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "contents": checkpoint_contents(list(files)),
        "files": files,
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: str | os.PathLike, *, fsync: bool = True) -> Path:
    """Hash every file of ``ckpt_dir`` and publish ``she_manifest.json`` atomically; returns its path.

    Order matters and is the whole point: files fsync'd (while hashed) -> manifest written to a temp
    file in the same folder -> fsync -> ``os.replace`` -> folder fsync. A crash at any moment leaves
    either no manifest or a complete one.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    manifest = build_manifest(ckpt, fsync=fsync)
    missing = [k for k, v in manifest["contents"].items() if not v]
    if missing:
        log.warning("checkpoint %s has no %s: it can be loaded but not resumed exactly", ckpt, ", ".join(missing))
    tmp = ckpt / f"{_TMP_PREFIX}{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)
    if fsync:
        _fsync_dir(ckpt)
    return ckpt / MANIFEST


def invalidate_manifest(ckpt_dir: str | os.PathLike) -> bool:
    """Remove the manifest of ``ckpt_dir`` (before files in it are rewritten); True if there was one."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def verify_checkpoint(ckpt_dir: str | os.PathLike, *, check_hashes: bool = True) -> tuple[bool, str]:
    """``(True, "ok")`` when every file listed in the manifest is there with its size (and SHA-256),
    else ``(False, reason)`` naming the first problem found. Files not in the manifest are ignored
    (nothing in them is needed to resume)."""
    ckpt = Path(ckpt_dir)
    path = ckpt / MANIFEST
    if not ckpt.is_dir():
        return False, "not a folder"
    if not path.exists():
        return False, f"no {MANIFEST} (the save did not finish, or it predates manifests)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        version = manifest["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if version != MANIFEST_VERSION:
        return False, f"{MANIFEST} has version {version!r}, this she reads {MANIFEST_VERSION}"
    if not isinstance(files, dict) or "trainer_state.json" not in files:
        return False, f"{MANIFEST} lists no trainer_state.json"
    for rel, meta in files.items():
        p = ckpt / rel
        try:
            size = p.stat().st_size
        except OSError:
            return False, f"{rel} is missing"
        if size != meta.get("size"):
            return False, f"{rel} has {size} bytes, the manifest says {meta.get('size')}"
        if check_hashes and file_sha256(p) != meta.get("sha256"):
            return False, f"{rel} does not match its SHA-256 in the manifest"
    return True, "ok"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of a run, newest (largest N) first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def remove_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Delete every ``checkpoint-N`` folder at any depth under ``root`` (a finished job's resume points: its
    ``final`` folder holds the weights); returns the folders removed, shallowest first."""
    import shutil

    removed: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        hits = sorted(d for d in dirnames if _CHECKPOINT_RE.match(d))
        for d in hits:
            path = Path(dirpath) / d
            if path.is_symlink():  # a link to a checkpoint kept elsewhere: the link goes, not what it points to
                path.unlink()
            else:
                shutil.rmtree(path)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if d not in hits]
    return removed


def mark_run(output_dir: str | os.PathLike) -> Path:
    """Write the run marker (see the module docstring); idempotent."""
    path = Path(output_dir) / RUN_MARKER
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}.marker")
        tmp.write_text(json.dumps({"manifests": MANIFEST, "version": MANIFEST_VERSION}) + "\n")
        os.replace(tmp, path)
    return path


def _legacy_last_checkpoint(output_dir: str | os.PathLike, checkpoints: list[Path]) -> Path | None:
    for ckpt in checkpoints:
        if (ckpt / "trainer_state.json").is_file():
            log.warning("the checkpoints in %s have no manifests (written without ManifestCallback): using the "
                        "newest with a trainer_state.json, %s, unverified", output_dir, ckpt.name)
            return ckpt
        log.warning("checkpoint %s is not usable: no trainer_state.json; trying the previous one", ckpt)
    return None


def last_good_checkpoint(output_dir: str | os.PathLike, *, check_hashes: bool = True) -> Path | None:
    """The newest checkpoint of ``output_dir`` whose manifest checks out, or None.

    Every newer checkpoint that fails is logged (``logging.warning``) with its folder and the reason, so
    a resume that goes back further than expected says why. A run without manifests at all (no run
    marker, no manifest in any checkpoint) gets the unverified fallback of the module docstring.
    """
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not (Path(output_dir) / RUN_MARKER).exists() \
            and not any((c / MANIFEST).exists() for c in checkpoints):
        return _legacy_last_checkpoint(output_dir, checkpoints)
    skipped = []
    for ckpt in checkpoints:
        ok, reason = verify_checkpoint(ckpt, check_hashes=check_hashes)
        if ok:
            if skipped:
                log.warning("resuming from %s instead of the newer %s", ckpt.name, ", ".join(s.name for s in skipped))
            return ckpt
        log.warning("checkpoint %s is not usable: %s; trying the previous one", ckpt, reason)
        skipped.append(ckpt)
    if skipped:
        log.warning("no usable checkpoint in %s (%d found, none intact): starting from the beginning",
                    output_dir, len(skipped))
    return None


# -- the Trainer hook ------------------------------------------------------------------------------
def _world_barrier() -> None:
    """Wait for every process (each writes its own ``rng_state_<rank>.pth``; sharded optimizers write
    their own shards) before rank 0 vouches for the folder."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class ManifestCallback(TrainerCallback):
    """Writes the manifest after every Trainer save; drops a stale one before a save into the same folder.

    ``on_save`` runs after ``Trainer._save_checkpoint`` has written everything (TRL's GRPO extras
    included). The invalidation runs in ``on_step_end``/``on_epoch_end``, after ``DefaultFlowCallback``
    (always the first callback) has decided ``control.should_save`` and before the save itself.
    """

    def __init__(self, *, fsync: bool = True) -> None:
        self.fsync = fsync

    @staticmethod
    def _folder(args: Any, state: Any) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            mark_run(args.output_dir)

    def _before_save(self, args: Any, state: Any, control: Any) -> None:
        if control.should_save and args.should_save and invalidate_manifest(self._folder(args, state)):
            log.info("removed the old manifest of %s before re-saving it", self._folder(args, state))

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        _world_barrier()
        folder = self._folder(args, state)
        if args.should_save and folder.is_dir():
            write_manifest(folder, fsync=self.fsync)
        _world_barrier()


__all__ = [
    "MANIFEST",
    "RUN_MARKER",
    "ManifestCallback",
    "build_manifest",
    "checkpoint_contents",
    "file_sha256",
    "invalidate_manifest",
    "last_good_checkpoint",
    "list_checkpoints",
    "mark_run",
    "remove_checkpoints",
    "verify_checkpoint",
    "write_manifest",
]
