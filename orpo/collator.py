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
(padding-free training; see its docstring).
"""

from __future__ import annotations

from typing import Any

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
