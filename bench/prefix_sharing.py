"""Time one forward + backward of the ORPO loss with and without prefix sharing, padded and packed.

    # SmolLM2-135M's shape (random weights from its config), UltraFeedback-like lengths, 2 pairs a micro-batch
    python bench/prefix_sharing.py --model smollm2 --pairs 2
    # the tiny demo model on the shipped sorting pairs, 16 pairs a micro-batch (configs/tiny.yaml)
    python bench/prefix_sharing.py --model tiny --pairs 16

Each variant (unshared / shared x padded / packed) runs in its own subprocess, so that its peak RSS
is its own; the variants are interleaved over --repeats rounds. A subprocess builds the model
(seeded), then runs --steps + 1 micro-batches of the same seeded pairs through the trainer's
orpo.forward.forward_orpo (chunked head, sdpa) and backward, without an optimizer step, and reports
the median step time after the first. Printed per variant: median seconds per micro-batch over the
rounds, pairs/s, computed tokens per micro-batch, and the peak RSS. --precision bf16 runs under CPU
autocast as the trainer does on CPUs with AMX/AVX512-BF16 (mixed_precision auto), `no` in float32.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the orpo package, from a checkout
VARIANTS = ("unshared-padded", "shared-padded", "unshared-packed", "shared-packed")
# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the numbers that set the cost.
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)


def synthetic_pairs(count: int, seed: int, vocab: int, max_length: int = 1024, max_prompt: int = 512) -> list[dict]:
    """UltraFeedback-like token pairs: log-normal lengths (prompt median 134, responses 267, as
    bench/bench_orpo.py draws them), budgets applied as orpo/data.py does (prompt left-cut to
    max_prompt, then each response cut to fit max_length)."""
    rng = np.random.default_rng(seed)

    def lengths(median: int, low: int, high: int) -> np.ndarray:
        return np.clip(np.round(rng.lognormal(np.log(median), 0.6, count)), low, high).astype(int)

    pairs = []
    for i, (p, c, r) in enumerate(
        zip(lengths(134, 50, 400), lengths(267, 50, 700), lengths(267, 50, 700), strict=True)
    ):
        prompt = rng.integers(8, vocab, min(p, max_prompt)).tolist()
        keep = max_length - len(prompt)
        chosen = prompt + rng.integers(8, vocab, min(c, keep)).tolist()
        rejected = prompt + rng.integers(8, vocab, min(r, keep)).tolist()
        pairs.append(
            {
                "chosen_ids": np.array(chosen),
                "chosen_prompt_len": len(prompt),
                "rejected_ids": np.array(rejected),
                "rejected_prompt_len": len(prompt),
                "row_index": i,
            }
        )
    return pairs


def model_and_pairs(name: str, count: int) -> tuple:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if name == "smollm2":
        config = LlamaConfig(**SMOLLM2)
        pairs = synthetic_pairs(count, 0, config.vocab_size)
    else:
        from transformers import AutoTokenizer

        from orpo.data import load_split

        config = AutoConfig.from_pretrained(ROOT / "assets" / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny")
        data = load_split(str(ROOT / "data" / "sort_prefs"), "train", tokenizer, 64, 48, cache_dir="/tmp/orpo-measure")
        pairs = [data[i] for i in range(count)]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model, pairs


def run_one(args: argparse.Namespace, variant: str) -> dict:
    import torch

    from orpo.collator import PackedPairCollator, PairCollator, SharedPairCollator
    from orpo.forward import LMHead, forward_orpo, head_matmul_dtype
    from orpo.logprobs import output_projection
    from orpo.metrics import MetricSums

    torch.set_num_threads(args.threads)
    model, pairs = model_and_pairs(args.model, args.pairs * (args.steps + 1))
    model.train()
    shared, packed = variant.startswith("shared"), variant.endswith("packed")
    if shared:
        collator = SharedPairCollator(0, packed=packed)
    else:
        collator = PackedPairCollator() if packed else PairCollator(0)
    matmul_dtype = head_matmul_dtype(args.precision, torch.device("cpu"))
    head = LMHead(*output_projection(model), matmul_dtype)
    times, computed = [], []
    for step in range(args.steps + 1):
        batch = collator(pairs[step * args.pairs : (step + 1) * args.pairs])
        computed.append(int(batch.get("num_computed_tokens", batch["num_tokens"])))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = forward_orpo(
                model, batch, 0.1, int(batch["num_nll_tokens"]), args.pairs, MetricSums(torch.device("cpu")), head
            )
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {
        "seconds": statistics.median(times[1:]),
        "computed_tokens": statistics.mean(computed[1:]),
        "tokens": int(sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[args.pairs :])) / args.steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": out.loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--steps", type=int, default=3, help="timed micro-batches per subprocess (after one untimed)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every variant")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    for _ in range(args.repeats):
        for variant in variants:
            cmd = [sys.executable, __file__, *passthrough, "--one", variant]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, {args.pairs} pairs/micro-batch, precision {args.precision}, {args.threads} threads")
    print(
        f"{'variant':17} {'s/micro-batch':>13} {'pairs/s':>8} {'computed tok':>12} {'of tokens':>9} "
        f"{'peak RSS GB':>11}  loss"
    )
    unshared: dict[str, float] = {}  # layout -> seconds
    for variant, runs in results.items():
        seconds, layout, first = statistics.median(r["seconds"] for r in runs), variant.split("-")[1], runs[0]
        unshared.setdefault(layout, seconds)
        each = ", ".join(f"{r['seconds']:.3f}" for r in runs)
        print(
            f"{variant:17} {seconds:13.3f} {args.pairs / seconds:8.2f} {first['computed_tokens']:12.0f} "
            f"{first['computed_tokens'] / first['tokens']:9.2f} {max(r['peak_rss_gb'] for r in runs):11.2f}  "
            f"{first['loss']:.6f}  (x{unshared[layout] / seconds:.2f} of unshared {layout}; each: {each})"
        )


if __name__ == "__main__":
    main()
