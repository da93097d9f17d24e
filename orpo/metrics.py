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

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (their "with
# sparsity" figures halved), keyed by the exact name torch.cuda.get_device_name reports, without its
# "NVIDIA " / "Tesla " prefix. Matched exactly: "L40" must not get the L4's number, nor "H100 NVL" the
# H100 PCIe's. Unknown names log no MFU.
PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.4,  # H100 SXM5: 1,979 with sparsity
    "H100 SXM5 80GB": 989.4,
    "H100 PCIe": 756.0,  # 1,513 with sparsity
    "H100 NVL": 835.5,  # H100 NVL (94 GB) data sheet: 1,671 with sparsity
    "H200": 989.4,  # H200 SXM: 1,979 with sparsity
    "H200 NVL": 835.5,  # 1,671 with sparsity
    "A100-SXM4-80GB": 312.0,  # A100 (SXM and PCIe): 624 with sparsity
    "A100-SXM4-40GB": 312.0,
    "A100 80GB PCIe": 312.0,
    "A100-PCIE-40GB": 312.0,
    "L40S": 362.05,  # 733 with sparsity
    "L40": 181.05,  # 362.1 with sparsity
    "L4": 121.0,  # 242 with sparsity
    "A40": 149.7,  # 299.4 with sparsity
    "A10": 125.0,  # 250 with sparsity
    "RTX 6000 Ada Generation": 364.25,  # 728.5 with sparsity
    "GeForce RTX 4090": 165.2,  # Ada whitepaper, FP32 accumulate: 330.4 with sparsity
    "GeForce RTX 3090": 71.0,  # Ampere GA102 whitepaper, FP32 accumulate: 142 with sparsity
}


def peak_tflops_of(name: str) -> float | None:
    """The table's peak for a device name as torch reports it ("NVIDIA H100 80GB HBM3"), or None."""
    for prefix in ("NVIDIA ", "Tesla "):
        name = name.removeprefix(prefix)
    return PEAK_TFLOPS.get(name.strip())


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
                # a fill on the device, not a host-to-device copy of a Python number (a sync on CUDA)
                torch.full((), float(len(chosen_logps)), dtype=torch.float64, device=self.sums.device),
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


def window_memory(accelerator) -> dict[str, float]:
    """Memory of the logging window just ended, the maximum over ranks (a collective: every rank calls it).

    CUDA: `peak_mem_gb`, the most the tensors held (max_memory_allocated), and `reserved_mem_gb`, the
    most the caching allocator held (max_memory_reserved: what the card must have), both since the
    last window; the peaks are then reset so the next window starts afresh. CPU: `peak_mem_gb`, the
    process's peak resident set since it started (the kernel keeps no resettable peak).
    """
    device = accelerator.device
    if device.type == "cuda":
        values = [torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.max_memory_reserved(device) / 1e9]
        torch.cuda.reset_peak_memory_stats(device)
    else:
        values = [peak_memory_gb(device)]
    if accelerator.num_processes > 1:
        peaks = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        values = peaks.tolist()
    return dict(zip(("peak_mem_gb", "reserved_mem_gb"), values, strict=False))


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


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
