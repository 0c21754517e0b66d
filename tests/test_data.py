"""CIFAR-10 loading from the real on-disk format, offline errors, on-device batches."""

import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils
from conftest import write_fake_cifar10

from cfm.io import cifar10


def test_reads_pickle_batches_in_cifar_format(fake_cifar):
    root, images, labels = fake_cifar
    x, y = cifar10.load_cifar10(root)
    assert x.dtype == torch.uint8 and x.shape == (100, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (100,)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    x_test, y_test = cifar10.load_cifar10(root, train=False)
    assert x_test.shape == (20, 3, 32, 32) and y_test.max() <= 9


def test_pixel_layout_is_channel_major_like_cifar():
    """Row layout of a CIFAR batch: 1024 red, then 1024 green, then 1024 blue values, row-major."""
    import pickle
    import tempfile
    from pathlib import Path

    row = np.zeros((1, 3072), np.uint8)
    row[0, 1024 + 32 * 5 + 7] = 200  # green channel, y=5, x=7
    with tempfile.TemporaryDirectory() as d:
        with open(Path(d) / "b", "wb") as f:
            pickle.dump({"data": row, "labels": [3]}, f, protocol=2)
        x, y = cifar10.read_cifar_batches(d, names=("b",))
    assert x[0, 1, 5, 7] == 200 and int(x.sum()) == 200 and y.tolist() == [3]


def test_extracts_a_local_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_fake_cifar10(src, per_batch=10)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / cifar10.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / cifar10.CIFAR10_DIR, arcname=cifar10.CIFAR10_DIR)
    # The fake archive is not the real one: accept its checksum, and make sure nothing downloads.
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", tv_utils.calculate_md5(str(archive)))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    x, y = cifar10.load_cifar10(data_dir)
    assert x.shape == (50, 3, 32, 32)


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / cifar10.CIFAR10_ARCHIVE).write_bytes(b"not a tarball")
    with pytest.raises(cifar10.DataError, match="corrupt"):
        cifar10.load_cifar10(tmp_path)


def test_offline_without_data_names_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(cifar10.DataError) as err:
        cifar10.load_cifar10(tmp_path / "nowhere")
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "nowhere") in message
    assert "\n" not in message


def test_malformed_batch_is_rejected(tmp_path):
    import pickle

    write_fake_cifar10(tmp_path, per_batch=10)
    with open(tmp_path / cifar10.CIFAR10_DIR / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((10, 100), np.uint8), "labels": [0] * 10}, f)
    with pytest.raises(cifar10.DataError, match="data_batch_3"):
        cifar10.load_cifar10(tmp_path)


def test_model_range_and_uint8_roundtrip():
    u8 = torch.arange(256, dtype=torch.uint8)
    x = cifar10.to_model_range(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.allclose(x, u8.float() / 127.5 - 1)
    # (x * 127.5 + 128) truncates to u + 0.5 -> u: the published mapping is an exact inverse.
    assert torch.equal(cifar10.to_uint8(x), u8)


def test_random_hflip_flips_about_half_exactly():
    x = torch.randn(2000, 3, 4, 5)
    y = cifar10.random_hflip(x, torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 900 < int(flipped.sum()) < 1100


def test_shuffled_batches_cover_each_epoch_and_resume_exactly(fake_cifar):
    root, images, _ = fake_cifar
    data = torch.from_numpy(images)
    source = cifar10.ShuffledBatches(data, batch_size=7, seed=3)
    # Which data image is each batch row? Match its pixels against every image and its mirror.
    index_of = {bytes(img.numpy()): i for i, img in enumerate(data)}
    index_of.update({bytes(img.flip(-1).numpy()): i for i, img in enumerate(data)})
    seen = []
    for _ in range(100 // 7):
        x, cluster = source.next_batch()
        assert x.shape == (7, 3, 32, 32) and cluster is None
        assert x.min() >= -1 and x.max() <= 1
        seen += [index_of[bytes(img.numpy())] for img in cifar10.to_uint8(x)]
    assert len(set(seen)) == 98  # without replacement within an epoch
    state = torch.load(_roundtrip(source.state_dict()), weights_only=True)
    expected = [source.next_batch()[0] for _ in range(5)]  # crosses the epoch boundary
    resumed = cifar10.ShuffledBatches(data, batch_size=7, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()[0], want)
    other_seed = cifar10.ShuffledBatches(data, batch_size=7, seed=4)
    assert not torch.equal(other_seed.order, cifar10.ShuffledBatches(data, 7, seed=3).order)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the real CIFAR-10 files were: by Python 2's cPickle (protocol 2) with
    numpy 1, so str is a byte string and the array is rebuilt by `numpy.core.multiarray._reconstruct`
    (a name numpy 2 no longer has) from raw bytes held in a byte string.

    Python 3 cannot write this (its str is unicode and its numpy is 2), so it is assembled from
    pickle opcodes (see pickletools) exactly as ndarray.__reduce__ in numpy 1 returns it.
    """
    import struct

    def string(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING, or BINSTRING past 255 bytes
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(i: int) -> bytes:  # BININT1, BININT2 or BININT
        if 0 <= i < 256:
            return b"K" + bytes([i])
        return b"M" + struct.pack("<H", i) if 0 <= i < 65536 else b"J" + struct.pack("<i", i)

    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(" + integer(1) + integer(n) + integer(width) + b"\x86"  # __setstate__((1, shape, dtype, False, raw))
        + b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
        + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
        + b"\x89" + string(data.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(integer(int(y)) for y in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def test_reads_the_python2_numpy1_pickles_of_the_real_files(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    data[0, :4] = [10, 13, 0, 255]  # bytes that text decoding would mangle: CR, LF-like, NUL, 0xff
    (tmp_path / "data_batch_1").write_bytes(python2_batch(data, [7, 0, 9]))
    x, y = cifar10.read_cifar_batches(tmp_path, names=("data_batch_1",))
    assert np.array_equal(x.numpy(), data.reshape(3, 3, 32, 32)) and y.tolist() == [7, 0, 9]


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered 'data batch' could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_batch_that_would_run_code_is_refused_before_it_runs(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    write_fake_cifar10(tmp_path, per_batch=10)
    batch = tmp_path / cifar10.CIFAR10_DIR / "data_batch_2"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(f"touch {marker}"), "labels": [0]}, protocol=2))
    with pytest.raises(cifar10.DataError) as err:
        cifar10.load_cifar10(tmp_path)
    message = str(err.value)
    assert str(batch) in message and "system" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (lambda good: good[: len(good) // 2], "not a readable CIFAR-10 batch"),  # truncated download or copy
    (lambda good: b"not a pickle at all", "not a readable CIFAR-10 batch"),
    (lambda good: __import__("pickle").dumps([1, 2, 3]), "holds a list, not a CIFAR-10 batch dict"),
])
def test_truncated_or_foreign_batch_is_one_sentence_naming_the_file(tmp_path, content, expected):
    write_fake_cifar10(tmp_path, per_batch=10)
    batch = tmp_path / cifar10.CIFAR10_DIR / "data_batch_4"
    batch.write_bytes(content(batch.read_bytes()))
    with pytest.raises(cifar10.DataError) as err:
        cifar10.load_cifar10(tmp_path)
    message = str(err.value)
    assert expected in message and str(batch) in message and "\n" not in message
