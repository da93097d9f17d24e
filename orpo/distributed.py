"""Processes and DeepSpeed: what accelerate needs to be told on a CPU-only machine, and the
DeepSpeed settings that must come from the recipe."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import TorchDynamoPlugin

from orpo.config import BatchPlan, ConfigError, TrainConfig


def launched() -> bool:
    """Whether this process is one of several started by a launcher (accelerate, torchrun, srun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_processes() -> tuple[PartialState, bool]:
    """The process group, and whether to force the CPU.

    Without CUDA, accelerate leaves the backend unset and each launched process thinks it is alone
    (distributed type NO: no gradient all-reduce at all). Launched processes on a CPU-only machine
    therefore get gloo, and for plain data parallelism the CPU flag that makes accelerate wrap DDP.
    """
    if not launched() or torch.cuda.is_available():
        return PartialState(), False
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return PartialState(backend="gloo"), False
    return PartialState(cpu=True, backend="gloo"), True


# `make train-multigpu`'s default launch config per mode. QLoRA's 4-bit base skips zero.Init and is
# whole on every rank, and LoRA's frozen base gains nothing from sharding when it fits one GPU: ZeRO-3
# would only add all-gathers, so DDP. Full fine-tuning shards everything (ZeRO-3).
LAUNCH_CONFIGS = {
    "full": "accelerate_configs/zero3.yaml",
    "lora": "accelerate_configs/ddp.yaml",
    "qlora": "accelerate_configs/ddp.yaml",
}


def default_launch_config(cfg: TrainConfig) -> str:
    return LAUNCH_CONFIGS[cfg.mode]


def compile_plugin(cfg: TrainConfig) -> TorchDynamoPlugin | None:
    """torch_compile: regional compilation of the decoder layers with dynamic shapes (every micro-batch
    has its own length); accelerate applies it in prepare(), after DDP or DeepSpeed wrapping. None
    leaves accelerate's own setting (the accelerate config's dynamo section) in charge."""
    if not cfg.torch_compile:
        return None
    return TorchDynamoPlugin(backend="inductor", use_regional_compilation=True, dynamic=True)


def compiled_regions(model: torch.nn.Module) -> int:
    """How many modules torch.compile wraps (a wrapper, or compiled in place under DeepSpeed)."""
    return sum(
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def deepspeed_offloads_optimizer(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return False
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") in ("cpu", "nvme")


def configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig, plan: BatchPlan) -> None:
    """Fill DeepSpeed's batch, accumulation and clipping from the recipe, so they mean what it says.

    Under DeepSpeed the engine clips (accelerate's clip_grad_norm_ only reports the norm), so the
    recipe's max_grad_norm must reach the DeepSpeed config; a number already there must agree.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f"The DeepSpeed config sets {key}={ds[key]!r} but the recipe implies {value!r}; "
                f'set it to "auto" in the DeepSpeed JSON and choose it in the recipe.'
            )
        ds[key] = value
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"The DeepSpeed config has zero_optimization.stage={stage!r}; expected 1, 2 or 3. Stage 0 is plain "
            "data parallelism (and its engine applies non-finite updates): use accelerate_configs/ddp.yaml."
        )
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("check_grad_overflow", True) is False:
        raise ConfigError(
            "The DeepSpeed config sets bf16.check_grad_overflow=false; remove it: the engine must skip a step "
            "whose gradient is not finite, which is how the non-finite guard (max_skipped_steps) skips it."
        )
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme") and cfg.optim != "adamw_torch":
        raise ConfigError(
            f"The DeepSpeed config offloads the optimizer (zero_optimization.offload_optimizer.device={offload!r}) "
            f"but optim={cfg.optim}: 8-bit and paged bitsandbytes states cannot be offloaded (the step runs "
            "DeepSpeedCPUAdam). Set optim=adamw_torch, or use a launch config without offload."
        )
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"The DeepSpeed config has an {section!r} section; remove it: the recipe's optim and "
                "lr_scheduler are used under DeepSpeed too."
            )


def check_engine_agrees(accelerator: Accelerator, finite: bool, step: int) -> None:
    """Under DeepSpeed the engine has already taken (or skipped) the step inside backward, deciding
    on its own gradient norm; the loop's decision, from the reduced loss and that norm, must be
    the same, or the skipped-step count (and the schedule) would not describe what was applied."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set by prepare() under DeepSpeed
    if wrapped is None:
        return
    applied = wrapped.engine.was_step_applied()
    if applied != finite:
        raise RuntimeError(
            f"step {step}: the DeepSpeed engine {'applied' if applied else 'skipped'} the update but the "
            f"loss and gradient norm say it should be {'applied' if finite else 'skipped'}."
        )
