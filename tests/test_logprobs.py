"""orpo/logprobs.py: the chunked log-prob head gives the unfused path's numbers and gradients, and never
allocates a [positions, vocab] tensor.

The reference is the unfused path: logits = hidden @ W^T + b for every position, then
orpo.loss.policy_logps. The chunked path gathers the scored positions' hidden states and computes
log P(target) chunk by chunk, recomputing each chunk's logits in backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from orpo.collator import PairCollator
from orpo.config import load_config
from orpo.forward import policy_forward, resolve_head
from orpo.logprobs import (
    chunked_token_logps,
    default_chunk_size,
    module_token_logps,
    output_projection,
    policy_logps_from_hidden,
)
from orpo.loss import PolicyLogps, orpo_loss, policy_logps
from tests.conftest import TINY

PAD = 3


# ---- helpers -------------------------------------------------------------------------------------


def random_pairs(num_pairs: int, vocab: int, seed: int, max_len: int = 12) -> list[dict[str, Any]]:
    """Pairs as PreferenceSplit gives them: a shared prompt of 1-4 tokens, responses of 1-8 tokens."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(num_pairs):
        prompt = rng.integers(4, vocab, size=rng.integers(1, 5)).tolist()
        chosen = prompt + rng.integers(4, vocab, size=rng.integers(1, max_len - len(prompt))).tolist()
        rejected = prompt + rng.integers(4, vocab, size=rng.integers(1, max_len - len(prompt))).tolist()
        pairs.append(
            {
                "chosen_ids": np.array(chosen, dtype=np.int32),
                "chosen_prompt_len": len(prompt),
                "rejected_ids": np.array(rejected, dtype=np.int32),
                "rejected_prompt_len": len(prompt),
                "row_index": i,
            }
        )
    return pairs


class Case:
    """A collated batch with random hidden states [2B, T, H] and a random head [V, H] (+ bias)."""

    def __init__(
        self, pairs: int, hidden_size: int, vocab: int, nll_on_prompt: bool, seed: int, bias: bool = True
    ) -> None:
        batch = PairCollator(PAD, nll_on_prompt)(random_pairs(pairs, vocab, seed))
        self.labels, self.nll_labels = batch["labels"], batch["nll_labels"]
        gen = torch.Generator().manual_seed(seed)
        rows, width = self.labels.shape
        self.hidden = torch.randn(rows, width, hidden_size, generator=gen)
        self.weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
        self.bias = torch.randn(vocab, generator=gen) if bias else None
        self.num_nll_tokens = int(batch["num_nll_tokens"])


def loss_of(policy: PolicyLogps, num_nll_tokens: int) -> torch.Tensor:
    """The ORPO loss plus a term on every output, so each one's gradient is checked."""
    out = orpo_loss(policy.chosen_logps, policy.rejected_logps, policy.nll_sum, num_nll_tokens, 4, 0.5)
    return out.loss + 0.3 * policy.chosen_logps.sum() - 0.7 * policy.rejected_logps.sum()


def run_path(
    case: Case, fused: bool, train_head: bool, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[PolicyLogps, dict[str, torch.Tensor | None]]:
    """(PolicyLogps, gradients) of one path, from leaf copies of the case's tensors in `dtype`."""
    leaves = (None if t is None else t.to(dtype, copy=True) for t in (case.hidden, case.weight, case.bias))
    hidden, weight, bias = leaves
    hidden.requires_grad_(True)
    weight.requires_grad_(train_head)
    if bias is not None:
        bias.requires_grad_(train_head)
    if fused:
        policy = policy_logps_from_hidden(hidden, weight, case.labels, case.nll_labels, bias, **kwargs)
    else:
        logits = hidden @ weight.t() + (0 if bias is None else bias)
        policy = policy_logps(logits, case.labels, case.nll_labels)
    loss_of(policy, case.num_nll_tokens).backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": None if bias is None else bias.grad}
    return PolicyLogps(*(t.detach() for t in policy)), grads


def assert_policy_close(got: PolicyLogps, want: PolicyLogps, **tol: float) -> None:
    for name, g, w in zip(PolicyLogps._fields, got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), msg=lambda m, name=name: f"{name}: {m}", **tol)


