"""The training stream: a global shuffle per epoch, every pair once per epoch, any position found directly."""
import numpy as np

from pipeline.train.data import stream_indices


def test_every_pair_once_per_epoch_in_a_new_order_each_epoch():
    n, seed = 103, 5
    stream = stream_indices(n, seed, 0, 4 * n)
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len({tuple(e.tolist()) for e in epochs}) == 4
    # Shuffled across the whole split: the first tenth of an epoch draws from all of it, not from one source's
    # block (file order would give indices 0..9 first).
    assert epochs[0][: n // 10].max() > n // 2
    assert stream_indices(n, seed + 1, 0, n).tolist() != epochs[0].tolist()


def test_any_slice_of_the_stream_is_the_same_slice_of_one_long_read():
    """What exact resume rests on: step s reads positions [(s-1)·B, s·B) without replaying the steps before it,
    across epoch boundaries too."""
    n, seed, batch = 37, 0, 16
    whole = stream_indices(n, seed, 0, 20 * batch)
    for step in range(1, 21):
        start = (step - 1) * batch
        np.testing.assert_array_equal(stream_indices(n, seed, start, batch), whole[start:start + batch])
