"""Which pairs each optimizer step sees: seeded, reproducible, the same however the batch is split."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from orpo.data import DataError


def global_batches(num_pairs: int, batch_size: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, pair indices) of each global batch, forever: a seeded permutation per epoch, cut
    into full batches (the incomplete tail of an epoch is dropped, so every step sees `batch_size`).
    Too few pairs is an error now, not at the first step."""
    if num_pairs < batch_size:
        raise DataError(f"The training split has {num_pairs} usable pairs, fewer than global_batch_size={batch_size}.")

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
            for start in range(0, num_pairs - batch_size + 1, batch_size):
                yield epoch, order[start : start + batch_size]
            epoch += 1

    return batches()