class OpSizes(TorchDispatchMode):
    """Records the shape (and dtype) of every tensor each aten op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
                self.outputs.append((str(func), tuple(t.shape), t.dtype))
        return out

    def largest(self) -> int:
        return max(int(np.prod(s)) for _, s in self.shapes)


# ---- 1. same numbers and gradients as the unfused path -------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_matches_unfused_path_values_and_gradients(nll_on_prompt: bool, train_head: bool, chunk_size: int) -> None:
    case = Case(pairs=5, hidden_size=16, vocab=50, nll_on_prompt=nll_on_prompt, seed=3)
    want, want_grads = run_path(case, fused=False, train_head=train_head)
    got, got_grads = run_path(case, fused=True, train_head=train_head, chunk_size=chunk_size)
    assert_policy_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.chosen_logps.dtype == torch.float32 and got.chosen_logps.shape == (5,)
    for name in ("hidden", "weight", "bias"):
        if train_head or name == "hidden":
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
        else:
            assert got_grads[name] is None, f"a frozen head gets no {name} gradient"


def test_no_bias_head() -> None:
    case = Case(pairs=3, hidden_size=8, vocab=20, nll_on_prompt=True, seed=5, bias=False)
    want, want_grads = run_path(case, fused=False, train_head=True)
    got, got_grads = run_path(case, fused=True, train_head=True, chunk_size=4)
    assert_policy_close(got, want, rtol=1e-5, atol=1e-5)
    for name in ("hidden", "weight"):
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)


def test_frozen_head_computes_no_weight_gradient() -> None:
    """Not just None at the end: backward never forms a [V, H] product for a frozen head."""
    case = Case(pairs=4, hidden_size=8, vocab=30, nll_on_prompt=False, seed=7)

    def backward_shapes(train_head: bool) -> list[tuple[int, ...]]:
        hidden = case.hidden.clone().requires_grad_(True)
        weight = case.weight.clone().requires_grad_(train_head)
        policy = policy_logps_from_hidden(hidden, weight, case.labels, case.nll_labels, chunk_size=5)
        loss = loss_of(policy, case.num_nll_tokens)
        with OpSizes() as sizes:
            loss.backward()
        return [s for op, s in sizes.shapes if "mm" in op]

    assert (30, 8) in backward_shapes(train_head=True)  # the check can see a weight gradient
    assert (30, 8) not in backward_shapes(train_head=False)


# ---- 2. precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_logps_of_their_values(dtype: torch.dtype) -> None:
    """bf16/fp16 hidden and weight: the log-probs are the float32 ones of the rounded values (tight),
    and close to the float32 model's (loose: the inputs themselves are rounded)."""
    case = Case(pairs=4, hidden_size=32, vocab=64, nll_on_prompt=True, seed=11)
    got, got_grads = run_path(case, fused=True, train_head=True, dtype=dtype, chunk_size=9)
    assert got.chosen_logps.dtype == torch.float32
    assert got_grads["hidden"].dtype == got_grads["weight"].dtype == dtype

    rounded = Case(pairs=4, hidden_size=32, vocab=64, nll_on_prompt=True, seed=11)
    rounded.hidden, rounded.weight, rounded.bias = (t.to(dtype).float() for t in (case.hidden, case.weight, case.bias))
    want_rounded, want_rounded_grads = run_path(rounded, fused=False, train_head=True)
    assert_policy_close(got, want_rounded, rtol=1e-5, atol=1e-5)
    for name in ("hidden", "weight", "bias"):  # only the final cast of the gradient to `dtype` differs
        torch.testing.assert_close(got_grads[name].float(), want_rounded_grads[name], rtol=1e-2, atol=1e-3)

    want_fp32, _ = run_path(case, fused=False, train_head=True)
    assert_policy_close(got, want_fp32, rtol=0.0, atol=5e-2)


def autocast_path(case: Case, train_head: bool) -> tuple[PolicyLogps, dict[str, torch.Tensor | None]]:
    """The unfused head as the loop runs it under bf16 mixed precision on the CPU: float32 hidden and
    master weight, F.linear under autocast (bf16 logits), upcast to float32, then policy_logps."""
    hidden, weight = case.hidden.clone().requires_grad_(True), case.weight.clone().requires_grad_(train_head)
    bias = None if case.bias is None else case.bias.clone().requires_grad_(train_head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight, bias)
    assert logits.dtype == torch.bfloat16
    policy = policy_logps(logits.float(), case.labels, case.nll_labels)
    loss_of(policy, case.num_nll_tokens).backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": None if bias is None else bias.grad}
    return PolicyLogps(*(t.detach() for t in policy)), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [True, False])
