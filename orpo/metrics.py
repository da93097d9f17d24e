"""ORPO metrics with TRL's names, summed over micro-batches and ranks before they are averaged.

Everything is kept as sums on the device (no host sync per micro-batch) and reduced with one
all-reduce, so a logged value is the global batch's (or the whole eval subset's), not rank 0's.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Slots of the sums tensor.
_SLOTS = (
    "nll_sum",
    "nll_tokens",
    "or_sum",
    "pairs",
    "logps_chosen",
    "logps_rejected",
    "log_odds_chosen",
    "log_odds_ratio",
    "accuracies",
    "tokens",
)
_INDEX = {name: i for i, name in enumerate(_SLOTS)}

# Dense bf16 peak of common training GPUs, TFLOP/s (vendor data sheets), for MFU.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


class MetricSums:
    """Running sums for one optimizer step (training) or one evaluation."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(_SLOTS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        log_odds_ratio: torch.Tensor,
        nll_sum: torch.Tensor,
        nll_tokens: torch.Tensor,
        num_tokens: torch.Tensor,
    ) -> None:
        """Per-pair tensors are [pairs]; `log_odds_ratio` is r; `nll_sum` the summed token NLL."""
        values = torch.stack(
            [
                nll_sum.detach().double(),
                nll_tokens.double(),
                (-F.logsigmoid(log_odds_ratio.double())).sum(),
                torch.tensor(float(len(chosen_logps)), dtype=torch.float64, device=self.sums.device),
                chosen_logps.detach().double().sum(),
                rejected_logps.detach().double().sum(),
                log_odds_ratio.double().sum(),
                F.logsigmoid(log_odds_ratio.double()).sum(),
                (chosen_logps > rejected_logps).double().sum(),
                num_tokens.double(),
            ]
        )
        self.sums += values.to(self.sums.device)

    def reduce(self, accelerator, orpo_lambda: float) -> dict[str, float]:
        """Sum over ranks, then turn the sums into the spec's metrics (tags without prefix)."""
        sums = accelerator.reduce(self.sums.clone(), reduction="sum") if accelerator.num_processes > 1 else self.sums
        s = dict(zip(_SLOTS, sums.tolist(), strict=True))
        pairs = max(s["pairs"], 1.0)
        nll = s["nll_sum"] / max(s["nll_tokens"], 1.0)
        or_term = orpo_lambda * s["or_sum"] / pairs
        chosen, rejected = s["logps_chosen"] / pairs, s["logps_rejected"] / pairs
        return {
            "loss": nll + or_term,
            "nll_loss": nll,
            "or_loss": or_term,
            "log_odds_ratio": s["log_odds_ratio"] / pairs,
            "log_odds_chosen": s["log_odds_chosen"] / pairs,
            "logps/chosen": chosen,
            "logps/rejected": rejected,
            "rewards/chosen": orpo_lambda * chosen,
            "rewards/rejected": orpo_lambda * rejected,
            "rewards/margins": orpo_lambda * (chosen - rejected),
            "rewards/accuracies": s["accuracies"] / pairs,
            "pairs": s["pairs"],
            "tokens": s["tokens"],
        }


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over logged steps (every step has the same global batch)."""
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated by tensors; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs per token: 2N forward, 2N backward to activations, 2N to weights when the
    base is trained (full); LoRA skips the base's weight gradients. Recomputation is not counted."""

    params: int
    full: bool

    def per_token(self) -> float:
        return (6.0 if self.full else 4.0) * self.params


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}
