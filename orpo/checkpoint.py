"""Crash-safe checkpoints: written whole or not at all, verified before they are trusted.

A checkpoint `output_dir/checkpoints/step_<N>/` holds accelerate's state (what trains: the whole
model for `full`, only the trainable parameters (LoRA adapters, `modules_to_save`) for `lora` and
`qlora`, never the frozen base; optimizer, scheduler, gradient scaler, every RNG of every rank;
under DeepSpeed each rank's shard), `trainer_state.json` (step, data position, metric accumulators,
the base model's fingerprint, the schedule and the process layout it was written with) and, written
last, `manifest.json`
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
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folders(paths: Iterable[Path], root: Path) -> None:
    """fsync the folders holding `paths`, and `root`, deepest first (so each entry is durable in its parent)."""
    for folder in sorted({p.parent for p in paths} | {root}, key=lambda p: -len(p.parts)):
        fsync_path(folder)


def write_manifest(directory: Path) -> dict[str, Any]:
    """fsync every file under `directory`, then write (and fsync) the manifest of their sizes and hashes."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync_path(tmp)
    os.replace(tmp, directory / MANIFEST)
    fsync_folders(directory.rglob("*"), directory)
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
    fsync_path(final.parent)
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


# ---- what a checkpoint holds of the model --------------------------------------------------------


def model_file(directory: str | Path, index: int = 0) -> Path:
    """accelerate's name for the weights of its `index`-th prepared model in a checkpoint."""
    return Path(directory) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def trained_state(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of `model` (unwrapped: no DDP `module.` prefix, so that it loads on
    any number of processes): the whole state dict when every weight trains (`full`), else only the
    trainable parameters (LoRA adapters, `modules_to_save`). The frozen base is read again from
    model_name_or_path on resume; its bitsandbytes 4-bit layers would also write a quantisation
    state that they cannot load back."""
    if full:
        return model.state_dict()
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trained(model: torch.nn.Module, path: Path, full: bool) -> None:
    """Load what `trained_state` saved into `model` (unwrapped). For an adapter, every trainable
    parameter must be in the file, and the file may hold nothing this model does not have (a
    checkpoint written before adapters were saved alone also held the base: its extra tensors are
    skipped, the base is the one just loaded)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint has no model weights for this run.")
    saved = load_file(path)
    if saved and all(k.startswith("module.") for k in saved):  # written under DDP before the hooks
        saved = {k.removeprefix("module."): v for k, v in saved.items()}
    if full:
        missing, unexpected = model.load_state_dict(saved, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
            )
        return
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not hold this run's trainable parameters: missing {len(missing)} (e.g. {missing[:3]}), "
            f"unknown to this model {len(unexpected)} (e.g. {unexpected[:3]}). Was it written with other "
            "lora_target_modules or lora_r? Resume with the settings it was trained with."
        )
    with torch.no_grad():
        for name, param in trainable.items():
            if saved[name].shape != param.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(saved[name].shape)}, this model's {tuple(param.shape)} "
                    "(another lora_r?). Resume with the settings it was trained with."
                )
            param.copy_(saved[name])


def install_model_hooks(accelerator: Any, full: bool) -> None:
    """Make accelerate's save_state / load_state write and read `trained_state` instead of the whole
    wrapped model. Under DeepSpeed the engine saves its module itself (see `deepspeed_state_kwargs`);
    accelerate then hands these hooks no weights and no models to load."""

    def save_hook(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        if len(weights) != len(models):  # DeepSpeed engines: saved by the engine
            return
        for i, model in enumerate(models):
            weights[i] = trained_state(accelerator.unwrap_model(model), full)

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            load_trained(accelerator.unwrap_model(model), model_file(input_dir, i), full)
        models.clear()  # loaded here: accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def deepspeed_state_kwargs(engine: Any, full: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for save_state / load_state under DeepSpeed (engine.save_checkpoint /
    load_checkpoint). For an adapter, `exclude_frozen_parameters` keeps the frozen base out of the
    module state and out of ZeRO's frozen-parameter fragments, and the engine's module state is
    narrowed to the trainable parameters (bitsandbytes' 4-bit quantisation state is a buffer, which
    exclude_frozen_parameters keeps); the load is then not strict, the base coming from
    model_name_or_path."""
    if full:
        return {}, {}
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    module_state_dict = engine.module_state_dict

    def trainable_module_state_dict(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = module_state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if k in trainable)

    engine.module_state_dict = trainable_module_state_dict
    return {"exclude_frozen_parameters": True}, {"load_module_strict": False}


def restore_missing_rng(directory: str | Path, process_index: int) -> bool:
    """accelerate restores each rank's RNGs from random_states_<rank>.pkl and silently skips a rank
    that has none (the checkpoint was written by fewer processes). Such a rank takes rank 0's saved
    states: every rank starts a run from the same seed, so this is the closest to a state it would
    have had. Returns whether it did. Data order does not depend on these RNGs (batches are a pure
    function of seed and step); dropout masks (lora_dropout) do, and after a change of process count
    they differ from the uninterrupted run's (which rank runs which micro-batch changed too)."""
    directory = Path(directory)
    if (directory / f"random_states_{process_index}.pkl").is_file():
        return False
    states = torch.load(directory / "random_states_0.pkl", weights_only=False)  # written by accelerate
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        saved = states["torch_cuda_manual_seed"]
        for device in range(min(torch.cuda.device_count(), len(saved))):
            torch.cuda.set_rng_state(saved[device], device)
    return True


# ---- the base an adapter was trained on ----------------------------------------------------------

