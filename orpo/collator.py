"""Pads a micro-batch of pairs into one forward: chosen rows first, then rejected rows.

For B pairs the batch has 2B rows, padded on the right to the longest sequence of the micro-batch
(optionally rounded up to a multiple, for tensor cores), never to `max_length`:

    input_ids       [2B, T]  pad_token_id after each sequence
    attention_mask  [2B, T]  1 on real tokens
    labels          [2B, T]  token ids on response tokens, -100 on prompt and padding
    nll_labels      [B, T]   the chosen rows' targets for L_SFT: = labels[:B], plus the prompt's
                             tokens (after the first) when `nll_on_prompt`

Labels mark positions, never token ids, so a pad token equal to EOS cannot hide EOS from the loss.
The counts the global-batch normalisation needs are computed here, before the forward pass.

PackedPairCollator lays the same 2B sequences end to end in one row with no padding at all
(padding-free training; see its docstring). SharedPairCollator puts each pair in one sequence,
[shared prefix, chosen rest, rejected rest], so the prompt runs through the model once (prefix
sharing; see its docstring), padded (one pair a row) or packed (every pair in one row).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100


class PairCollator:
    def __init__(self, pad_token_id: int, nll_on_prompt: bool = False, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.nll_on_prompt = nll_on_prompt
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        prompt_lens = [e["chosen_prompt_len"] for e in examples] + [e["rejected_prompt_len"] for e in examples]
        width = max(len(s) for s in seqs)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for row, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
            ids = torch.as_tensor(seq, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, plen : len(ids)] = ids[plen:]
        pairs = len(examples)
        nll_labels = labels[:pairs].clone()
        if self.nll_on_prompt:
            # Every chosen token but the first (nothing predicts it) is a target.
            nll_labels = torch.where(attention_mask[:pairs].bool(), input_ids[:pairs], IGNORE_INDEX)
            nll_labels[:, 0] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "nll_labels": nll_labels,
            "num_pairs": torch.tensor(pairs),
            "num_nll_tokens": (nll_labels != IGNORE_INDEX).sum(),
            "num_tokens": attention_mask.sum(),
            "row_index": torch.tensor([e["row_index"] for e in examples]),
        }


class PackedPairCollator:
    """All 2B sequences of a micro-batch in one row with no padding: chosen sequences first, then rejected.

        input_ids     [1, L]   the sequences back to back, L = total real tokens
        position_ids  [1, L]   0, 1, ... restarting at each sequence
        labels        [1, L]   token ids on response tokens; -100 on prompts and on each sequence's first
                               token, so no position predicts across a boundary
        nll_labels    [1, L]   L_SFT targets: = labels on the chosen sequences (plus every chosen token
                               but each sequence's first when `nll_on_prompt`), -100 on the rejected ones
        seq_lens      [2B]     length of each sequence; cu_seqlens [2B + 1] (int32) their offsets
        max_seqlen    int      the longest sequence, a Python int (flash-attention's varlen kernel
                               takes it on the host; a tensor would cost a device sync per layer)

    There is deliberately no attention_mask. Call the model with `position_ids` and `use_cache=False`:
    transformers then builds a block-diagonal causal mask from the restarts of `position_ids` (sdpa,
    eager, flex). flash_attention_2 runs varlen attention; given `cu_seq_lens_q/k` and
    `max_length_q/k` (orpo.forward.varlen_kwargs passes cu_seqlens and max_seqlen) it takes them as they
    are, otherwise it infers them from `position_ids` in every layer, with a device sync each time.
    With a KV cache or an attention mask it does not, and the sequences would attend to each other.
    sdpa materialises an [L, L] mask and computes attention over all L^2 pairs; packing pays off with
    flash_attention_2.

    The count keys are PairCollator's: num_pairs, num_nll_tokens, num_tokens (= L), row_index.
    Turn the model's output into PolicyLogps with orpo.logprobs.packed_policy_logps (logits) or
    orpo.logprobs.policy_logps_from_hidden(..., seq_lens=batch["seq_lens"]) (hidden states).
    """

    def __init__(self, nll_on_prompt: bool = False) -> None:
        self.nll_on_prompt = nll_on_prompt

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor | int]:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        prompt_lens = [e["chosen_prompt_len"] for e in examples] + [e["rejected_prompt_len"] for e in examples]
        pairs = len(examples)
        input_ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])
        seq_lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
        starts = cu_seqlens[:-1].long()
        position_ids = torch.arange(len(input_ids)) - torch.repeat_interleave(starts, seq_lens)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        nll_labels = torch.full_like(input_ids, IGNORE_INDEX)
        for k, (start, length, plen) in enumerate(zip(starts.tolist(), seq_lens.tolist(), prompt_lens, strict=True)):
            first_scored = start + max(plen, 1)  # the first token has no predecessor in its sequence
            labels[first_scored : start + length] = input_ids[first_scored : start + length]
            if k < pairs:
                nll_from = start + 1 if self.nll_on_prompt else first_scored
                nll_labels[nll_from : start + length] = input_ids[nll_from : start + length]
        return {
            "input_ids": input_ids[None],
            "position_ids": position_ids[None],
            "labels": labels[None],
            "nll_labels": nll_labels[None],
            "seq_lens": seq_lens,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(seq_lens.max()),
            "num_pairs": torch.tensor(pairs),
            "num_nll_tokens": (nll_labels != IGNORE_INDEX).sum(),
            "num_tokens": torch.tensor(len(input_ids)),
            "row_index": torch.tensor([e["row_index"] for e in examples]),
        }


# ---- prefix sharing ------------------------------------------------------------------------------

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # what each token of a shared row is (`branch`)


def shared_prefix_len(chosen: np.ndarray | list[int], rejected: np.ndarray | list[int]) -> int:
    """S: the longest common token prefix of the two sequences, capped so that each keeps at least
    one token after it (S <= min(len) - 1), so both rests are non-empty and the rows stay simple.

    Not capped at the prompt: the causal hidden states of identical prefixes are identical whatever
    the labels say, so sharing tokens past the prompt (responses that begin alike) is just as exact
    and saves more. Nor does it assume chosen_prompt_len == rejected_prompt_len: a chat template can
    merge tokens at the prompt/response boundary differently on the two sides (orpo/data.py), and S
    then simply ends where the token sequences part."""
    limit = min(len(chosen), len(rejected)) - 1
    if limit <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(chosen[:limit]) != np.asarray(rejected[:limit]))
    return int(differ[0]) if len(differ) else limit


def computed_tokens(chosen: np.ndarray | list[int], rejected: np.ndarray | list[int]) -> int:
    """Tokens a pair puts through the model with prefix sharing: both sequences, less the shared prefix."""
    return len(chosen) + len(rejected) - shared_prefix_len(chosen, rejected)


def mean_computed_tokens(data: Any, most: int = 20_000) -> float:
    """Mean tokens a pair of `data` (a PreferenceSplit) puts through the model with prefix sharing,
    over at most `most` pairs spread evenly over it (the plan's estimate)."""
    picked = range(0, len(data), max(1, -(-len(data) // most)))
    counts = [computed_tokens(data.sequence(2 * i), data.sequence(2 * i + 1)) for i in picked]
    return float(np.mean(counts)) if counts else 0.0


class SharedTargets(NamedTuple):
    """The scored tokens of a SharedPairCollator batch, as orpo.logprobs gathers them: entry n says
    that the hidden state at flat position `positions[n]` (row * T + t) predicts `targets[n]`. The
    first `num_response` entries are response tokens of sequence `sequence[n]` (chosen of pair i:
    i, rejected: B + i), `in_nll[n]` when L_SFT counts it too (the chosen ones); the rest are
    L_SFT-only (the chosen prompts' with `nll_on_prompt`). A position can appear twice: the last one
    before the two rests predicts the first token of each, and a prefix that runs into the responses
    predicts the same token for both sequences. As a multiset of (target, sequence, in_nll) the
    entries are exactly what the unshared layouts score."""

    positions: torch.Tensor  # [N] long
    targets: torch.Tensor  # [N] long
    sequence: torch.Tensor  # [N] long, -1 on the L_SFT-only entries
    in_nll: torch.Tensor  # [N] bool
    num_response: int
    pairs: int

    @classmethod
    def of_batch(cls, batch: dict[str, Any]) -> SharedTargets:
        return cls(
            batch["score_positions"],
            batch["score_targets"],
            batch["score_sequence"],
            batch["score_in_nll"],
            int(batch["score_num_response"]),  # a Python int: no device sync
            batch["row_index"].shape[0],
        )


class _Block(NamedTuple):
    """One pair as one sequence, and its scored entries at positions local to the sequence."""

    ids: torch.Tensor
    positions: torch.Tensor
    branch: torch.Tensor
    response: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # position, target, sequence, in_nll
    nll_only: tuple[torch.Tensor, torch.Tensor]  # position, target


class SharedPairCollator:
    """Each pair as ONE sequence [shared prefix, chosen rest, rejected rest] (prefix sharing).

    For a pair with chosen c, rejected r and shared prefix S = shared_prefix_len(c, r), the sequence is
    c[0:S] + c[S:] + r[S:], with position ids 0..S-1, S..len(c)-1, S..len(r)-1: the rejected rest takes
    the positions it has in r. The attention mask (shared_attention_mask) is causal within the pair
    except that rejected-rest tokens never see chosen-rest ones; so every hidden state equals the one
    the same token has in the unshared forward of its own sequence, and the prompt's forward and
    backward run once instead of twice.

        input_ids      [R, T]  padded: R = B, one pair a row, padded on the right to the longest
                               (rounded up to `pad_to_multiple_of`); packed: R = 1, the pairs end to
                               end, T = the computed tokens (no padding)
        position_ids   [R, T]  as above; 0 on padding
        block_ids      [R, T]  which pair of the micro-batch each token belongs to; -1 on padding
        branch         [R, T]  PREFIX, CHOSEN, REJECTED or PAD
        score_*        the scored tokens (SharedTargets); score_num_response a Python int

    The count keys are PairCollator's and mean the same: num_pairs, num_nll_tokens, and num_tokens =
    the real tokens of the pairs' sequences as the unshared path runs them (len(c) + len(r) a pair),
    so `tokens_per_s` keeps TRL's meaning (real, non-pad tokens of the pairs) and compares with runs
    without sharing. num_computed_tokens is what actually goes through the model (len(c) + len(r) - S).
    """

    def __init__(
        self, pad_token_id: int, nll_on_prompt: bool = False, pad_to_multiple_of: int = 1, packed: bool = False
    ) -> None:
        self.pad_token_id = pad_token_id
        self.nll_on_prompt = nll_on_prompt
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed

    def block(self, example: dict[str, Any], index: int, pairs: int) -> _Block:
        """Pair `index` of `pairs` as one sequence. Token j of a sequence is predicted by position j - 1
        of the same sequence; for the rejected sequence that position is in the prefix (j - 1 < S) or
        in the rejected rest."""
        c = torch.as_tensor(example["chosen_ids"], dtype=torch.long)
        r = torch.as_tensor(example["rejected_ids"], dtype=torch.long)
        shared = shared_prefix_len(example["chosen_ids"], example["rejected_ids"])
        lc, lr = len(c), len(r)
        rejected_at = torch.cat([torch.arange(shared), torch.arange(lc, lc + lr - shared)])  # r's token j is here
        first_c, first_r = max(example["chosen_prompt_len"], 1), max(example["rejected_prompt_len"], 1)
        tc, tr = torch.arange(first_c, lc), torch.arange(first_r, lr)
        nll = torch.arange(1, first_c) if self.nll_on_prompt else torch.arange(0)
        return _Block(
            ids=torch.cat([c, r[shared:]]),
            positions=torch.cat([torch.arange(lc), torch.arange(shared, lr)]),
            branch=torch.repeat_interleave(
                torch.tensor([PREFIX, CHOSEN, REJECTED]), torch.tensor([shared, lc - shared, lr - shared])
            ),
            response=(
                torch.cat([tc - 1, rejected_at[tr - 1]]),
                torch.cat([c[tc], r[tr]]),
                torch.cat([torch.full((len(tc),), index), torch.full((len(tr),), pairs + index)]),
                torch.cat([torch.ones(len(tc), dtype=torch.bool), torch.zeros(len(tr), dtype=torch.bool)]),
            ),
            nll_only=(nll - 1, c[nll]),
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor | int]:
        pairs = len(examples)
        blocks = [self.block(e, i, pairs) for i, e in enumerate(examples)]
        rows = [list(range(pairs))] if self.packed else [[i] for i in range(pairs)]
        width = max(sum(len(blocks[i].ids) for i in row) for row in rows)
        if not self.packed:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        block_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        branch = torch.full((len(rows), width), PAD, dtype=torch.long)
        response, nll_only = [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                b, end = blocks[i], start + len(blocks[i].ids)
                input_ids[r, start:end], position_ids[r, start:end], branch[r, start:end] = b.ids, b.positions, b.branch
                block_ids[r, start:end] = i
                offset = r * width + start
                response.append((b.response[0] + offset, *b.response[1:]))
                nll_only.append((b.nll_only[0] + offset, b.nll_only[1]))
                start = end
        positions, targets, sequence, in_nll = (torch.cat(parts) for parts in zip(*response, strict=True))
        extra_positions, extra_targets = (torch.cat(parts) for parts in zip(*nll_only, strict=True))
        represented = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "block_ids": block_ids,
            "branch": branch,
            "score_positions": torch.cat([positions, extra_positions]),
            "score_targets": torch.cat([targets, extra_targets]),
            "score_sequence": torch.cat([sequence, torch.full_like(extra_targets, -1)]),
            "score_in_nll": torch.cat([in_nll, torch.ones_like(extra_targets, dtype=torch.bool)]),
            "score_num_response": len(positions),
            "num_pairs": torch.tensor(pairs),
            "num_nll_tokens": in_nll.sum() + len(extra_targets),
            "num_tokens": torch.tensor(represented),
            "num_computed_tokens": torch.tensor(sum(len(b.ids) for b in blocks)),
            "row_index": torch.tensor([e["row_index"] for e in examples]),
        }


# Attention implementations that take shared_attention_mask's 4D mask as it is. What transformers
# 5.24 does with a 4D attention_mask (read in its source):
#   - masking_utils.create_causal_mask -> _preprocess_mask_arguments: a tensor (or BlockMask) with 4
#     dims is returned as is, first thing, for every attn_implementation: no causal mask, no padding
#     mask, no packed-sequence detection from position_ids is added. The mask must be the whole
#     truth: causal, padding and the rejected-cannot-see-chosen rule.
#   - Llama (and the other decoders built the same way) calls create_causal_mask once per forward
#     and passes that one tensor to every layer. Under gradient checkpointing
#     (modeling_layers.GradientCheckpointingLayer, non-reentrant) each layer's recompute gets the
#     same tensor again: nothing about it is recomputed or stored per layer.
#   - sdpa (integrations/sdpa_attention.py) passes it to F.scaled_dot_product_attention as attn_mask,
#     [R, 1, T, T] broadcasting over heads; a bool mask means True = attend, a float one is added to
#     the scores. With a mask, is_causal is False, and grouped-query heads go through repeat_kv
#     (enable_gqa needs no mask). We give it bool.
#   - eager (modeling_llama.eager_attention_forward) ADDS the mask to the scores: it must be additive
#     float (0 to attend, a large negative number not to); a bool would be added as 0/1.
#   - flex_attention takes a 4D tensor as an additive score_mod over every (q, k) pair, dense, and a
#     BlockMask (which would skip the masked blocks) must be built for it: not done here, refused.
#   - flash_attention_2/3 read attention_mask as a 2D padding mask (_upad_input) and cannot express
#     "rejected does not see chosen" at all: refused. The GPU path still owed for them is two varlen
#     calls per layer, [prefix, chosen] causal and the rejected rest against [prefix, rejected rest],
#     merged through their log-sum-exp (or a FlexAttention BlockMask).
SHARED_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def shared_attention_mask(
    block_ids: torch.Tensor, branch: torch.Tensor, implementation: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The [R, 1, T, T] attention mask of a SharedPairCollator batch: query q sees key k of the same
    row iff both are in the same pair (block_ids), k <= q, and not (q rejected and k chosen). Chosen
    tokens never see rejected ones since those come later; padding (block -1) sees earlier padding
    and itself, so no softmax row is empty (an all-masked row gives NaN in SDPA, which the backward
    would spread through 0 * NaN). Packed rows get the block-diagonal of the pairs' blocks.

    bool for sdpa; for eager, additive `dtype` (0 or dtype's most negative value), as transformers
    builds its own eager masks."""
    if implementation not in SHARED_MASK_IMPLEMENTATIONS:
        takes = ", ".join(SHARED_MASK_IMPLEMENTATIONS)
        raise ValueError(
            f"prefix sharing needs an attention implementation that takes a 4D mask ({takes}); got {implementation}."
        )
    width = block_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=block_ids.device).tril_()
    same_pair = block_ids[:, :, None] == block_ids[:, None, :]
    rejected_sees_chosen = (branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN)
    allowed = (same_pair & causal & ~rejected_sees_chosen)[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
