"""orpo/sampling.py with length grouping: reproducible, every epoch a permutation, each step the very pairs
plain shuffling gives it (so the same gradient), and measurably less padding on the shipped data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orpo.collator import PairCollator
from orpo.data import PreferenceSplit
from orpo.loss import orpo_loss, policy_logps
from orpo.sampling import global_batches, order_by_length, pair_lengths
from tests.conftest import ROOT, TINY


def take(n: int, *args: object, **kwargs: object) -> list[tuple[int, list[int]]]:
    it = global_batches(*args, **kwargs)
    return [(epoch, batch.tolist()) for epoch, batch in (next(it) for _ in range(n))]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> PreferenceSplit:
    from transformers import AutoTokenizer

    from orpo.data import load_split

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    cache = str(tmp_path_factory.mktemp("cache"))
    return load_split(str(ROOT / "data" / "sort_prefs"), "train", tokenizer, 64, 48, cache_dir=cache)


# ---- the order -----------------------------------------------------------------------------------

LENGTHS = np.array([5, 9, 2, 9, 7, 1, 3, 8, 4, 6, 2, 10])


def test_pair_lengths_is_the_longer_side() -> None:
    data = PreferenceSplit(
        tokens=np.zeros(3 + 5 + 4 + 2, dtype=np.int32),
        offsets=np.array([0, 3, 8, 12, 14]),
        prompt_lens=np.array([1, 1, 1, 1]),
        row_index=np.array([0, 1]),
    )
    assert pair_lengths(data).tolist() == [5, 4]


def test_order_by_length_one_process_is_longest_first_and_stable() -> None:
    batch = np.array([0, 1, 2, 3, 4, 5])  # lengths 5 9 2 9 7 1
    assert order_by_length(batch, LENGTHS).tolist() == [1, 3, 4, 0, 2, 5]  # the two 9s keep their order


def test_order_by_length_deals_ranks_round_robin() -> None:
    batch = np.arange(12)
    ordered = order_by_length(batch, LENGTHS, num_processes=2)
    # Sorted: 11(10) 1(9) 3(9) 7(8) 4(7) 9(6) 0(5) 8(4) 6(3) 2(2) 10(2) 5(1); rank 0 the 1st, 3rd, ...
    assert ordered.tolist() == [11, 3, 4, 0, 6, 10, 1, 7, 9, 8, 2, 5]
    rank0, rank1 = LENGTHS[ordered[:6]], LENGTHS[ordered[6:]]
    assert (np.diff(rank0) <= 0).all() and (np.diff(rank1) <= 0).all()
    assert abs(int(rank0.sum()) - int(rank1.sum())) <= LENGTHS.max()  # balanced ranks


# ---- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_processes", [1, 2])
def test_grouped_batches_are_reproducible_and_hold_plain_shuffling_pairs(num_processes: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 50, size=40)
    grouped = take(12, 40, 8, 7, lengths=lengths, num_processes=num_processes)
    assert grouped == take(12, 40, 8, 7, lengths=lengths, num_processes=num_processes)
    assert grouped != take(12, 40, 8, 8, lengths=lengths, num_processes=num_processes)
    plain = take(12, 40, 8, 7)
    assert grouped != plain  # reordered ...
    for (ge, gb), (pe, pb) in zip(grouped, plain, strict=True):
        assert ge == pe and sorted(gb) == sorted(pb)  # ... but each step holds exactly the same pairs
    for epoch in range(2):  # 5 steps per epoch, each epoch a permutation of all 40 pairs
        assert sorted(i for e, b in grouped if e == epoch for i in b) == list(range(40))
    assert [b for e, b in grouped if e == 0] != [b for e, b in grouped if e == 1]


def test_grouped_batches_drop_the_tail_like_plain_ones() -> None:
    lengths = np.arange(10)
    grouped = take(9, 10, 3, 7, lengths=lengths)
    assert [e for e, _ in grouped] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for epoch in range(3):
        seen = [i for e, b in grouped if e == epoch for i in b]
        assert len(set(seen)) == 9
    assert all(b == sorted(b, reverse=True) for _, b in grouped)  # lengths == indices here


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"shape \(10,\); got \(9,\)"):
        global_batches(10, 4, 0, lengths=np.ones(9))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        global_batches(10, 4, 0, lengths=np.ones(10), num_processes=3)


# ---- what it buys, on the shipped data -----------------------------------------------------------


def padding_waste(data: PreferenceSplit, batches: list[list[int]], micro_batch: int) -> tuple[int, int]:
    """(pad tokens, real tokens) over every micro-batch, as PairCollator pads them: 2m rows of the
    micro-batch's longest sequence."""
    seq = np.diff(data.offsets)
    widths = pair_lengths(data)
    pad = real = 0
    for batch in batches:
        for start in range(0, len(batch), micro_batch):
            micro = np.array(batch[start : start + micro_batch])
            tokens = int(seq[2 * micro].sum() + seq[2 * micro + 1].sum())
            pad += int(widths[micro].max()) * 2 * len(micro) - tokens
            real += tokens
    return pad, real


@pytest.mark.parametrize(("global_batch", "micro_batch"), [(32, 16), (32, 4), (64, 8)])
def test_grouping_cuts_padding_on_the_shipped_data(
    shipped: PreferenceSplit, global_batch: int, micro_batch: int
) -> None:
    steps = len(shipped) // global_batch  # one epoch
    plain = [b for _, b in take(steps, len(shipped), global_batch, 42)]
    grouped = [b for _, b in take(steps, len(shipped), global_batch, 42, lengths=pair_lengths(shipped))]
    plain_pad, plain_real = padding_waste(shipped, plain, micro_batch)
    grouped_pad, grouped_real = padding_waste(shipped, grouped, micro_batch)
    assert plain_real == grouped_real  # the same pairs
    assert grouped_pad < 0.75 * plain_pad, f"pad tokens: plain {plain_pad:,}, grouped {grouped_pad:,}"


def test_a_step_gradient_does_not_depend_on_the_order(shipped: PreferenceSplit) -> None:
    """The docstring's claim, checked: one global batch of 8 pairs as 4 micro-batches of 2, in plain and
    length-grouped order, gives the same summed gradient (the loss is normalised by global counts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation="sdpa")
    plain = next(global_batches(len(shipped), 8, 3))[1]
    grouped = next(global_batches(len(shipped), 8, 3, lengths=pair_lengths(shipped)))[1]
    assert plain.tolist() != grouped.tolist() and sorted(plain) == sorted(grouped)
    collate = PairCollator(3)

    def step_gradient(order: np.ndarray) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        num_nll = sum(int(collate([shipped[i]])["num_nll_tokens"]) for i in order)
        for start in range(0, 8, 2):
            batch = collate([shipped[i] for i in order[start : start + 2]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            policy = policy_logps(logits, batch["labels"], batch["nll_labels"])
            orpo_loss(*policy, num_nll, 8, 0.5).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for got, want in zip(step_gradient(grouped), step_gradient(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
