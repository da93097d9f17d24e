"""One forward of the policy on a collated micro-batch, and evaluation over an eval subset."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator

from orpo.collator import (
    SHARED_MASK_IMPLEMENTATIONS,
    PairCollator,
    SharedPairCollator,
    SharedTargets,
    shared_attention_mask,
)
from orpo.config import ConfigError, TrainConfig
from orpo.data import PreferenceSplit
from orpo.logprobs import (
    head_module,
    output_projection,
    packed_policy_logps,
    policy_logps_from_hidden,
    shared_policy_logps,
)
from orpo.loss import ORPOLoss, PolicyLogps, orpo_loss, policy_logps
from orpo.metrics import MetricSums


class LMHead(NamedTuple):
    """The LM head as the chunked log-prob path reads it (orpo/logprobs.py): its weight and bias, or
    (weight None) the module to call chunk by chunk."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    matmul_dtype: torch.dtype | None
    module: torch.nn.Module | None = None
    gather: Callable[[], AbstractContextManager] | None = None  # makes a ZeRO-3-partitioned weight whole
    chunk_size: int | None = None


# Attention implementations that build the packed row's block-diagonal mask from position_ids (once
# per forward) and have no use for varlen arguments; every other one (flash_attention_2/3, kernels
# from the hub, a registered custom function) is given them.
MASK_FROM_POSITIONS = ("sdpa", "eager", "flex_attention")

# Where `prefix_sharing: auto` turns sharing on: (device type, attention implementation, layout), each
# measured faster than the same layout without sharing. Forward + backward of the ORPO loss through
# forward_orpo (chunked head, sdpa, no gradient checkpointing), without the optimizer step, median
# s/micro-batch over interleaved rounds, 2 shared cores with AMX (another engineer's jobs beside):
#
#   python bench/prefix_sharing.py --model smollm2 --pairs 2 --steps 4 --repeats 3 --precision bf16
#   SmolLM2-135M's shape (30 layers, hidden 576, V=49,152, random weights), UltraFeedback-like pairs
#   (log-normal, prompt median 134, responses 267), bf16 autocast (what `auto` picks on this CPU):
#                      s/micro-batch  pairs/s  computed tokens  peak RSS
#     unshared padded      4.873       0.41      1,626 (1.00)    4.90 GB
#     shared padded        3.270       0.61      1,305 (0.80)    3.97 GB   1.49x
#     unshared packed      4.918       0.41      1,626           4.27 GB
#     shared packed        3.780       0.53      1,305           3.86 GB   1.30x (1.29x unshared padded)
#   the same in float32 (--precision no --repeats 2: CPUs without AMX / AVX512-BF16):
#     unshared padded 7.405 s, 6.02 GB; shared padded 5.540 s, 4.60 GB (1.34x);
#     unshared packed 8.644 s, 4.99 GB; shared packed 6.553 s, 4.19 GB (1.32x)
#
#   python bench/prefix_sharing.py --model tiny --pairs 16 --steps 20 --repeats 3 --precision no
#   the tiny demo model (configs/tiny.yaml) on the sorting pairs, whose responses begin alike, float32:
#     unshared padded 0.021 s, shared padded 0.015 s (1.45x); unshared packed 0.024 s, shared packed
#     0.013 s (1.85x); computed tokens 0.58 of the pairs'.
#
# More than the computed-token ratio is saved in the padded layout: B rows padded to the longest pair
# instead of 2B rows padded to the longest sequence. Not measured, so off under auto: CUDA (sdpa with
# a mask leaves the flash kernel for the memory-efficient one), eager.
AUTO_PREFIX_SHARING: frozenset[tuple[str, str, str]] = frozenset({("cpu", "sdpa", "padded"), ("cpu", "sdpa", "packed")})


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DistributedDataParallel, DeepSpeedEngine
        model = model.module
    return model


def attention_implementation(model: torch.nn.Module) -> str:
    """The model's attn_implementation, through DDP / DeepSpeed / PEFT wrappers."""
    return getattr(getattr(_unwrapped(model), "config", None), "_attn_implementation", None) or "eager"


