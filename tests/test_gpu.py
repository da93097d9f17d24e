"""The CUDA paths on one GPU: marked `gpu`, skipped where torch.cuda.is_available() is False (tests/conftest.py),
so `make test` passes on a CPU-only machine unchanged. `bench/gpu_check.sh` runs them on a lent GPU.

Covered: QLoRA optimizer steps of a Mistral-architecture model with random weights (2 layers) in bf16 with SDPA,
FlexAttention and flash-attention 2 (when it loads); padded vs packed equivalence in bf16; the chunked head
against full float32 logits (bf16 and fp16 operands); fp16 with a GradScaler; a paged_adamw_8bit checkpoint
and resume; the peak memory of the recipe's micro-batch (2 pairs of 1,024 tokens, Mistral-7B shape, QLoRA,
gradient checkpointing) under a 24 GB card's budget.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from orpo.collator import PackedPairCollator, PairCollator
from orpo.config import load_config
from orpo.forward import forward_orpo, policy_forward, resolve_head, to_device
from orpo.logprobs import chunked_token_logps
from orpo.metrics import MetricSums
from orpo.model import flash_attn_problem
from tests.conftest import ROOT, TINY, train_tiny
from tests.test_collator import pair
from tests.test_train import _scalars

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ATTENTIONS = [
    "sdpa",
    "flex_attention",
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(flash_attn_problem() is not None, reason=f"{flash_attn_problem()}"),
    ),
]


@pytest.fixture(scope="session")
def small_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Mistral-architecture model (GQA 8/2 heads, hidden 256) with seeded random bf16 weights
    and the tiny tokenizer, saved so that it loads 4-bit (bitsandbytes quantises while loading)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("small_mistral")
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


QLORA = (
    "random_init=false",
    "mode=qlora",
    "gradient_checkpointing=true",
    "optim=paged_adamw_8bit",
    "logging_steps=1",
    "eval_at_start=false",
    "num_sample_prompts=0",
    "eval_max_samples=64",
)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_qlora_steps_of_a_mistral_architecture_model_in_bf16(
    tmp_path: Path, small_mistral: Path, attention: str
) -> None:
    pytest.importorskip("bitsandbytes")
    summary = train_tiny(
        tmp_path / "run",
        f"model_name_or_path={small_mistral}",
        *QLORA,
        f"attn_implementation={attention}",
        "max_steps=8",
    )
    plan = summary["plan"]
    assert (plan["attention"], plan["mixed_precision"], plan["dtype"]) == (attention, "bf16", "torch.bfloat16")
    assert plan["trainable_params"] < plan["total_params"] / 3
    losses = [v for _, v in _scalars(tmp_path / "run", "train/loss")]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0], losses  # lr 3e-3 on the sorting task: it learns
    memory = _scalars(tmp_path / "run", "train/reserved_mem_gb")
    assert len(memory) == 8 and all(0 < v < 10 for _, v in memory)


def _pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(4, 300, size=rng.integers(5, 40)).tolist()
        chosen, rejected = (prompt + rng.integers(4, 300, size=rng.integers(3, 60)).tolist() for _ in range(2))
        out.append(pair(chosen, len(prompt), rejected, len(prompt), row_index=i))
    return out


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_and_packed_forwards_agree_in_bf16(attention: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(CUDA)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.bfloat16).to(CUDA)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    pairs = _pairs(4, seed=1)
    padded = to_device(PairCollator(0)(pairs), CUDA)
    packed = to_device(PackedPairCollator()(pairs), CUDA)
    head, _ = resolve_head(load_config(None), model, "bf16")
    with torch.no_grad():
        want = policy_forward(reference, padded, None)  # float32, padded, full logits
        got_padded = policy_forward(model, padded, head)
        got_packed = policy_forward(model, packed, head)
    for w, a, b in zip(want, got_padded, got_packed, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # padded vs packed, both bf16
        torch.testing.assert_close(b.float(), w, rtol=3e-2, atol=3e-2)  # bf16 vs float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_head_matches_full_float32_logits(dtype: torch.dtype) -> None:
    """Half operands (the chunked head under bf16 / fp16 mixed precision), float32 accumulation: the
    logits are the float32 products of the half values, so only summation order differs."""
    torch.manual_seed(0)
    n, hidden_size, vocab = 1500, 512, 32000
    hidden = (torch.randn(n, hidden_size, device=CUDA) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=CUDA) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=CUDA)
    upstream = torch.randn(n, device=CUDA)
    got = chunked_token_logps(hidden, weight, targets, chunk_size=256, matmul_dtype=dtype)
    (got * upstream).sum().backward()
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = torch.log_softmax(h @ w.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (want * upstream).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)
    # the logits' gradient goes back in the half dtype, and the gradients are stored in it: their
    # rounding (2^-8 relative for bf16), no more
    for got_grad, want_grad in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert got_grad.dtype == dtype
        assert float((got_grad.float() - want_grad).norm() / want_grad.norm()) < 1e-2


def test_fp16_trains_with_a_grad_scaler(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_tiny(
        out, "mixed_precision=fp16", "max_steps=4", "save_steps=2", "logging_steps=1", "eval_split=null"
    )
    assert summary["plan"]["mixed_precision"] == "fp16"
    assert (out / "checkpoints" / "step_2" / "scaler.pt").is_file()  # accelerate saves the GradScaler it made
    losses = [v for _, v in _scalars(out, "train/loss")]
    assert len(losses) == 4 and all(np.isfinite(losses)) and summary["skipped_steps"] == 0


def test_paged_adamw_8bit_checkpoint_resumes_exactly(tmp_path: Path, small_mistral: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    common = (f"model_name_or_path={small_mistral}", *QLORA, "max_steps=4", "save_steps=2", "eval_split=null")
    common += ("lora_dropout=0.0",)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_tiny(whole, *common)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    train_tiny(resumed, *common, "resume_from=latest")
    for tag in ("train/loss", "train/grad_norm"):
        want = dict(_scalars(whole, tag))
        got = dict(_scalars(resumed, tag))
        assert sorted(got) == [3, 4]  # only the checkpoint was copied: the resumed run logs steps 3 and 4
        np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-4)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


def _mistral_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral-7B-v0.1's architecture with seeded random bf16 weights on disk (~14.5 GB): the directory
    in ORPO_GPU_MISTRAL7B (bench/gpu_check.sh points it at the benchmark's copy), else built here."""
    if os.environ.get("ORPO_GPU_MISTRAL7B"):
        return Path(os.environ["ORPO_GPU_MISTRAL7B"])
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("mistral7b")
    config = AutoConfig.for_model(**__import__("json").loads((ROOT / "bench" / "mistral7b_config.json").read_text()))
    torch.manual_seed(0)
    with CUDA:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    return path


