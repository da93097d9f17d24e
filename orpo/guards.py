"""What stops a run: bad output directories and data before any model is loaded, a second run in the
same output directory, signals from the first second on, and non-finite steps during training (with
the exit codes a job scheduler sees)."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

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
    """Fail now (not after hours) if the directory cannot be written or its disk is full, refuse to
    clobber a finished run or an unfinished one's checkpoints, then take the directory's lock
    (refused while another run holds it). Deletes nothing: `overwrite=true` clears the old run later
    (`clear_for_overwrite`), once every input has been checked."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(bytes(1 << 20))  # 1 MiB: a full disk fails here, not at the first checkpoint
        probe.unlink()
    except OSError as err:
        reason = "its disk is full" if err.errno == errno.ENOSPC else "it is not writable"
        raise ConfigError(f"output_dir {str(out)!r} cannot be used: {reason} ({err}).") from err
    # Read-only refusals first: a refused launch leaves the directory exactly as it was.
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
    refused: list[str | None] = [None]
    if PartialState().is_main_process:
        try:
            note = lock_output_dir(out)
            if note:
                print(f"output dir   {note}", flush=True)
        except ConfigError as err:
            refused[0] = str(err)
    refused = broadcast_object_list(refused)  # only rank 0 holds the lock; every rank must stop
    if refused[0]:
        raise ConfigError(refused[0])
    return out


def clear_for_overwrite(cfg: TrainConfig, out: Path) -> None:
    """overwrite=true: delete the old run's logs, checkpoints and summary (rank 0). Called right before
    the run's first write, after the data, tokenizer, checkpoint and model have loaded, so that a bad
    input (a typo in `dataset`) fails with the old run intact."""
    if cfg.overwrite and not cfg.resume_from and PartialState().is_main_process:
        # Old event files would mix two runs' curves in TensorBoard; old checkpoints would be resumed.
        for stale in ("tensorboard", "checkpoints"):
            shutil.rmtree(out / stale, ignore_errors=True)
        for stale in ("run_summary.json", "data_order.jsonl"):
            (out / stale).unlink(missing_ok=True)


# ---- one live run per output directory -----------------------------------------------------------

LOCK_FILE = "run.lock"
_LOCKS: dict[Path, int] = {}  # lock file -> open descriptor holding its flock, in this process


def _holder(body: dict[str, Any]) -> str:
    return f"host {body.get('host', '?')}, pid {body.get('pid', '?')}, started {body.get('started', '?')}"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def lock_output_dir(out: Path) -> str | None:
    """Hold `out/run.lock` for the rest of this process (rank 0 only); return a note when a stale
    lock was taken over, raise ConfigError naming the holder when another run is live.

    The lock is an flock on the file, which the kernel releases when its holder exits in any way,
    kill -9 and crashes included; the file's JSON body names the holder (host, pid, start time) for
    the error message, and is emptied at a clean exit. So: flock refused -> a live run, refused;
    flock granted over a non-empty body -> the holder died without cleaning up, taken over with a
    note. A holder on another host is trusted to flock as well: on a shared file system that passes
    flock between hosts (NFSv4, Lustre mounted with -o flock, GPFS, BeeGFS) a granted lock means that
    run is gone, which is the normal case of a job requeued onto another node after a kill. Where
    the file system has no flock at all (ENOLCK, EOPNOTSUPP), the body decides: this host's holder
    is live if its pid is; another host's holder cannot be checked and is refused (delete the lock
    file once you know that run is gone).
    """
    path = (out / LOCK_FILE).resolve()
    if path in _LOCKS:  # this process holds it already (a second run in one Python process)
        _write_body(_LOCKS[path])
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            raise ConfigError(
                f"output_dir {str(out)!r} is in use by a live run ({_holder(_read_body(fd))}; lock file {path}). "
                "Wait for it to end or stop it, or pick another output_dir."
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            flock = False
        previous, note = _read_body(fd), None
        if previous:
            here = previous.get("host") == socket.gethostname()
            if not flock and (not here or _pid_alive(previous.get("pid"))):
                where = "" if here else " on another host, which this file system (no flock) cannot check"
                raise ConfigError(
                    f"output_dir {str(out)!r} is locked by a run ({_holder(previous)}){where}; lock file {path}. "
                    "If that run is gone, delete the lock file; else wait for it or pick another output_dir."
                )
            note = f"took over the lock of a run that is gone ({_holder(previous)}): it did not end cleanly."
            if not here:
                note += " (It ran on another host: if it is still alive, this file system does not share locks.)"
        _write_body(fd)
    except BaseException:
        os.close(fd)
        raise
    _LOCKS[path] = fd
    return note


def release_output_locks() -> None:
    """Empty the lock files' bodies (a clean end) and release them; the kernel releases them anyway."""
    for path, fd in list(_LOCKS.items()):
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
            del _LOCKS[path]


def _read_body(fd: int) -> dict[str, Any]:
    try:
        body = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:  # half written by a killed holder
        return {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}
    return body if isinstance(body, dict) else {}


def _write_body(fd: int) -> None:
    body = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(body).encode(), 0)
    os.fsync(fd)


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


def check_same_data(saved: str | None, now: str, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint over training data whose content changed since it was saved.

    `saved` and `now` are the data's fingerprints (PreferenceSplit.source: `file:<path>:<sha256>` or
    `hub:<name>:<split>:<fingerprint>`). A checkpoint from before fingerprints were stored (None)
    is not checked. Called before any model is loaded."""
    if saved is None or saved == now:
        return
    then_name, then_hash = saved.rsplit(":", 1) if ":" in saved else (saved, "")
    now_name, now_hash = now.rsplit(":", 1) if ":" in now else (now, "")
    if then_name.partition(":")[2] == now_name.partition(":")[2]:
        what = f"the training data {now_name.partition(':')[2]} changed since"
    else:
        what = f"the training data is now {now_name.partition(':')[2]}, not {then_name.partition(':')[2]} as when"
    raise ConfigError(
        f"Cannot resume {checkpoint}: {what} that checkpoint was saved (sha256 {then_hash[:16]} then, "
        f"{now_hash[:16]} now). Resuming would continue the data order over other rows. Restore the data "
        "the run started with, or start a new run (another output_dir, or overwrite=true)."
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
