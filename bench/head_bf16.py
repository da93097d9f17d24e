"""Benchmark: the chunked log-prob head under bf16 on the CPU (issue 20, item 2).

    .venv/bin/python bench/head_bf16.py                     # both shapes, 5 interleaved repetitions
    .venv/bin/python bench/head_bf16.py --cases smollm2 --reps 9

One forward + backward of `orpo.logprobs.chunked_token_logps` (sum of the log-probs, backward to the
hidden states and, for a trained head, to the weight), as `orpo.forward.policy_forward` calls it
under accelerate's bf16 autocast on the CPU: the hidden states at the scored positions come out of
the model's final norm in float32 and require grad; the head weight is the float32 master weight,
trained (`mode: full`; SmolLM2's is the tied embedding) or frozen (`lora`); matmul_dtype=bf16
(`orpo.forward.head_matmul_dtype`). Variants, run interleaved in one process:

  current   the head as of commit BASELINE (loaded from git): bf16 operands, but on the CPU each
            chunk's matmul converts the bf16 copy of the [V, H] weight back to float32 (forward once
            per chunk, backward twice per chunk);
  (a)       the same numbers, with the weight rounded to bf16 and converted to float32 once per
            forward and once per backward; float32 GEMMs;
  (b)       bf16 GEMMs (AMX), each chunk's logits rounded to bf16 as the unfused autocast head's are,
            then log-sum-exp and softmax in float32 (what orpo/logprobs.py keeps);
  fp32      matmul_dtype=None: float32 operands and GEMMs;
  full      the unfused head: F.linear under torch.autocast("cpu", bf16), logits upcast to float32,
            log_softmax and gather (orpo.loss.token_logps) over all N positions at once.

Prints, per case, the median wall time of `--reps` repetitions (each repetition runs every variant
once, in a rotated order), its ratio to `current`, the peak of CPU memory allocated beyond the inputs
(from torch.profiler's memory events, one separate profiled run), and the largest |log-prob| gap to
`full`. The machine may be shared: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orpo import logprobs  # noqa: E402
from orpo.loss import token_logps  # noqa: E402

BASELINE = "da28535"  # orpo/logprobs.py before issue 20 item 2
_PRECISION = logprobs._precision

# name: (V, H, N positions, head trained)
CASES = {
    "smollm2": (49_152, 576, 1_600, True),  # 2 pairs x 2 sequences x ~400 tokens, tied embedding trained
    "smollm2-lora": (49_152, 576, 1_600, False),  # the same, head frozen (LoRA)
    "mistral": (32_000, 4_096, 512, True),
}


def baseline_module() -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{BASELINE}:orpo/logprobs.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("logprobs_baseline")
    exec(compile(source, f"{BASELINE}:orpo/logprobs.py", "exec"), module.__dict__)
    return module


def convert_once_precision(
    hidden: torch.Tensor, weight: torch.Tensor, matmul_dtype: torch.dtype | None
) -> logprobs._Precision:
    """Variant (a): operands rounded to bf16 but held, and multiplied, in float32."""
    p = _PRECISION(hidden, weight, matmul_dtype)
    return p._replace(compute=p.out, product=p.out)


def variants(baseline: types.ModuleType) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]]:
    bf16 = torch.bfloat16

    def current(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return baseline.chunked_token_logps(h, w, t, matmul_dtype=bf16)

    def convert_once(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with mock.patch.object(logprobs, "_precision", convert_once_precision):
            return logprobs.chunked_token_logps(h, w, t, matmul_dtype=bf16)

    def bf16_logits(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logprobs.chunked_token_logps(h, w, t, matmul_dtype=bf16)

    def fp32(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logprobs.chunked_token_logps(h, w, t)

    def full(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=bf16):
            logits = F.linear(h, w)
        return token_logps(logits.float(), t)

    return {
        "current": current,
        "(a) convert once": convert_once,
        "(b) bf16 logits": bf16_logits,
        "fp32": fp32,
        "full": full,
    }


def step(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward + backward from cleared gradients; returns the log-probs."""
    logps = fn(hidden, weight, targets)
    logps.sum().backward()
    return logps.detach()


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU bytes allocated and not yet freed while fn runs (torch.profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_case(name: str, reps: int, fns: dict[str, Callable]) -> None:
    vocab, hidden_size, positions, trained = CASES[name]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_(trained)
    targets = torch.randint(0, vocab, (positions,), generator=gen)
    print(
        f"\n{name}: V={vocab}, H={hidden_size}, N={positions}, chunk={logprobs.default_chunk_size(vocab)}, "
        f"head {'trained' if trained else 'frozen'}, fp32 hidden and master weight, matmul_dtype=bf16",
        flush=True,
    )

    def clear() -> None:  # outside what is timed or profiled: freeing the last step's gradients
        hidden.grad = weight.grad = None

    reference = step(fns["full"], hidden, weight, targets)
    gaps, peaks = {}, {}
    for label, fn in fns.items():
        clear()
        gaps[label] = (step(fn, hidden, weight, targets) - reference).abs().max().item()  # also the warm-up
        clear()
        peaks[label] = peak_bytes(lambda fn=fn: step(fn, hidden, weight, targets))
    times: dict[str, list[float]] = {label: [] for label in fns}
    labels = list(fns)
    for rep in range(reps):
        for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:  # rotate the order
            clear()
            start = time.perf_counter()
            step(fns[label], hidden, weight, targets)
            times[label].append(time.perf_counter() - start)

    base = statistics.median(times["current"])
    print(f"{'variant':<18} {'median s':>9} {'vs current':>11} {'peak MB':>8} {'max |dlogp| vs full':>20}")
    for label in labels:
        med = statistics.median(times[label])
        print(f"{label:<18} {med:9.3f} {med / base:10.2f}x {peaks[label] / 2**20:8.0f} {gaps[label]:20.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="smollm2,smollm2-lora,mistral", help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = variants(baseline_module())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} interleaved repetitions")
    for name in args.cases.split(","):
        run_case(name, args.reps, fns)


if __name__ == "__main__":
    main()