def varlen_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor | int]) -> dict[str, torch.Tensor | int]:
    """flash-attention's varlen arguments for a packed row (transformers' FlashAttentionKwargs):
    cu_seq_lens_q/k, the int32 offsets of the sequences on the device, and max_length_q/k, the longest
    as a Python int. With all four, transformers 5.24's `_flash_attention_forward` calls the varlen
    kernel directly; without them it re-derives them from position_ids in every layer (a nonzero()
    and a .max() each: device syncs, again in gradient-checkpoint recomputes)."""
    if attention_implementation(model) in MASK_FROM_POSITIONS:
        return {}
    cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def policy_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], head: LMHead | None) -> PolicyLogps:
    """Response log-probs and SFT NLL of a padded (PairCollator), packed (PackedPairCollator) or
    prefix-shared (SharedPairCollator, padded or packed) batch.

    A packed row goes in with position_ids and no attention mask, so that transformers builds the
    block-diagonal causal mask (flash-attention: varlen) from the position restarts. Shared rows go in
    with position_ids and their 4D mask (orpo.collator.shared_attention_mask), built here on the
    device. With `head`, the model returns no logits (logits_to_keep is empty) and log-probs come
    chunk by chunk from the last hidden states at the scored positions only.
    """
    shared = SharedTargets.of_batch(batch) if "score_positions" in batch else None
    packed = "seq_lens" in batch
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if shared is not None:
        inputs["position_ids"] = batch["position_ids"]
        dtype = getattr(_unwrapped(model), "dtype", torch.float32)  # the dtype transformers' own eager masks take
        inputs["attention_mask"] = shared_attention_mask(
            batch["block_ids"], batch["branch"], attention_implementation(model), dtype
        )
    elif packed:
        inputs["position_ids"] = batch["position_ids"]
        inputs.update(varlen_kwargs(model, batch))
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    seq_lens = batch["seq_lens"] if packed else None
    if head is None:
        logits = model(**inputs).logits
        if shared is not None:
            return shared_policy_logps(logits, shared)
        if packed:
            return packed_policy_logps(logits, batch["labels"], batch["nll_labels"], seq_lens)
        return policy_logps(logits, batch["labels"], batch["nll_labels"])
    no_logits = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=no_logits).hidden_states[-1]
    return policy_logps_from_hidden(
        hidden,
        head.weight,
        batch.get("labels"),
        batch.get("nll_labels"),
        head.bias,
        seq_lens=seq_lens,
        matmul_dtype=head.matmul_dtype,
        module=head.module,
        gather=head.gather,
        chunk_size=head.chunk_size,
        shared=shared,
    )


def check_prefix_sharing(cfg: TrainConfig, attention: str) -> None:
    """prefix_sharing=true needs an attention implementation that takes a 4D mask; refused otherwise,
    before the model loads (`attention` is what the model will be loaded with)."""
    if cfg.prefix_sharing is True and attention not in SHARED_MASK_IMPLEMENTATIONS:
        chosen = "" if cfg.attn_implementation == attention else f" (attn_implementation={cfg.attn_implementation})"
        raise ConfigError(
            f"prefix_sharing=true needs an attention implementation that takes a 4D attention mask "
            f"({', '.join(SHARED_MASK_IMPLEMENTATIONS)}), but this run would use {attention}{chosen}: it cannot "
            "keep the rejected tokens from attending to the chosen ones. Set attn_implementation=sdpa, or "
            "prefix_sharing=auto (off with it) or false."
        )


def use_prefix_sharing(cfg: TrainConfig, attention: str, packing: bool, device: torch.device) -> tuple[bool, str]:
    """Whether micro-batches are prefix-shared (SharedPairCollator), and why, for the plan.

    `auto` turns it on where it was measured faster; see AUTO_PREFIX_SHARING."""
    if cfg.prefix_sharing is False:
        return False, "off (prefix_sharing=false)"
    check_prefix_sharing(cfg, attention)
    if cfg.prefix_sharing is True:
        return True, "on (prefix_sharing=true)"
    layout = "packed" if packing else "padded"
    if (device.type, attention, layout) in AUTO_PREFIX_SHARING:
        return True, f"on (auto: measured faster with {attention}, {layout}, on the {device.type})"
    return False, f"off (auto: not measured faster with {attention}, {layout}, on the {device.type})"


def forward_orpo(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    orpo_lambda: float,
    num_nll_tokens: int,
    num_pairs: int,
    sums: MetricSums,
    head: LMHead | None = None,
) -> ORPOLoss:
    """Forward a collated micro-batch; returns its share of the step's loss and adds its metrics."""
    policy = policy_forward(model, batch, head)
    out = orpo_loss(policy.chosen_logps, policy.rejected_logps, policy.nll_sum, num_nll_tokens, num_pairs, orpo_lambda)
    sums.add(
        policy.chosen_logps,
        policy.rejected_logps,
        out.log_odds_ratio,
        policy.nll_sum,
        batch["num_nll_tokens"],
        batch["num_tokens"],
    )
    return out