def test_bf16_on_the_cpu_gives_the_autocast_heads_numbers(train_head: bool, bias: bool) -> None:
    """matmul_dtype=bf16 on the CPU: each chunk's logits come from a bf16 GEMM (bias included), rounded
    to bf16 as the unfused head's are under autocast; the log-sum-exp and log-probs are float32.

    Values, at the fused-vs-unfused tolerance (1e-5): both paths round the same bf16 products of the
    same bf16 operands (a GEMM computes each output row alone, so chunking does not change it); what
    is left is float32 summation order in the log-sum-exp and the per-sequence sums.
    Gradients: the logits' gradient is rounded to bf16 in both, and each GEMM's output too, but the
    reference rounds the whole weight (and bias) gradient to bf16 once, where the chunked head adds
    per-chunk bf16 products in float32. bf16 keeps 8 significant bits, so a rounding moves an entry
    by at most 2**-8 of itself; allowed: 2**-7 relative, plus 2**-7 of the tensor's largest entry
    for entries that are sums of cancelling chunk products. Measured: the hidden gradient is
    identical, the weight's within 0.3% of its largest entry."""
    case = Case(pairs=6, hidden_size=64, vocab=1000, nll_on_prompt=True, seed=29, bias=bias)
    case.hidden *= 3  # logits of a few units, where bf16's rounding is ~0.01
    want, want_grads = autocast_path(case, train_head)
    got, got_grads = run_path(case, fused=True, train_head=train_head, matmul_dtype=torch.bfloat16, chunk_size=8)
    assert got.chosen_logps.dtype == torch.float32
    assert_policy_close(got, want, rtol=1e-5, atol=1e-5)
    trained = ["hidden", "weight", "bias"][: (2 + bias) if train_head else 1]
    for name in trained:
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=2**-7, atol=2**-7 * scale)
    assert [name for name, grad in got_grads.items() if grad is not None] == trained

    unrounded, _ = run_path(case, fused=True, train_head=train_head, matmul_dtype=None)
    with pytest.raises(AssertionError):  # the check can fail: float32 logits are not within 1e-5
        assert_policy_close(unrounded, want, rtol=1e-5, atol=1e-5)


def test_fp16_operands_on_the_cpu_round_operands_not_logits() -> None:
    """matmul_dtype=fp16 on the CPU (no half GEMM with float32 output there, and fp16 logits could
    overflow): the logits are the float32 products of fp16-rounded operands."""
    case = Case(pairs=4, hidden_size=32, vocab=64, nll_on_prompt=False, seed=13, bias=False)
    got, got_grads = run_path(case, fused=True, train_head=True, matmul_dtype=torch.float16, chunk_size=8)
    rounded = Case(pairs=4, hidden_size=32, vocab=64, nll_on_prompt=False, seed=13, bias=False)
    rounded.hidden, rounded.weight = (t.half().float() for t in (case.hidden, case.weight))
    want, want_grads = run_path(rounded, fused=False, train_head=True)
    assert_policy_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads["hidden"].dtype == torch.float32  # the inputs' dtype
    for name in ("hidden", "weight"):  # the gradient of the logits is rounded to fp16 too
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=2e-2, atol=2e-3)


def test_bf16_head_casts_the_weight_once_per_pass_never_per_chunk() -> None:
    """Issue 20: the bf16 head on the CPU made a float32 copy of the [V, H] weight in every chunk's
    matmul, forward and backward. Now: one bf16 copy in forward, one in backward, no float32 one."""
    vocab, hidden_size = 300, 16
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, hidden_size, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen)  # frozen: no [V, H] gradient to confuse the count
    targets = torch.randint(0, vocab, (40,), generator=gen)
    with OpSizes() as sizes:
        chunked_token_logps(hidden, weight, targets, chunk_size=8, matmul_dtype=torch.bfloat16).sum().backward()
    weight_sized = [(op, dtype) for op, shape, dtype in sizes.outputs if sorted(shape) == [hidden_size, vocab]]
    copies = [dtype for op, dtype in weight_sized if "_to_copy" in op]
    assert copies == [torch.bfloat16, torch.bfloat16], weight_sized
    assert torch.float32 not in [dtype for _, dtype in weight_sized], weight_sized


