"""Crash-safe checkpoints: written whole or not at all, verified before they are trusted.

A checkpoint `output_dir/checkpoints/step_<N>/` holds accelerate's state (model or adapter,
optimizer, scheduler, gradient scaler, every RNG of every rank; under DeepSpeed each rank's shard),
`trainer_state.json` (step, data position, metric accumulators) and, written last, `manifest.json`
with each file's size and sha256. It is written into `.tmp-step_<N>`, every file fsynced, then
renamed into place in one atomic step; only after that are older checkpoints beyond `keep_last`
pruned. A kill at any moment therefore leaves the previous complete checkpoint intact, and a
checkpoint whose files do not match its manifest (truncated, corrupted, half-pruned) is refused.

The checkpoint directory must be on a file system every rank can see (the manifest is written by
rank 0 over all ranks' files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from orpo.config import TrainConfig

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> dict[str, Any]:
    """fsync every file under `directory`, then write (and fsync) the manifest of their sizes and hashes."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_path(path)
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync_path(tmp)
    os.replace(tmp, directory / MANIFEST)
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}, key=lambda p: -len(p.parts)):
        _fsync_path(sub)
    return manifest


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or corrupted."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: it was not completely written.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({err}).") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    shape_ok = isinstance(files, dict) and all(
        isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str) for e in files.values()
    )
    if not shape_ok:  # valid JSON of another shape: as damaged as a truncated one
        raise CheckpointError(
            f'{manifest_path} is not a valid manifest: expected {{"files": {{name: {{"size": int, '
            f'"sha256": str}}}}}}, found {json.dumps(manifest)[:200]}.'
        )
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the manifest but missing.")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path} is {size} bytes, the manifest says {expected['size']}: truncated.")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest: corrupted.")
    if TRAINER_STATE not in files:
        raise CheckpointError(f"{directory} has no {TRAINER_STATE}.")


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_<N> directory (renamed into place, so written whole), oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(output_dir: str | Path, resume_from: str) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest that verifies (others are skipped with
    a warning naming them), or None when there is no checkpoint at all (a first attempt: the same
    command then serves every attempt of a requeued job); a path must verify."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"resume_from={resume_from!r} is not a directory.")
        verify(path)
        return path
    candidates = complete_checkpoints(output_dir)
    if not candidates:
        return None
    for _, path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    raise CheckpointError(
        f"resume_from=latest: none of the {len(candidates)} checkpoints under {checkpoints_dir(output_dir)} "
        "verifies (see the warnings). Point resume_from at one, or start over with overwrite=true."
    )


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-step_{step}"


def clear_staging(output_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a crash (rank 0, before writing a new one)."""
    root = checkpoints_dir(output_dir)
    for path in root.glob(".tmp-step_*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def finalize(output_dir: str | Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank has written its files into the staging dir: add the trainer state,
    write the manifest last, rename into place, then prune. Returns the checkpoint's path."""
    staging = staging_dir(output_dir, step)
    (staging / TRAINER_STATE).write_text(json.dumps(trainer_state))
    write_manifest(staging)
    final = checkpoints_dir(output_dir) / f"step_{step}"
    if final.exists():  # the same step saved again (e.g. a preempted run resumed, then preempted at once)
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_path(final.parent)
    prune(output_dir, keep_last)
    return final


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep_last`. A prune killed midway leaves a
    checkpoint with files missing, which `verify` refuses; the newest ones are untouched."""
    for _, path in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / TRAINER_STATE).read_text())


@dataclasses.dataclass
class Progress:
    """What the loop accumulates, saved in each checkpoint so that a resumed run logs exactly what
    the uninterrupted one would have (the open logging window included)."""

    step: int = 0
    final: dict[str, float] = dataclasses.field(default_factory=dict)
    first_eval_accuracy: float | None = None
    window: list[dict[str, float]] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    train_tokens: float = 0.0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    wall_seconds_before: float = 0.0  # wall time of the attempts before this one


def resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """What must not change across a resume for the data order and state to continue exactly."""
    keys = (
        "seed",
        "global_batch_size",
        "dataset",
        "train_split",
        "group_by_length",
        "mode",
        "max_length",
        "max_prompt_length",
        "model_name_or_path",
    )
    return {k: getattr(cfg, k) for k in keys}