_VOLATILE_CONFIG_KEYS = (
    "_commit_hash",
    "_name_or_path",
    "transformers_version",
    "use_cache",
    "dtype",
    "torch_dtype",
    "quantization_config",
)


def base_config_fingerprint(model_name_or_path: str) -> dict[str, Any]:
    """Where the base comes from and a hash of its config.json (read without loading weights), so
    that a checkpoint is checked against it before any model is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    described = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(described, sort_keys=True, default=str)
    return {
        "model_name_or_path": model_name_or_path,
        "revision": getattr(config, "_commit_hash", None),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def base_weights_sha256(model: torch.nn.Module, elements: int = 65536) -> str | None:
    """A hash of a few frozen weights of the base (the first, middle and last frozen parameter, the
    first `elements` values of each): two bases that share a config but not their weights differ
    here. 4-bit weights are hashed as stored, others as float32. Under ZeRO-3 each one is gathered
    (a collective: every rank calls this). None when nothing is frozen (full fine-tuning)."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    digest = hashlib.sha256()
    for i in sorted({0, len(frozen) // 2, len(frozen) - 1}):
        name, param = frozen[i]
        with _gathered(param):
            flat = param.detach().reshape(-1)[:elements].cpu()
            if getattr(param, "quant_state", None) is None and flat.is_floating_point():
                flat = flat.float()
            digest.update(name.encode())
            digest.update(flat.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gathered(param: torch.Tensor) -> Any:
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


def check_base(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path) -> None:
    """An adapter is only meaningful on the base it was trained on: refuse any other, naming both."""
    if not saved:
        return  # a checkpoint written before fingerprints were stored
    differs = [k for k in now if k in saved and saved[k] != now[k]]
    if differs:
        raise CheckpointError(
            f"Cannot resume {checkpoint}: it was trained on another base model ({', '.join(differs)} differ). "
            f"Saved: {json.dumps({k: saved.get(k) for k in now})}. "
            f"Now: {json.dumps(now)}. An adapter only fits the base it was trained on: point "
            "model_name_or_path at that base, or start a new run in another output_dir."
        )


# ---- sizes ---------------------------------------------------------------------------------------


def checkpoint_sizes(directory: str | Path) -> dict[str, int]:
    """Bytes of a sealed checkpoint by part (from its manifest): model, optimizer, other, total."""
    files = json.loads((Path(directory) / MANIFEST).read_text())["files"]
    sizes = {"model": 0, "optimizer": 0, "other": 0}
    for name, entry in files.items():
        base = Path(name).name
        if "optim" in base:
            part = "optimizer"
        elif base.startswith("model") or base.endswith("model_states.pt"):
            part = "model"
        else:
            part = "other"
        sizes[part] += entry["size"]
    sizes["total"] = sum(sizes.values())
    return sizes


# Bytes of optimizer state per trainable parameter: two Adam moments, 4 bytes each or 1 byte in
# bitsandbytes' 8-bit optimizers (plus block statistics, ~1%).
_OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def expected_checkpoint_bytes(model: torch.nn.Module, optim: str, full: bool, deepspeed: bool) -> tuple[int, int, int]:
    """(trainable parameters, model part bytes, optimizer bytes) a checkpoint of `model` will take,
    summed over ranks. The model part is `trained_state`: every weight for `full`, else the trainable
    ones only. Under DeepSpeed the optimizer state also holds an fp32 master copy of each trainable
    parameter (4 bytes more)."""
    params = [p for p in model.parameters() if full or p.requires_grad]
    count = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    model_bytes = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params)
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    per_param = _OPTIMIZER_BYTES.get(optim, 8) + (4 if deepspeed else 0)
    return count, model_bytes, trainable * per_param


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e6:,.3f} MB"


# ---- what a resume may change ----------------------------------------------------------------------


def process_layout(processes: int, zero_stage: int | None) -> dict[str, Any]:
    """How a checkpoint's files are laid out: DeepSpeed ZeRO shards per rank, or one replica."""
    return {"processes": processes, "zero_stage": zero_stage}


def check_layout(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path) -> None:
    """Without DeepSpeed a checkpoint holds one replica (model, optimizer) and resumes on any number
    of processes. A ZeRO checkpoint holds each rank's shard of the optimizer state (and of the
    parameters under ZeRO-3), which DeepSpeed reloads only at the process count and stage that
    wrote it (its universal checkpoints need an offline conversion, ds_to_universal.py, and do not
    cover ZeRO-3 with frozen parameters): refused here, before any model is loaded."""
    if saved is None:
        return
    if saved["zero_stage"] is None and now["zero_stage"] is None:
        return
    if saved == now:
        return

    def describe(x: dict[str, Any]) -> str:
        engine = (
            f"DeepSpeed ZeRO-{x['zero_stage']}" if x["zero_stage"] is not None else "no DeepSpeed (DDP or one process)"
        )
        return f"{engine} with {x['processes']} processes"

    raise CheckpointError(
        f"Cannot resume {checkpoint}: it was written by {describe(saved)}, this launch runs {describe(now)}. "
        "A DeepSpeed checkpoint holds each rank's optimizer shard and reloads only with the same ZeRO stage "
        f"and number of processes: launch with --num_processes {saved['processes']} and the same "
        "accelerate config, or start a new run."
    )


def check_max_steps(saved_step: int, max_steps: int, checkpoint: Path) -> None:
    if max_steps < saved_step:
        raise CheckpointError(
            f"Cannot resume {checkpoint} at step {saved_step} with max_steps={max_steps}: that many steps are "
            f"already trained. Pass max_steps > {saved_step} to train on, or use the checkpoint as it is."
        )