def head_matmul_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The operand dtype of the chunked head's matmuls (orpo/logprobs.py, "Precision"); None: float32.

    bf16 on CUDA: bf16 operands into `torch.mm(out_dtype=float32)`, float32 accumulation and logits.
    bf16 on the CPU (which has no mm with out_dtype): bf16 GEMMs with bf16 output, so each chunk's
    logits are rounded to bf16 as the unfused head's are under autocast, then upcast for the
    float32 log-sum-exp; the weight is cast to bf16 once per forward and once per backward. Measured
    by `bench/head_bf16.py` at SmolLM2-135M's shape (V=49,152, H=576, 1,600 positions, forward +
    backward): 0.49x the time of converting the weight back to float32 in every chunk (what ran
    before, slower than float32 operands), 0.62x the time of float32 operands.
    fp16 on CUDA: fp16 operands into `torch.mm(out_dtype=float32)` (tensor cores, float32
    accumulation), like the unfused head under fp16 autocast but with float32 logits; the logits'
    gradient is cast to fp16 on the way back, which the GradScaler's loss scale keeps out of fp16's
    underflow range as it does for every other fp16 gradient. fp16 elsewhere: float32 operands.
    """
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def resolve_head(cfg: TrainConfig, model: torch.nn.Module, mixed_precision: str) -> tuple[LMHead | None, str]:
    """The chunked head when asked for and possible, else None (full logits), and why."""
    if not cfg.chunked_head:
        return None, "full logits (chunked_head=false)"
    try:
        module = head_module(model)
    except ValueError as err:
        return None, f"full logits: {err}"
    params = list(module.parameters())
    matmul_dtype = head_matmul_dtype(mixed_precision, params[0].device)
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3: partitioned outside the head's forward
        if not any(p.requires_grad for p in params) and type(module) is torch.nn.Linear:
            import deepspeed

            note = "chunked log-prob head, the frozen ZeRO-3 head gathered for it (no [tokens, vocab] logits)"
            gather = partial(deepspeed.zero.GatheredParameters, params, modifier_rank=None)
            return LMHead(module.weight, module.bias, matmul_dtype, None, gather, cfg.head_chunk_size), note
        if not all(p.requires_grad for p in params):
            return None, "full logits: a partly frozen head under ZeRO-3 (e.g. LoRA on lm_head)"
    try:
        weight, bias = output_projection(model)
    except ValueError:  # a LoRA, modules_to_save or 4-bit head, or a trainable head under ZeRO-3: call it
        kind = "ZeRO-3-partitioned" if hasattr(module.weight, "ds_id") else type(module).__name__
        note = f"chunked log-prob head, calling the {kind} head chunk by chunk (no [tokens, vocab] logits)"
        return LMHead(None, None, matmul_dtype, module, None, cfg.head_chunk_size), note
    head = LMHead(weight, bias, matmul_dtype, None, None, cfg.head_chunk_size)
    return head, "chunked log-prob head (no [tokens, vocab] logits)"


def to_device(batch: dict[str, torch.Tensor | int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """Tensors to the device; Python numbers (max_seqlen) stay on the host."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    accelerator: Accelerator,
    data: PreferenceSplit,
    indices: np.ndarray,
    collator: PairCollator | SharedPairCollator,
    batch_size: int,
    orpo_lambda: float,
    head: LMHead | None = None,
) -> dict[str, float]:
    """Metrics over the whole eval subset, each rank taking every num_processes-th pair.

    Every rank runs the same number of forwards (a rank out of pairs runs a discarded one): under
    ZeRO-3 each forward gathers parameters collectively, and an uneven count would hang.
    """
    model.eval()
    sums = MetricSums(accelerator.device)
    mine = indices[accelerator.process_index :: accelerator.num_processes]
    rounds = math.ceil(math.ceil(len(indices) / accelerator.num_processes) / batch_size)
    for start in range(0, rounds * batch_size, batch_size):
        chunk = mine[start : start + batch_size]
        target = sums if len(chunk) else MetricSums(accelerator.device)
        batch = to_device(collator([data[i] for i in (chunk if len(chunk) else indices[:1])]), accelerator.device)
        forward_orpo(model, batch, orpo_lambda, 1, 1, target, head)
    model.train()
    metrics = sums.reduce(accelerator, orpo_lambda)
    for key in ("pairs", "tokens"):
        metrics.pop(key)
    return metrics
