"""What stops a run: bad output directories and data before any model is loaded, signals and
non-finite steps during training (with the exit codes a job scheduler sees)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from orpo.checkpoint import checkpoints_dir, complete_checkpoints
from orpo.config import ConfigError, TrainConfig
from orpo.data import DataError, PreferenceSplit

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and resume
EXIT_NONFINITE = 76  # max_skipped_steps non-finite steps in a row; the last good state is checkpointed
EXIT_CODES = {"preempted": EXIT_PREEMPTED, "non_finite": EXIT_NONFINITE}  # run_summary.json's stop_reason


def is_finished_run(out: Path) -> bool:
    """A run_summary.json is also written at checkpoints; only the final one says finished."""
    try:
        return bool(json.loads((out / "run_summary.json").read_text()).get("finished", True))
    except (OSError, ValueError):
        return False


def extends_finished_run(cfg: TrainConfig, out: Path) -> bool:
    """resume_from with a larger max_steps may train a finished run on, from the checkpoint of its
    last step; without that checkpoint it would retrain steps and overwrite the saved model."""
    if not cfg.resume_from:
        return False
    try:
        finished_step = int(json.loads((out / "run_summary.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return cfg.max_steps > finished_step and finished_step in [step for step, _ in complete_checkpoints(out)]


def check_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to clobber a finished run or an unfinished one's checkpoints, and fail now (not after
    hours) if the directory cannot be written or its disk is full."""
    out = Path(cfg.output_dir)
    if is_finished_run(out) and not cfg.overwrite and not extends_finished_run(cfg, out):
        raise ConfigError(
            f"{out} already holds a finished run (run_summary.json). Pick another output_dir, pass overwrite=true, "
            "or resume_from=latest with a larger max_steps to train it on (it needs the checkpoint of its last step)."
        )
    if complete_checkpoints(out) and not cfg.resume_from and not cfg.overwrite:
        raise ConfigError(
            f"{out} holds checkpoints of an unfinished run ({checkpoints_dir(out)}). Pass resume_from=latest to "
            "continue it, or overwrite=true to start over (which deletes them)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(bytes(1 << 20))  # 1 MiB: a full disk fails here, not at the first checkpoint
        probe.unlink()
    except OSError as err:
        reason = "its disk is full" if err.errno == errno.ENOSPC else "it is not writable"
        raise ConfigError(f"output_dir {str(out)!r} cannot be used: {reason} ({err}).") from err
    if cfg.overwrite and not cfg.resume_from and PartialState().is_main_process:
        # Old event files would mix two runs' curves in TensorBoard; old checkpoints would be resumed.
        for stale in ("tensorboard", "checkpoints"):
            shutil.rmtree(out / stale, ignore_errors=True)
        for stale in ("run_summary.json", "data_order.jsonl"):
            (out / stale).unlink(missing_ok=True)
    return out


def check_trackers(cfg: TrainConfig) -> None:
    if "wandb" in cfg.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "report_to lists wandb, which is not installed: pip install wandb, or drop it from report_to."
        )


def check_skipped_fraction(data: PreferenceSplit, split: str, max_fraction: float) -> None:
    """Too many rejected rows usually means the wrong format or budget: stop before loading a model."""
    fraction = 1 - len(data) / max(data.num_rows, 1)
    if fraction > max_fraction:
        top = sorted(data.skipped.items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(f"{k}: {v} rows (e.g. row {data.skipped_example[k]})" for k, v in top)
        raise DataError(
            f"{fraction:.0%} of the {data.num_rows} rows of split {split!r} were skipped, more than "
            f"max_skipped_fraction={max_fraction:g}. Top reasons: {reasons}. Check the data format "
            "(data_format, column_map) and max_length, or raise max_skipped_fraction."
        )


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's --signal) ask the run to stop after the current optimizer step.

    The handler only records the request: the loop finishes its step, every rank agrees (a rank that
    got the signal is enough), a checkpoint is saved and the process exits with EXIT_PREEMPTED. A
    second signal while saving changes nothing (and the save is atomic anyway).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def agreed(self, accelerator: Accelerator) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="max")
        return bool(flag.item())


def poison_if_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """The loss to backpropagate: itself when finite, else one whose every gradient is NaN.

    A non-finite loss does not always give a non-finite gradient (a NaN that no parameter feeds
    backpropagates as 1). Under DeepSpeed the engine steps inside backward and skips only when the
    gradient norm is not finite, and a NaN gradient on one rank reaches every rank through the
    gradient reduction: so every rank skips that update, with no extra collective and no host sync.
    Multiplying by 1.0 leaves a finite loss's gradients bit for bit unchanged.
    """
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
    return loss * factor


class RunStopped(Exception):
    """The run stopped early after saving a checkpoint; `exit_code` says why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
