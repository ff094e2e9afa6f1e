"""pipelines/vocabulary.py ValueCounter: counts kept in memory, or spilled to disk past a
budget and merged a part at a time, equal numpy's own count; the spill files go away."""
import numpy as np
import pytest

from tfdlrm.pipelines.vocabulary import ValueCounter


def _chunks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):  # skewed values over the whole uint32 range, as hashes
        values = (rng.zipf(1.3, 5000) * 2654435761) % (1 << 32)
        keys, counts = np.unique(values.astype(np.uint32), return_counts=True)
        yield keys, counts, values


@pytest.mark.parametrize("threshold", [1, 3])
@pytest.mark.parametrize("spill", [False, True])
def test_counts_equal_numpy_with_and_without_spilling(tmp_path, monkeypatch, spill, threshold):
    monkeypatch.setattr(ValueCounter, "FLUSH", 2000)
    counter = ValueCounter(spill_dir=tmp_path / "spill" if spill else None, max_entries=3000)
    everything = []
    for keys, counts, values in _chunks(1):
        counter.add(keys, counts)
        everything.append(values.astype(np.uint32))
    keys, counts = counter.result(threshold)
    want_keys, want_counts = np.unique(np.concatenate(everything), return_counts=True)
    keep = want_counts >= threshold
    np.testing.assert_array_equal(keys, want_keys[keep])
    np.testing.assert_array_equal(counts, want_counts[keep])
    assert keys.dtype == np.uint32
    assert (counter.spilled > 1) == spill
    if spill:
        assert not list((tmp_path / "spill").iterdir())


def test_a_conversion_that_spills_writes_the_same_dataset(tmp_path, monkeypatch):
    from tests.helpers.criteo_rows import numbered_lines, write_lines
    from tfdlrm.pipelines.convert import ConvertSpec, convert
    from tfdlrm.pipelines.reader import CriteoDataset

    raw = write_lines(tmp_path / "train.txt", numbered_lines(700, seed=3))
    out = {}
    for name, entries in (("memory", None), ("spilled", 40)):
        if entries:
            monkeypatch.setattr(ValueCounter, "MAX_ENTRIES", entries)
            monkeypatch.setattr(ValueCounter, "FLUSH", 16)
        convert(ConvertSpec(out=str(tmp_path / name), inputs=[str(raw)], min_frequency=2, progress=False),
                log=lambda s: None)
        out[name] = CriteoDataset(tmp_path / name)
        assert not list((tmp_path / name).glob(".counts-*"))
    assert out["memory"].table_sizes == out["spilled"].table_sizes
    for path in (tmp_path / "memory" / "vocabulary").iterdir():
        assert path.read_bytes() == (tmp_path / "spilled" / "vocabulary" / path.name).read_bytes()