def test_autocast_does_not_lower_the_logits_precision() -> None:
    case = Case(pairs=3, hidden_size=16, vocab=40, nll_on_prompt=False, seed=17)
    want, _ = run_path(case, fused=False, train_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = run_path(case, fused=True, train_head=True, chunk_size=6)
    assert_policy_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 4, 2, 2, 1, 3, 0])

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return chunked_token_logps(h, w, targets, b, chunk_size=3)

    assert fn(hidden, weight, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_gradcheck_policy_logps_from_hidden_float64() -> None:
    case = Case(pairs=2, hidden_size=3, vocab=7, nll_on_prompt=True, seed=19)
    hidden = case.hidden.double().requires_grad_(True)
    weight = case.weight.double().requires_grad_(True)

    def fn(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(policy_logps_from_hidden(h, w, case.labels, case.nll_labels, chunk_size=4))

    assert torch.autograd.gradcheck(fn, (hidden, weight))


# ---- 3. memory -----------------------------------------------------------------------------------


def test_no_positions_by_vocab_tensor_is_ever_allocated() -> None:
    """Every aten op's output during forward + backward is recorded; none reaches N x V elements
    (N = scored positions). The unfused path, recorded the same way, does: the check can fail."""
    case = Case(pairs=16, hidden_size=8, vocab=2000, nll_on_prompt=True, seed=23)
    scored = int((case.labels[:, 1:] != -100).sum() + (case.nll_labels[:, 1:] != -100).sum())
    chunk = 16

    def record(fused: bool) -> OpSizes:
        with OpSizes() as sizes:
            run_path(case, fused=fused, train_head=True, chunk_size=chunk)
        return sizes

    fused = record(fused=True)
    assert fused.largest() < scored * 2000 / 4, f"largest op output {fused.largest()} for N={scored}, V=2000"
    assert fused.largest() <= max(chunk * 2000, case.hidden.numel(), 2000 * 8)
    assert record(fused=False).largest() >= scored * 2000


def test_default_chunk_size_is_a_row_count_under_a_byte_cap() -> None:
    assert default_chunk_size(32_000) == 512
    assert default_chunk_size(128_256) == 512  # 263 MB of logits, under the 256 MiB cap
    assert default_chunk_size(256_000) == 256 * 2**20 // (4 * 256_000) == 262
    assert default_chunk_size(10**12) == 1


def profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU bytes allocated and not yet freed while fn runs, from the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def test_one_chunk_of_logits_is_alive_at_a_time() -> None:
    """Forward + backward hold one [chunk, V] float32 buffer at a time (logsumexp works in place; each
    chunk's buffer is freed before the next is made), besides the [V, H] weight gradient. Two buffers
    (what torch.logsumexp's temporary would add) break the bound."""
    n, h, v, chunk = 100, 8, 2000, 16
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    peak = profiled_peak_bytes(lambda: chunked_token_logps(hidden, weight, targets, chunk_size=chunk).sum().backward())
    buffer, grad_weight, small = chunk * v * 4, v * h * 4, 16 * n * (h + 8)
    assert buffer + grad_weight <= peak <= buffer + grad_weight + small, (peak, buffer)


# ---- 4. on a real model: how the loop gets hidden states and the head ----------------------------


def final_hidden(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The loop's recipe: the decoder's normed last hidden state, with no logits formed at all.

    Goes through the model's own forward (so PEFT, DDP and accelerate's autocast wrapper still apply).
    """
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
    assert out.logits.shape[1] == 0
    return out.hidden_states[-1]


def assert_fused_equals_unfused(
    model: torch.nn.Module, policy: Callable[[bool], PolicyLogps], num_nll_tokens: int
) -> None:
    """`policy(fused)` for fused False then True: the same loss and trainable gradients within 1e-5."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_of(policy(fused), num_nll_tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    want_loss, want_grads = run(fused=False)
    got_loss, got_grads = run(fused=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def tiny_model(lora: dict[str, Any] | None = None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation="sdpa")
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recipe_on_tiny_llama_and_peft(mode: str) -> None:
    model = tiny_model(None if mode == "full" else {"target_modules": ["q_proj", "v_proj"]})
    if mode == "lora":  # LoRA's B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    batch = PairCollator(PAD, nll_on_prompt=True)(random_pairs(4, 324, seed=29))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def policy(fused: bool) -> PolicyLogps:
        if fused:
            weight, bias = output_projection(model)
            return policy_logps_from_hidden(
                final_hidden(model, **inputs), weight, batch["labels"], batch["nll_labels"], bias, chunk_size=8
            )
        logits = model(**inputs, use_cache=False).logits
        return policy_logps(logits, batch["labels"], batch["nll_labels"])

    assert_fused_equals_unfused(model, policy, int(batch["num_nll_tokens"]))
    weight, _ = output_projection(model)
    assert weight.requires_grad == (mode == "full")  # LoRA: the frozen head gets no gradient


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: tiny_model({"target_modules": ["q_proj", "lm_head"]}), "LoRA on lm_head"),
        (lambda: tiny_model({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}), "modules_to_save"),
    ],
)
def test_output_projection_refuses_heads_it_cannot_reproduce(make: Callable[[], torch.nn.Module], problem: str) -> None:
    with pytest.raises(ValueError, match="plain nn.Linear"):
        output_projection(make())


