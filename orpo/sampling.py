"""Which pairs each optimizer step sees: seeded, reproducible, the same however the batch is split.

Optionally, each global batch is ordered by length so that its micro-batches pad less. Only the order
*inside* a global batch changes, never which pairs it holds: every step sees exactly the pairs plain
shuffling gives it (the same seed draws the same batches). Since the loss is normalised over the global
batch (orpo/loss.py), a step's gradient is a sum over its pairs and does not depend on their order or on
how they are grouped into micro-batches and ranks (up to float summation order). This is unlike a
megabatch scheme such as HF's LengthGroupedSampler, which changes the batches themselves (a step of
long pairs, a step of short ones), and so the distribution of a step's gradient.

The saving is bounded by the accumulation: with one micro-batch per rank per step there is nothing to
reorder. The longest micro-batch of a step runs first, so an out-of-memory shows at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from orpo.data import DataError, PreferenceSplit


def pair_lengths(data: PreferenceSplit) -> np.ndarray:
    """[pairs] the width each pair pads its micro-batch to: the longer of its chosen and rejected sequences."""
    lengths = np.diff(data.offsets)
    return np.maximum(lengths[0::2], lengths[1::2])


def order_by_length(batch: np.ndarray, lengths: np.ndarray, num_processes: int = 1) -> np.ndarray:
    """The pairs of one global batch, longest first, dealt round-robin to the ranks.

    The loop gives rank r the r-th contiguous slice of `batch_size / num_processes` pairs and cuts it
    into micro-batches in order. Dealing the sorted pairs (rank r gets the r-th, (r+P)-th, ... longest)
    keeps each rank's slice sorted, so its micro-batches hold similar lengths, and gives every rank a
    similar share of the tokens. Ties keep their shuffled order (stable sort).
    """
    ranked = batch[np.argsort(-lengths[batch], kind="stable")]
    return np.concatenate([ranked[rank::num_processes] for rank in range(num_processes)])


def global_batches(
    num_pairs: int,
    batch_size: int,
    seed: int,
    lengths: np.ndarray | None = None,
    num_processes: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, pair indices) of each global batch, forever: a seeded permutation per epoch, cut
    into full batches (the incomplete tail of an epoch is dropped, so every step sees `batch_size`).
    Too few pairs is an error now, not at the first step.

    With `lengths` ([num_pairs], e.g. `pair_lengths(data)`), each batch holds the same pairs but is
    ordered by `order_by_length` for `num_processes` ranks (see the module docstring).
    """
    if num_pairs < batch_size:
        raise DataError(f"The training split has {num_pairs} usable pairs, fewer than global_batch_size={batch_size}.")
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (num_pairs,):
            raise ValueError(f"lengths must have one entry per pair, shape ({num_pairs},); got {lengths.shape}.")
        if batch_size % num_processes:
            raise ValueError(f"global batch {batch_size} does not split over {num_processes} processes.")

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
            for start in range(0, num_pairs - batch_size + 1, batch_size):
                batch = order[start : start + batch_size]
                yield epoch, batch if lengths is None else order_by_length(batch, lengths, num_processes)
            epoch += 1

    return batches()
