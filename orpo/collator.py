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