def test_recipe_micro_batch_fits_a_24_gb_card(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mistral-7B shape, QLoRA (NF4, double quant, bf16), LoRA r=16 on the 7 projections, gradient
    checkpointing, the chunked head, paged 8-bit AdamW: one micro-batch of the recipe (2 pairs, every
    sequence 1,024 tokens: the worst case) forward, backward and optimizer step."""
    pytest.importorskip("bitsandbytes")
    from orpo.model import load_model
    from orpo.optim import build_optimizer

    path = _mistral_7b(tmp_path_factory)
    cfg = load_config(None, [f"model_name_or_path={path}", "lora_dropout=0.0"])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, info = load_model(cfg, CUDA)
    model.train()
    optimizer = build_optimizer(cfg, model)
    head, _ = resolve_head(cfg, model, "bf16")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    pairs = [
        pair(rng.integers(3, vocab, 1024).tolist(), 512, rng.integers(3, vocab, 1024).tolist(), 512, row_index=i)
        for i in range(2)
    ]
    batch = to_device(PairCollator(0)(pairs), CUDA)
    for _ in range(2):  # the second step holds the optimizer's state too
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward_orpo(model, batch, 0.1, int(batch["num_nll_tokens"]), 2, MetricSums(CUDA), head)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    print(
        f"recipe micro-batch on {torch.cuda.get_device_name()}: peak allocated {allocated:.2f} GiB, "
        f"reserved {reserved:.2f} GiB ({info.describe_params()})"
    )
    assert torch.isfinite(out.loss)
    assert reserved < 20.0, f"{reserved:.2f} GiB reserved: leaves too little of a 24 GB card's 22 GiB usable"


def test_metric_sums_add_no_host_sync() -> None:
    """MetricSums.add runs once per micro-batch: it must not copy host values to the device (a sync)."""
    sums = MetricSums(CUDA)
    chosen, rejected = torch.tensor([-1.0, -2.0], device=CUDA), torch.tensor([-1.5, -1.0], device=CUDA)
    ratio, nll, nll_tokens, tokens = (torch.tensor(v, device=CUDA) for v in ([0.3, -0.2], 5.0, 7, 20))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums.add(chosen, rejected, ratio, nll, nll_tokens, tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.sums.tolist()[:4] == [
        5.0,
        7.0,
        pytest.approx(
            float(-torch.nn.functional.logsigmoid(torch.tensor([0.3, -0.2], dtype=torch.float64)).sum()), abs=1e-6
        ),
        2.0,
    ]
