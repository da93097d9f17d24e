"""Log-probs of the scored tokens straight from the LM head's input, without the [tokens, vocab] logits.

The unfused path (`model(...).logits` -> `orpo.loss.policy_logps`) holds float32 logits for every
position of the batch, [2B, T, V], plus their log-softmax and its gradient: for Mistral-7B (V=32,000)
and 16k tokens that is ~2 GB per copy. ORPO only needs log P(target) at the positions it scores, so:

  1. keep the decoder's last hidden states, [R, T, H], and gather only the positions whose next
     token is scored (response tokens; also the chosen prompts' with `nll_on_prompt`): [N, H];
  2. `chunked_token_logps`: per chunk of positions, logits = hidden @ W^T (+ b), upcast to float32,
     then log P(target) = logit[target] - logsumexp(logits). Backward recomputes each chunk's logits, so
     memory holds one chunk's [c, V] at a time, never [N, V]:

         d logp_i / d logits_i = onehot(target_i) - softmax(logits_i)
         grad_hidden_i = g_i * (onehot - softmax) @ W              [c, H]
         grad_W        = sum_i g_i * (onehot - softmax)^T @ hidden [V, H]   (skipped for a frozen head)

  3. sum those per sequence (padded rows, or segments of a packed row) into the same `PolicyLogps`
     as `orpo.loss.policy_logps`, so the two paths are interchangeable.

Valid only for models whose logits are exactly `lm_head(last_hidden_state)` (Llama, Mistral, Qwen2,
...; `head_module` refuses softcapped or scaled logits). A head whose weight cannot be read as a
plain matrix outside its forward (a LoRA or 4-bit head; under DeepSpeed ZeRO-3 every head, its
weight partitioned) goes through `module_token_logps` instead: the same chunks, each a call of the
head module under activation checkpointing.

Precision. The log-sum-exp, softmax and log-probs are float32 (float64 for float64 inputs) on every
path; `matmul_dtype` (the trainer's: `orpo.forward.head_matmul_dtype`) sets the GEMMs:

  - None: float32 operands and GEMMs; bf16/fp16 inputs give the float32 products of their values.
  - CUDA, bf16 or fp16: half operands into torch.mm(out_dtype=float32): tensor cores, float32
    accumulation, float32 logits (the exact products of the rounded operands).
  - the CPU, bf16: torch.mm(out_dtype=) has no CPU kernel (NotImplementedError). Each chunk's logits
    come from a bf16 GEMM (AMX / AVX512-BF16, float32 accumulation, the bias inside the GEMM) with
    bf16 output, as the unfused head's logits under bf16 autocast, then are upcast to float32
    for the log-sum-exp. The backward's GEMMs are bf16 too; the weight gradient is summed over chunks
    in float32. The weight is cast to bf16 once per forward and once per backward.
  - the CPU, fp16 (never the trainer's choice): fp16-rounded operands multiplied in float32, since
    fp16 logits could overflow.

Measured (`.venv/bin/python bench/head_bf16.py`, 2 shared cores with AMX, forward + backward,
float32 hidden states and master weight as under accelerate's bf16 autocast, median of 5
interleaved runs, ratio to the head before this choice, which converted the bf16 weight back to
float32 in every chunk's matmuls):

    case                               before   (a) convert once   (b) bf16 logits   float32   full logits
    SmolLM2-135M: V=49,152, H=576,     1.00     0.86               0.49              0.79      0.36
      N=1,600, head trained            515 MB   461 MB             376 MB            209 MB    1,256 MB
    the same, head frozen (LoRA)       1.00     0.78               0.39              0.65      0.41
                                       407 MB   353 MB             202 MB            101 MB    1,254 MB
    Mistral-7B: V=32,000, H=4,096,     1.00     0.90               0.32              0.72      0.28
      N=512, head trained              1.43 GB  1.08 GB            1.04 GB           0.57 GB   0.76 GB

(peak memory beyond the inputs, from torch.profiler). (a) rounds the operands to bf16 and multiplies
them in float32, the weight converted once per pass: the old numbers, at float32 GEMM speed plus the
conversions, slower than plain float32. (b) is what runs. "full logits" is the unfused head under
autocast: somewhat faster (no recompute in backward, no per-chunk weight-gradient sum), at [N, V]
memory, which the chunks exist to avoid once N is large (SmolLM2's row; at Mistral's N=512 the
[V, H] bf16 copies and products dominate instead).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint

from orpo.collator import IGNORE_INDEX, SharedTargets
from orpo.loss import PolicyLogps, token_logps

# One chunk's float32 logits take chunk x V x 4 bytes; forward and backward each hold one such buffer.
# More rows than CHUNK_POSITIONS buy no speed (the [rows, H] @ [H, V] matmul already runs at full rate:
# bench/RESULTS.md), so a chunk holds that many, or fewer where they would exceed MAX_CHUNK_BYTES.
CHUNK_POSITIONS = 512
MAX_CHUNK_BYTES = 256 * 2**20
_HALF = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab_size: int, positions: int = CHUNK_POSITIONS, max_bytes: int = MAX_CHUNK_BYTES) -> int:
    """`positions`, or fewer where their float32 logits would exceed `max_bytes` (512 for V=32,000
    and V=128,256: 65 MB and 263 MB; 262 for V=256,000)."""
    return max(1, min(positions, max_bytes // (4 * vocab_size)))


# ---- the chunked head ----------------------------------------------------------------------------


class _Precision(NamedTuple):
    operand: torch.dtype  # the matmuls' inputs are rounded to this
    compute: torch.dtype  # and held in this for the GEMM: `operand`, or `out` where no half GEMM fits
    product: torch.dtype  # the GEMM's output: `out`, except bf16 for bf16 GEMMs on the CPU
    out: torch.dtype  # logits, softmax and the accumulated weight gradient: float32 (float64 for float64 inputs)


def _precision(hidden: torch.Tensor, weight: torch.Tensor, matmul_dtype: torch.dtype | None) -> _Precision:
    out = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    operand = matmul_dtype or out
    if operand == out or hidden.is_cuda:  # float32 GEMMs, or half ones with float32 output (mm out_dtype)
        return _Precision(operand, operand, out, out)
    if operand == torch.bfloat16:  # the CPU: no mm(out_dtype=) kernel; a bf16 GEMM writes bf16
        return _Precision(operand, operand, operand, out)
    # fp16 on the CPU (not a mixed-precision default: orpo.forward.head_matmul_dtype): fp16 logits
    # could overflow, so the rounded operands are held and multiplied in float32.
    return _Precision(operand, out, out, out)


def _operand(x: torch.Tensor, p: _Precision) -> torch.Tensor:
    """x rounded to p.operand, held in p.compute (no copy when it is already there)."""
    return x.to(p.operand).to(p.compute)


def _matmul(a: torch.Tensor, b: torch.Tensor, p: _Precision) -> torch.Tensor:
    """a @ b for operands in p.compute, in p.product.

    CUDA, half operands: one tensor-core GEMM accumulating in float32 with float32 output, the exact
    products of the rounded operands. The CPU, bf16 operands: a bf16 GEMM (AMX / AVX512-BF16,
    float32 accumulation) whose output is rounded to bf16, as the unfused head's is under autocast;
    callers upcast it as they read it."""
    if p.compute == p.product:
        return a @ b
    return torch.mm(a, b, out_dtype=p.product)


def _chunk_logits(
    hidden: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, p: _Precision
) -> torch.Tensor:
    """hidden [c, H] and weight_t [H, V] in p.compute, bias [V] in p.product -> [c, V] logits in p.out."""
    if bias is not None and p.product != p.out:  # bf16 on the CPU: the bias joins the GEMM, as under autocast
        return torch.addmm(bias, hidden, weight_t).to(p.out)
    logits = _matmul(hidden, weight_t, p).to(p.out)
    return logits if bias is None else logits.add_(bias)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logits, -1) by the same steps, but overwriting `logits` with exp(logits - max):
    torch.logsumexp allocates another [c, V] buffer for exp(logits - max)."""
    maxes = logits.amax(dim=-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)  # as torch.logsumexp: rows of -inf give -inf, not NaN
    return logits.sub_(maxes).exp_().sum(-1).log_().add_(maxes.squeeze(-1))


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        matmul_dtype: torch.dtype | None,
        gather: Callable[[], AbstractContextManager] | None,
    ) -> torch.Tensor:
        ctx.gather = gather or nullcontext
        with ctx.gather():  # a ZeRO-3 head's weight is whole only inside
            p = _precision(hidden, weight, matmul_dtype)
            weight_t = _operand(weight, p).t()  # one cast copy [V, H] per forward at most, never [N, V]
            bias_op = None if bias is None else bias.to(p.product)
            logps = torch.empty(hidden.shape[0], dtype=p.out, device=hidden.device)
            lse = torch.empty_like(logps)
            with torch.autocast(hidden.device.type, enabled=False):  # keep autocast from casting to bf16
                for start in range(0, hidden.shape[0], chunk_size):
                    end = start + chunk_size
                    logits = _chunk_logits(_operand(hidden[start:end], p), weight_t, bias_op, p)
                    target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
                    lse[start:end] = _logsumexp_(logits)  # one [c, V] buffer: logits, then overwritten in place
                    logps[start:end] = target_logits - lse[start:end]
                    del logits  # free this chunk's buffer before the next one is allocated
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.chunk_size, ctx.precision = chunk_size, p
            return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with ctx.gather():
            return _ChunkedTokenLogps._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        p: _Precision = ctx.precision
        w = _operand(weight, p)  # one cast copy per backward
        bias_op = None if bias is None else bias.to(p.product)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # the first chunk's product, then the sum: no zero-filled [V, H] to add to
        grad_bias = torch.zeros(bias.shape, dtype=p.out, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h = _operand(hidden[start:end], p)
                g = grad_logps[start:end].to(p.out)[:, None]
                # d logp / d logits = onehot(target) - softmax, scaled by g; built in place in the logits buffer.
                dlogits = _chunk_logits(h, w.t(), bias_op, p).sub_(lse[start:end, None]).exp_().mul_(-g)
                dlogits.scatter_add_(1, targets[start:end, None], g)
                if need_bias:
                    grad_bias += dlogits.sum(0)
                dlogits = _operand(dlogits, p)  # the logits' gradient, rounded as autocast's backward rounds it
                if need_hidden:
                    grad_hidden[start:end] = _matmul(dlogits, w, p)  # cast to hidden's dtype as it is copied
                if need_weight and grad_weight is None:
                    grad_weight = _matmul(dlogits.t(), h, p).to(p.out)
                elif need_weight and p.compute == p.out:
                    grad_weight.addmm_(dlogits.t(), h)  # accumulate in place, no [V, H] temporary
                elif need_weight:
                    grad_weight += _matmul(dlogits.t(), h, p)  # a bf16 product is upcast as it is added
                del dlogits  # free this chunk's buffer before the next one is allocated
        if need_weight and grad_weight is None:  # no positions
            grad_weight = torch.zeros(weight.shape, dtype=p.out, device=weight.device)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def whole_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's shape, or a ZeRO-3-partitioned weight's whole shape (its local tensor is a shard)."""
    return getattr(weight, "ds_shape", weight.shape)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    gather: Callable[[], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """log P(targets[i] | hidden[i]) = log_softmax(hidden[i] @ weight^T + bias)[targets[i]], chunk by chunk.

    Args:
        hidden: [N, H] the LM head's input at the scored positions (any float dtype).
        weight: [V, H] the LM head's weight; no gradient is computed for it when it does not require one.
        targets: [N] token ids in [0, V).
        bias: optional [V].
        chunk_size: positions per chunk; default `default_chunk_size(V)`.
        matmul_dtype: None (default) computes the logits from float32 copies of the operands, so
            bf16/fp16 inputs give exactly the float32 products of their values. torch.bfloat16 (or
            fp16) casts the operands, and the gradient of the logits on the way back, to it, with
            float32 accumulation: on CUDA float32 logits (mm out_dtype); on the CPU, bf16 logits
            as the unfused head's under autocast (see "Precision" in the module docstring).
        gather: a context in which weight and bias are whole (DeepSpeed ZeRO-3's GatheredParameters
            for a frozen, partitioned head); forward and backward each run inside one.

    Returns [N] log-probs in float32 (float64 for float64 inputs). Peak extra memory is one [chunk, V]
    float32 buffer (plus its cast copy with `matmul_dtype`), the [V, H] weight gradient, and one [V, H]
    copy of the weight when it must be cast (on the CPU under bf16, also each chunk's bf16 [V, H]
    weight-gradient product while it is added).
    """
    shape = whole_shape(weight)
    if hidden.dim() != 2 or len(shape) != 2 or hidden.shape[1] != shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H] with the same H; got {tuple(hidden.shape)} and {tuple(shape)}."
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}]; got {tuple(targets.shape)}.")
    chunk = chunk_size or default_chunk_size(shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets.long(), chunk, matmul_dtype, gather)


def _module_chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # autograd runs through this one: no in-place log-sum-exp
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def module_token_logps(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`chunked_token_logps` for a head that must be called as a module: one whose weight is whole only
    inside its own forward (DeepSpeed ZeRO-3 gathers it there), a LoRA or modules_to_save head, a
    4-bit head. Each chunk calls the module under activation checkpointing, so its logits are freed
    after the forward and recomputed in backward by calling the module again (which gathers a ZeRO-3
    weight again; dropout draws the same mask); the head's own autograd gives its gradients, in one
    backward graph, so a parameter's gradient hook (DDP's, DeepSpeed's) fires once however many
    chunks used it (the reentrant variant runs a backward per chunk: DeepSpeed ZeRO-3 then fails on
    the second). A frozen ZeRO-3 head fails the non-reentrant recompute check: it goes through
    `chunked_token_logps` with `gather` instead. Without gradients (evaluation) the chunks are plain
    calls. Peak extra memory: one
    chunk's logits and their log-sum-exp temporaries. `matmul_dtype` runs the module under autocast
    to it (the chunks run outside the model's forward, so outside the autocast that mixed precision
    wraps it in). LoRA dropout on the head draws per chunk, not once per batch as full logits do."""
    vocab = getattr(head, "out_features", None) or whole_shape(head.weight)[0]  # a 4-bit weight is packed
    chunk = chunk_size or default_chunk_size(vocab)
    autocast = torch.autocast(hidden.device.type, dtype=matmul_dtype, enabled=matmul_dtype is not None)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    calls = _calls_on_every_rank(head, -(-hidden.shape[0] // chunk), hidden.device)
    pieces = []
    with autocast:
        for call in range(calls):
            # Past this rank's positions the slices are empty: a call with no rows still gathers a
            # ZeRO-3 weight (a collective every rank must join), forward and, through cat, backward.
            args = (head, hidden[call * chunk : (call + 1) * chunk], targets[call * chunk : (call + 1) * chunk])
            if recompute:
                pieces.append(torch.utils.checkpoint.checkpoint(_module_chunk_logps, *args, use_reentrant=False))
            else:
                pieces.append(_module_chunk_logps(*args))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _calls_on_every_rank(head: torch.nn.Module, calls: int, device: torch.device) -> int:
    """How many times to call the head: this rank's chunk count, or under DeepSpeed ZeRO-3 (where
    every call gathers the weight, collectively) the largest count of any rank."""
    if not any(hasattr(p, "ds_id") for p in head.parameters()) or not torch.distributed.is_initialized():
        return calls
    count = torch.tensor([calls], device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


# ---- which positions are scored ------------------------------------------------------------------


class _Scored(NamedTuple):
    """The positions a micro-batch scores, response tokens first, then L_SFT-only ones (chosen prompts)."""

    positions: torch.Tensor  # [N] flat index into the [R * T] positions of hidden states or logits
    targets: torch.Tensor  # [N] the token each position predicts
    sequence: torch.Tensor  # [num_response] which sequence (chosen 0..B-1, then rejected) each response token is in
    response_in_nll: torch.Tensor  # [num_response] bool: this response token also counts in L_SFT
    num_response: int


def _scored_positions(labels: torch.Tensor, nll_labels: torch.Tensor, sequence_of_token: torch.Tensor) -> _Scored:
    """labels, nll_labels, sequence_of_token: [R, T]; position t predicts token t+1 of its row."""
    width = labels.shape[1]
    targets, nll_targets = labels[:, 1:], nll_labels[:, 1:]
    response = targets != IGNORE_INDEX
    nll = nll_targets != IGNORE_INDEX
    shared = response & nll & (targets == nll_targets)  # scored once, counted in both terms
    extra = nll & ~shared
    resp_row, resp_t = response.nonzero(as_tuple=True)
    extra_row, extra_t = extra.nonzero(as_tuple=True)
    return _Scored(
        positions=torch.cat([resp_row * width + resp_t, extra_row * width + extra_t]),
        targets=torch.cat([targets[resp_row, resp_t], nll_targets[extra_row, extra_t]]),
        sequence=sequence_of_token[resp_row, resp_t + 1],
        response_in_nll=shared[resp_row, resp_t],
        num_response=int(resp_row.numel()),
    )


def _layout(labels: torch.Tensor, nll_labels: torch.Tensor, seq_lens: torch.Tensor | None) -> tuple[_Scored, int, int]:
    """(scored positions, pairs, sequences) of a padded batch (seq_lens None) or a packed row."""
    if seq_lens is None:  # padded: row r is sequence r; nll_labels covers the B chosen rows
        rows, pairs = labels.shape[0], nll_labels.shape[0]
        if nll_labels.shape[1] != labels.shape[1] or rows != 2 * pairs:
            raise ValueError(
                f"padded layout: labels must be [2B, T] and nll_labels [B, T]; got {tuple(labels.shape)} and "
                f"{tuple(nll_labels.shape)}."
            )
        nll_full = torch.cat([nll_labels, torch.full_like(nll_labels, IGNORE_INDEX)])
        sequence = torch.arange(rows, device=labels.device)[:, None].expand_as(labels)
        return _scored_positions(labels, nll_full, sequence), pairs, rows
    if labels.shape[0] != 1 or nll_labels.shape != labels.shape or int(seq_lens.sum()) != labels.shape[1]:
        raise ValueError(
            f"packed layout: labels and nll_labels must be [1, L] with L = sum(seq_lens) = {int(seq_lens.sum())}; "
            f"got {tuple(labels.shape)} and {tuple(nll_labels.shape)}."
        )
    count = seq_lens.numel()
    sequence = torch.repeat_interleave(torch.arange(count, device=labels.device), seq_lens.to(labels.device))
    return _scored_positions(labels, nll_labels, sequence[None]), count // 2, count


def _shared_layout(shared: SharedTargets) -> tuple[_Scored, int, int]:
    """A SharedPairCollator batch lists its scored positions itself (a position can predict a token
    of each sequence, which one label per position cannot say): response entries first, as _Scored."""
    n = shared.num_response
    scored = _Scored(shared.positions, shared.targets, shared.sequence[:n], shared.in_nll[:n], n)
    return scored, shared.pairs, 2 * shared.pairs


def _policy_from_token_logps(scored: _Scored, logps: torch.Tensor, pairs: int, sequences: int) -> PolicyLogps:
    response = logps[: scored.num_response]
    sums = torch.zeros(sequences, dtype=logps.dtype, device=logps.device).index_add(0, scored.sequence, response)
    counts = torch.bincount(scored.sequence, minlength=sequences).clamp(min=1)
    means = sums / counts
    nll_sum = -(torch.where(scored.response_in_nll, response, 0).sum() + logps[scored.num_response :].sum())
    return PolicyLogps(means[:pairs], means[pairs:], nll_sum)


# ---- the two entry points ------------------------------------------------------------------------


def policy_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    nll_labels: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    module: torch.nn.Module | None = None,
    gather: Callable[[], AbstractContextManager] | None = None,
    shared: SharedTargets | None = None,
) -> PolicyLogps:
    """`orpo.loss.policy_logps` from the last hidden states and the LM head, never forming full logits.

    Padded batch (PairCollator, seq_lens None): hidden [2B, T, H], labels [2B, T], nll_labels [B, T].
    Packed row (PackedPairCollator): hidden [1, L, H], labels and nll_labels [1, L], seq_lens [2B].
    In both, chosen sequences come first, position t's hidden state predicts token t+1, and -100
    marks a target that is not scored. weight [V, H] and bias [V] are the LM head's (`output_projection`);
    or, with weight None, `module` is the head, called chunk by chunk (`module_token_logps`); `gather`:
    see `chunked_token_logps`.
    Prefix-shared rows (SharedPairCollator): hidden [R, T, H], labels and nll_labels None, `shared`
    (SharedTargets.of_batch) names the scored positions.
    """
    scored, pairs, sequences = _shared_layout(shared) if shared is not None else _layout(labels, nll_labels, seq_lens)
    picked = hidden.reshape(-1, hidden.shape[-1])[scored.positions]
    if weight is None:
        logps = module_token_logps(module, picked, scored.targets, chunk_size, matmul_dtype)
    else:
        logps = chunked_token_logps(picked, weight, scored.targets, bias, chunk_size, matmul_dtype, gather)
    return _policy_from_token_logps(scored, logps, pairs, sequences)


def packed_policy_logps(
    logits: torch.Tensor, labels: torch.Tensor, nll_labels: torch.Tensor, seq_lens: torch.Tensor
) -> PolicyLogps:
    """`orpo.loss.policy_logps` for a packed row from full logits [1, L, V] (the unfused packed path)."""
    return _policy_from_logits(logits, *_layout(labels, nll_labels, seq_lens))


def shared_policy_logps(logits: torch.Tensor, shared: SharedTargets) -> PolicyLogps:
    """`orpo.loss.policy_logps` for prefix-shared rows from full logits [R, T, V] (the unfused path)."""
    return _policy_from_logits(logits, *_shared_layout(shared))


def _policy_from_logits(logits: torch.Tensor, scored: _Scored, pairs: int, sequences: int) -> PolicyLogps:
    picked = logits.reshape(-1, logits.shape[-1])[scored.positions]
    return _policy_from_token_logps(scored, token_logps(picked, scored.targets), pairs, sequences)


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head of a HF causal LM, a PeftModel, or either wrapped by DDP or DeepSpeed, when the
    model's logits are exactly the head's output; refuses models that post-process their logits."""
    while hasattr(model, "module"):  # DistributedDataParallel, DeepSpeedEngine
        model = model.module
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"The model post-processes its logits ({name}={value}); the chunked head computes the head's "
                "output only. Use the unfused path (full logits)."
            )
    return model.get_output_embeddings()


def output_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of a causal LM's head (`head_module`) when the logits are
    `hidden @ W^T + b` with a weight readable outside the head's forward; else ValueError (such a
    head can still go through `module_token_logps`).
    """
    head = head_module(model)
    if type(head) is not torch.nn.Linear or getattr(head.weight, "quant_state", None) is not None:
        raise ValueError(
            f"The chunked log-prob head needs a plain nn.Linear LM head; this model's is {type(head).__name__} "
            "(LoRA on lm_head, modules_to_save or a quantised head). Call the module instead (module_token_logps)."
        )
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: outside the head's own forward the weight is a shard
        raise ValueError(
            "The LM head's weight is partitioned by DeepSpeed ZeRO-3; the chunked log-prob head reads it outside "
            "the module's forward. Call the module instead (module_token_logps)."
        )
    return head.weight, head.bias
