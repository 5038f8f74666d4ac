"""What every Hugging Face ``Trainer``-based job of she does the same way: SFT, DPO, the scalar reward model,
the cross-encoder, GRPO/SRPO and the step judge.

Why one place: these jobs must agree on the device (CPU exactly when there is no CUDA), on precision (bf16
only where the GPU supports it), on what ``report_to: none`` means, on resuming only from an *intact*
checkpoint, and on how ``final/`` is written under ``accelerate launch`` (every rank saves -- sharded setups
gather collectively -- rank 0 alone writes ``she.json`` and ``log_history.json``, and no rank returns before
it has). A fix to one of these rules is then a fix for all jobs. Each job still builds its own TRL/transformers
config class and adds the fields only it has (``beta``, ``max_length``, eval batch size, ...).

The GRPO/SRPO path (:mod:`she.training.srpo`, :mod:`she.training.rl`) builds its ``GRPOConfig`` with other
defaults and fields, but takes its device and precision (:func:`device_args`) and ``report_to`` from here,
and resumes, saves ``final/`` and writes ``she_config.json`` through the same functions as the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def report_to_list(report_to: str | None) -> list[str]:
    """``report_to`` as transformers wants it: ``none`` (or empty) is no reporter at all."""
    return [] if report_to in ("none", "", None) else [report_to]


def device_args(bf16: bool) -> dict[str, bool]:
    """``use_cpu`` (exactly when there is no CUDA) and ``bf16`` (as configured on CPU -- transformers runs it
    as CPU autocast -- and on GPUs that support it; on older GPUs fp32 instead of failing at start-up)."""
    import torch

    from she.models.metadata import use_cpu

    cpu = use_cpu()
    return {"bf16": bool(bf16) and (cpu or torch.cuda.is_bf16_supported()), "use_cpu": cpu}


def is_main_process(process_index: int | None = None) -> bool:
    """Rank 0: ``process_index`` of built ``TrainingArguments`` when given, else the launcher's ``RANK``
    (``accelerate launch`` / ``torchrun`` set it; a plain run has none and is rank 0)."""
    import os

    return (int(os.environ.get("RANK", "0")) if process_index is None else process_index) == 0


def write_job_config(output_dir: str | Path, cfg: Any, process_index: int | None = None) -> None:
    """``<output_dir>/she_config.json``: the job's config as run, written by rank 0 only."""
    from she.config import to_dict

    if is_main_process(process_index):
        (Path(output_dir) / "she_config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))


def common_training_args(cfg: Any, output_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments shared by the ``TrainingArguments`` (or TRL subclass) of every fine-tuning job.

    ``cfg`` is a job config with ``epochs``, ``max_steps``, ``learning_rate``, ``lr_scheduler_type``,
    ``batch_size``, ``bf16``, ``gradient_checkpointing``, ``seed``, ``logging_steps``, ``save_steps``, ``save_total_limit`` and
    ``report_to``. Warm-up is left to the caller: some jobs configure it in steps, others as a ratio.
    Device and precision: :func:`device_args`. ``dataloader_num_workers=0``: the data sets are small and in
    memory, so worker processes would only add start-up time.
    """
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "per_device_train_batch_size": cfg.batch_size,
        **device_args(cfg.bf16),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "report_to": report_to_list(cfg.report_to),
        "dataloader_num_workers": 0,
    }


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest *intact* checkpoint of a run (its manifest checks out), or None; newer damaged or
    half-written ones are skipped with a logged reason (:func:`she.training.checkpoints.last_good_checkpoint`)."""
    from she.training.checkpoints import last_good_checkpoint

    found = last_good_checkpoint(output_dir)
    return str(found) if found is not None else None


def train_resuming(trainer: Any, output_dir: str | Path, resume: bool, logger: logging.Logger = log) -> str | None:
    """``trainer.train()``, continuing from the newest intact checkpoint in ``output_dir`` when ``resume``.

    Only checkpoints whose manifest checks out are candidates (:func:`last_checkpoint`), so
    a checkpoint half-written by a killed run is skipped instead of crashing the restart. ``logger`` is the
    calling job's, so the "resuming from" line keeps its origin. Returns the checkpoint used (None = fresh).
    """
    checkpoint = last_checkpoint(output_dir) if resume else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    return checkpoint


def save_final(trainer: Any, output_dir: str | Path, meta: dict[str, Any], *, save_model: bool = True,
               on_main: Callable[[Path], None] | None = None) -> Path:
    """Write ``<output_dir>/final`` and the run files; returns that folder.

    ``save_model`` runs on every rank (FSDP/ZeRO-3 gather the full weights collectively; rank 0 writes the
    weights and the tokenizer, which is ``trainer.processing_class``). Pass ``save_model=False`` when the
    caller has written the weights itself (a merged LoRA model). The main process then writes ``she.json``
    (``meta``: how the model is to be prompted or read) and ``log_history.json``, and runs ``on_main(final)``
    for job-specific rank-0 work (e.g. scoring an eval split). Every rank waits for that before returning,
    so no rank reads ``final/`` before it is complete.
    """
    from she.models.metadata import save_she_meta

    out = Path(output_dir)
    final = out / "final"
    if save_model:
        trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        save_she_meta(final, meta)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        if on_main is not None:
            on_main(final)
    trainer.accelerator.wait_for_everyone()
    return final


def heap_trim_callback(every: int):
    """A ``TrainerCallback`` that gives the C heap's free pages back to the OS every ``every`` optimizer steps
    (she.runtime.release_memory) and logs the resident memory after it as ``rss_gb``.

    Why: an RL job's rollouts change length every step, so its buffers change size; under the tuned allocator
    (no trimming) the heap then fragments and grew to 24.4 GB in 54 steps (docs/benchmarks.md, session 8).
    One trim a step bounds that, and keeps the tuned allocator's per-allocation saving (no mmap/munmap and page
    faults on every large tensor) inside the step. ``every`` <= 0: None (no callback).

    release_memory runs a full ``gc.collect()`` before the trim (tens of ms here). ``rss_gb`` is added in
    ``on_log``, after the ``report_to`` integrations have sent the record: it reaches the console and
    ``log_history`` (so the run's plots), not TensorBoard or W&B."""
    if every <= 0:
        return None
    from transformers import TrainerCallback

    from she.runtime import release_memory

    class HeapTrim(TrainerCallback):
        rss: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                self.rss = release_memory()[1]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and self.rss is not None:  # the Trainer appended this record before on_log
                logs["rss_gb"] = round(self.rss / 2**30, 3)
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1]["rss_gb"] = logs["rss_gb"]

    return HeapTrim()


__all__ = ["common_training_args", "device_args", "heap_trim_callback", "is_main_process", "last_checkpoint",
           "report_to_list", "save_final", "train_resuming", "write_job_config"]
