"""pipelines/batching.py (--last-batch) and the training stream's --shuffle modes."""
import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.pipelines.batching import batches_per_epoch, rebatch, rows_per_epoch
from tfdlrm.pipelines.sources import open_data
from tfdlrm.presets import get_preset
from tfdlrm.training.stream import pass_order, training_stream


def _sizes_and_rows(rows, batch, last):
    data = tf.data.Dataset.range(rows).batch(7)  # any incoming batching
    out = [b.numpy() for b in rebatch(data, rows, batch, last)]
    return [len(b) for b in out], np.concatenate(out)


@pytest.mark.parametrize("rows,batch,last,sizes", [
    (50, 16, "keep", [16, 16, 16, 2]),
    (50, 16, "drop", [16, 16, 16]),
    (50, 16, "fold", [16, 16, 18]),
    (48, 16, "fold", [16, 16, 16]),
    (10, 16, "fold", [10]),  # less than a batch: kept whatever the mode
    (10, 16, "drop", [10]),
])
def test_last_batch_modes(rows, batch, last, sizes):
    got, values = _sizes_and_rows(rows, batch, last)
    assert got == sizes
    assert batches_per_epoch(rows, batch, last) == len(sizes)
    assert rows_per_epoch(rows, batch, last) == sum(sizes)
    assert values.tolist() == list(range(sum(sizes)))  # order kept, nothing repeated


def test_unknown_last_batch_mode_is_refused():
    with pytest.raises(UserError, match="--last-batch"):
        batches_per_epoch(10, 4, "sometimes")


def _passes(source, shuffle, passes=2, batch=1024):
    per = source.train_batches(batch)
    stream = training_stream(source, batch, 7, 0, passes * per, shuffle=shuffle)
    ids = [x["sparse"].numpy() for x, _ in stream]
    return [np.concatenate(ids[p * per:(p + 1) * per]) for p in range(passes)]


def test_shuffle_modes_order_the_passes():
    source = open_data("synthetic", get_preset("tiny"), train_examples=8192, eval_examples=1024)
    once = _passes(source, "once")
    np.testing.assert_array_equal(once[0], once[1])  # one order per seed, every pass
    epoch = _passes(source, "epoch")
    assert not np.array_equal(epoch[0], epoch[1])  # a new order each pass ...
    np.testing.assert_array_equal(np.sort(epoch[0], axis=0), np.sort(epoch[1], axis=0))  # ... of the same rows
    np.testing.assert_array_equal(epoch[0], once[0])  # pass 0 is the same in both modes
    stored = _passes(source, "none")
    plain = np.concatenate([x["sparse"].numpy() for x, _ in source.train_dataset(1024, seed=None)])
    np.testing.assert_array_equal(stored[0], plain)
    np.testing.assert_array_equal(stored[1], plain)
    assert pass_order(7, 3, "none") is None and pass_order(7, 3, "once") == pass_order(7, 0, "epoch")
