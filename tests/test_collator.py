"""orpo/collator.py: a micro-batch of pairs as one padded forward, chosen rows first, with the labels and
token counts the global-batch normalisation needs. Every expected tensor is written out by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from orpo.collator import IGNORE_INDEX, PairCollator

PAD = 0
X = IGNORE_INDEX


def pair(
    chosen: list[int], chosen_prompt_len: int, rejected: list[int], rejected_prompt_len: int, row_index: int
) -> dict[str, Any]:
    """A pair as PreferenceSplit.__getitem__ gives it (int32 numpy sequences)."""
    return {
        "chosen_ids": np.array(chosen, dtype=np.int32),
        "chosen_prompt_len": chosen_prompt_len,
        "rejected_ids": np.array(rejected, dtype=np.int32),
        "rejected_prompt_len": rejected_prompt_len,
        "row_index": row_index,
    }


# Two pairs; the longest sequence (7) is the second chosen one.
PAIRS = [
    pair([10, 11, 12, 13, 14], 2, [10, 11, 20], 2, row_index=7),
    pair([10, 30, 31, 32, 33, 34, 35], 3, [10, 30, 31, 40, 41], 3, row_index=9),
]
INPUT_IDS = [
    [10, 11, 12, 13, 14, PAD, PAD],  # chosen 0
    [10, 30, 31, 32, 33, 34, 35],  # chosen 1
    [10, 11, 20, PAD, PAD, PAD, PAD],  # rejected 0
    [10, 30, 31, 40, 41, PAD, PAD],  # rejected 1
]
ATTENTION = [
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
]
LABELS = [
    [X, X, 12, 13, 14, X, X],
    [X, X, X, 32, 33, 34, 35],
    [X, X, 20, X, X, X, X],
    [X, X, X, 40, 41, X, X],
]


def rows(t: torch.Tensor) -> list[list[int]]:
    return t.tolist()


def test_layout_padding_masks_and_labels() -> None:
    batch = PairCollator(PAD)(PAIRS)
    assert rows(batch["input_ids"]) == INPUT_IDS  # padded to the longest of the micro-batch, on the right
    assert rows(batch["attention_mask"]) == ATTENTION
    assert rows(batch["labels"]) == LABELS
    for key in ("input_ids", "attention_mask", "labels", "nll_labels"):
        assert batch[key].dtype == torch.long
    assert batch["row_index"].tolist() == [7, 9]


def test_response_only_nll_labels_and_counts() -> None:
    batch = PairCollator(PAD, nll_on_prompt=False)(PAIRS)
    assert rows(batch["nll_labels"]) == LABELS[:2]
    assert int(batch["num_nll_tokens"]) == 3 + 4  # chosen response tokens
    assert int(batch["num_tokens"]) == 5 + 7 + 3 + 5  # real tokens of all four rows
    assert int(batch["num_pairs"]) == 2


def test_nll_on_prompt_scores_every_chosen_token_but_the_first() -> None:
    batch = PairCollator(PAD, nll_on_prompt=True)(PAIRS)
    assert rows(batch["nll_labels"]) == [
        [X, 11, 12, 13, 14, X, X],
        [X, 30, 31, 32, 33, 34, 35],
    ]
    assert int(batch["num_nll_tokens"]) == 4 + 6
    assert rows(batch["labels"]) == LABELS  # the odds-ratio labels stay response-only
    assert int(batch["num_tokens"]) == 20 and int(batch["num_pairs"]) == 2


@pytest.mark.parametrize(("multiple", "width"), [(1, 7), (4, 8), (8, 8), (3, 9), (7, 7)])
def test_pad_to_multiple_of(multiple: int, width: int) -> None:
    batch = PairCollator(PAD, pad_to_multiple_of=multiple)(PAIRS)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    assert batch["nll_labels"].shape == (2, width)
    extra = width - 7
    assert rows(batch["input_ids"]) == [r + [PAD] * extra for r in INPUT_IDS]
    assert rows(batch["attention_mask"]) == [r + [0] * extra for r in ATTENTION]
    assert rows(batch["labels"]) == [r + [X] * extra for r in LABELS]
    assert int(batch["num_tokens"]) == 20 and int(batch["num_nll_tokens"]) == 7


def test_width_follows_the_micro_batch_not_a_global_maximum() -> None:
    short = [pair([1, 2, 3], 1, [1, 2, 4, 5], 1, row_index=0)]
    batch = PairCollator(PAD)(short)
    assert rows(batch["input_ids"]) == [[1, 2, 3, PAD], [1, 2, 4, 5]]
    assert rows(batch["labels"]) == [[X, 2, 3, X], [X, 2, 4, 5]]  # B=1: chosen row, then rejected row


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_pad_equal_to_eos_does_not_hide_eos(nll_on_prompt: bool) -> None:
    eos = 2
    pairs = [pair([1, 5, 6, eos], 2, [1, 5, 7, 8, 9, eos], 2, row_index=0)]
    batch = PairCollator(pad_token_id=eos, nll_on_prompt=nll_on_prompt)(pairs)
    assert rows(batch["input_ids"]) == [[1, 5, 6, eos, eos, eos], [1, 5, 7, 8, 9, eos]]
    assert rows(batch["attention_mask"]) == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert rows(batch["labels"]) == [[X, X, 6, eos, X, X], [X, X, 7, 8, 9, eos]]
    expected_nll = [[X, 5, 6, eos, X, X]] if nll_on_prompt else [[X, X, 6, eos, X, X]]
    assert rows(batch["nll_labels"]) == expected_nll
    assert int(batch["num_nll_tokens"]) == (3 if nll_on_prompt else 2)
