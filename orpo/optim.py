"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from orpo.config import ConfigError, TrainConfig


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's, or bitsandbytes' 8-bit / paged variants.

    With DeepSpeed's optimizer offload (`offload`), the step runs on the CPU: DeepSpeedCPUAdam (AdamW
    mode), DeepSpeed's vectorised CPU AdamW, which it requires for offload; 8-bit states cannot be offloaded.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if offload:
        if cfg.optim != "adamw_torch":
            raise ConfigError(f"optim={cfg.optim} cannot run with DeepSpeed optimizer offload; use optim=adamw_torch.")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[cfg.optim]
    if not torch.cuda.is_available():
        # Paging moves optimizer states through CUDA unified memory; without CUDA bitsandbytes warns
        # ("Paged optimizers are not supported on CPU") and runs the non-paged optimizer. Use that
        # one directly: the same update, bit for bit, and no warning on every CPU run of a recipe.
        cls = _non_paged().get(cfg.optim, cls)
    return cls(params, **kwargs)


def _non_paged() -> dict[str, type]:
    import bitsandbytes as bnb

    return {"paged_adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.AdamW32bit}


def lr_lambda(
    step: int, warmup_steps: int, max_steps: int, kind: str, min_lr_ratio: float = 0.0, decay_ratio: float = 0.1
) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup to 1
    over `warmup_steps` (nanoGPT's (step + 1) / (warmup + 1), so no step is wasted at lr 0), then
    the decay `kind` (TrainConfig.lr_scheduler). After warmup every kind is the transformers schedule
    of that name (`get_scheduler`); the warmup is kept as it was, and the schedule stays one pure
    function of (step, warmup, max_steps), which resuming with a new max_steps recomputes."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    if kind == "warmup_stable_decay":  # transformers' get_wsd_schedule, decay_type cosine
        decay_steps = max(1, math.ceil(decay_ratio * max_steps))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return (0.5 * (1.0 + math.cos(math.pi * progress))) * (1.0 - min_lr_ratio) + min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "cosine_with_min_lr":  # transformers' get_cosine_with_min_lr_schedule_with_warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (1.0 - min_lr_ratio) + min_lr_ratio
    return max(0.0, 1.0 - progress)


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, warmup_steps, cfg.max_steps, cfg.lr_scheduler, cfg.min_lr_ratio, cfg.decay_ratio),
    )
