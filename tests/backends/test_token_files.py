"""Token files as emitted programs read them (``backends/runtime/data.py``, in this process, one rank): .bin and
.npy give the same samples, every epoch visits each window once in a seeded order, a reader set to a saved
position continues the stream, and files that are not flat uint16/uint32 token ids are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.runtime import data

SEQ, BATCH = 8, 4
INPUTS = [("idx", ["batch", SEQ], torch.int64, [], 512), ("targets", ["batch", SEQ], torch.int64, [], 512)]


@pytest.fixture(autouse=True)
def plan(monkeypatch):
    """The plan constants of a one-rank GPT-like program (token ids and their targets)."""
    monkeypatch.setattr(data, "INPUTS", INPUTS)
    monkeypatch.setattr(data, "EXAMPLE_DIMS", {"batch": BATCH})


def tokens(count: int = 8 * SEQ + 1) -> np.ndarray:
    return np.arange(count, dtype=np.uint32) * 7 % 500


def reader(path, seed: int = 0, dtype: str = "uint16") -> data.TokenFile:
    return data.TokenFile(str(path), dtype, seed, microbatches=1)


def batches(source: data.TokenFile, count: int) -> list[tuple[torch.Tensor, ...]]:
    return [source.next() for _ in range(count)]


def test_bin_and_npy_files_give_the_same_batches(tmp_path):
    tokens().astype(np.uint16).tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens())
    tokens().tofile(tmp_path / "t32.bin")
    expected = batches(reader(tmp_path / "t.bin"), 3)
    for other in (reader(tmp_path / "t.npy"), reader(tmp_path / "t32.bin", dtype="uint32")):
        assert all(torch.equal(a, b) for x, y in zip(expected, batches(other, 3)) for a, b in zip(x, y))


def test_samples_are_windows_with_their_next_tokens_each_once_per_epoch(tmp_path):
    tokens().astype(np.uint16).tofile(tmp_path / "t.bin")
    source = reader(tmp_path / "t.bin", seed=5)
    assert source.windows == 8
    epoch = batches(source, 2)  # 8 samples: one epoch
    starts = sorted(int(row[0]) for idx, _ in epoch for row in idx)
    assert starts == sorted(int(t) for t in tokens()[::SEQ][:8])
    for idx, targets in epoch:
        assert idx.dtype == torch.int64 and idx.shape == (BATCH, SEQ)
        assert torch.equal(idx[:, 1:], targets[:, :-1])
    second = batches(source, 2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch, second))  # a new order in the next epoch
    other_seed = batches(reader(tmp_path / "t.bin", seed=6), 2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch, other_seed))


def test_a_reader_at_a_saved_position_continues_the_stream(tmp_path):
    tokens().astype(np.uint16).tofile(tmp_path / "t.bin")
    uninterrupted = batches(reader(tmp_path / "t.bin", seed=1), 5)
    resumed = reader(tmp_path / "t.bin", seed=1)
    resumed.position = 3 * BATCH  # what a checkpoint after 3 batches holds
    assert all(torch.equal(a, b) for x, y in zip(uninterrupted[3:], batches(resumed, 2)) for a, b in zip(x, y))


@pytest.mark.parametrize("array, found", [(np.zeros(20, dtype=np.float32), "dtype <f4"),
                                          (np.zeros((4, 5), dtype=np.uint16), "shape (4, 5)")])
def test_files_other_than_flat_token_ids_are_refused(tmp_path, capsys, array, found):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(SystemExit):
        reader(tmp_path / "bad.npy")
    err = capsys.readouterr().err
    assert "expected a flat array of little-endian uint16 or uint32 token ids" in err and found in err


def test_a_file_shorter_than_one_sample_is_refused(tmp_path, capsys):
    np.arange(SEQ, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(SystemExit):
        reader(tmp_path / "short.bin")
    assert f"holds {SEQ} tokens; one sample needs {SEQ + 1}" in capsys.readouterr().err