def test_output_projection_refuses_softcapped_logits() -> None:
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        output_projection(model)


def test_output_projection_unwraps_ddp_style_module_attribute() -> None:
    model = tiny_model()
    wrapper = torch.nn.Module()
    wrapper.module = model
    weight, bias = output_projection(wrapper)
    assert weight is model.lm_head.weight and bias is None


def test_output_projection_refuses_a_zero3_partitioned_head() -> None:
    model = tiny_model()
    model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match="ZeRO-3"):
        output_projection(model)


# ---- 5. heads that must be called as modules (LoRA / modules_to_save on the head, ZeRO-3) ---------


def test_module_path_equals_the_matrix_path_for_a_plain_head() -> None:
    """module_token_logps (the head called chunk by chunk under checkpointing) gives the numbers and
    gradients (hidden, weight, bias) of chunked_token_logps."""
    gen = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, 300, bias=True)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (37,), generator=gen)
    coeffs = torch.randn(37, generator=gen)

    def grads(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        logps = fn()
        (logps * coeffs).sum().backward()
        return [logps.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]

    want = grads(lambda: chunked_token_logps(hidden, head.weight, targets, head.bias, chunk_size=8))
    got = grads(lambda: module_token_logps(head, hidden, targets, chunk_size=8))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert module_token_logps(head, hidden[:0], targets[:0]).shape == (0,)
    with warnings.catch_warnings():  # evaluation: plain calls, no checkpointing (it would warn)
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.testing.assert_close(module_token_logps(head, hidden, targets, chunk_size=8), want[0])


@pytest.mark.parametrize(
    "lora",
    [{"target_modules": ["q_proj", "lm_head"]}, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
    ids=["lora_on_lm_head", "modules_to_save"],
)
def test_heads_the_matrix_path_refuses_go_through_the_module(lora: dict[str, Any]) -> None:
    """A LoRA head or a trained copy of it: resolve_head picks the module path, which gives the
    unfused path's loss and gradients (the head's LoRA weights included)."""
    model = tiny_model(lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.05)
    head, note = resolve_head(load_config(None, ["chunked_head=true"]), model, "no")
    assert head is not None and head.weight is None and head.module is not None, note
    assert "calling the" in note and "chunk by chunk" in note
    batch = PairCollator(PAD, nll_on_prompt=True)(random_pairs(4, 324, seed=31))
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    policy = lambda fused: policy_forward(model, batch, head if fused else None)  # noqa: E731
    assert_fused_equals_unfused(model, policy, int(batch["num_nll_tokens"]))


def test_resolve_head_chooses_matrix_module_or_full_logits() -> None:
    cfg = load_config(None, ["chunked_head=true"])
    model = tiny_model()
    head, _ = resolve_head(cfg, model, "bf16")
    assert head.weight is model.lm_head.weight and head.module is None and head.matmul_dtype == torch.bfloat16
    model.lm_head.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    head, note = resolve_head(cfg, model, "no")
    assert head.weight is None and head.module is model.lm_head and "ZeRO-3-partitioned" in note
    model.lm_head.weight.requires_grad_(False)  # a frozen ZeRO-3 head (LoRA): read gathered
    head, note = resolve_head(load_config(None, ["head_chunk_size=64"]), model, "no")
    assert head.weight is model.lm_head.weight and head.gather is not None and head.chunk_size == 64, note
    lora_head = tiny_model({"target_modules": ["q_proj", "lm_head"]})
    for param in lora_head.base_model.model.lm_head.parameters():
        param.ds_id = 0
    head, note = resolve_head(cfg, lora_head, "no")
    assert head is None and note == "full logits: a partly frozen head under ZeRO-3 (e.g. LoRA on lm_head)"
    model.lm_head.weight.requires_grad_(True)
    model.config.final_logit_softcapping = 30.0
    head, note = resolve_head(cfg, model, "no")
    assert head is None and note.startswith("full logits: The model post-processes its logits")
    assert resolve_head(load_config(None, ["chunked_head=false"]), tiny_model(), "no") == (
        None,
        "full logits (chunked_head=false)",
    )
