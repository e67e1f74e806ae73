"""The MNIST reader on the real files and on broken copies; augmentation; synthetic batches."""

import gzip
import shutil

import numpy as np
import pytest

from harness.data import (
    IMAGE_MAGIC,
    DataError,
    iterate_batches,
    load_mnist,
    read_idx,
    resolve_data_dir,
    shift_images,
    synthetic_batch,
)
from harness.spec import MAX_SHIFT_PIXELS, PAPER

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture(scope="module")
def test_split(mnist_path):
    return load_mnist(mnist_path, "test")


def copy_mnist(source, target, gunzip=False):
    for stem in FILES:
        if gunzip:
            with gzip.open(source / f"{stem}.gz", "rb") as packed, open(target / stem, "wb") as plain:
                shutil.copyfileobj(packed, plain)
        else:
            shutil.copy(source / f"{stem}.gz", target / f"{stem}.gz")


def test_real_test_split(test_split):
    assert test_split.images.shape == (10_000, 1, 28, 28)
    assert test_split.images.dtype == np.float32
    assert test_split.images.min() == 0.0 and test_split.images.max() == 1.0
    assert test_split.labels.dtype == np.int64
    # the published class counts of the MNIST test set
    assert np.bincount(test_split.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_train_split(mnist_path):
    train = load_mnist(mnist_path, "train")
    assert len(train) == 60_000
    assert train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]


def test_uncompressed_files_read_the_same(mnist_path, tmp_path, test_split):
    copy_mnist(mnist_path, tmp_path, gunzip=True)
    plain = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(plain.images, test_split.images)
    np.testing.assert_array_equal(plain.labels, test_split.labels)


def test_data_dir_from_the_environment(mnist_path, monkeypatch):
    monkeypatch.setenv("CAPSBENCH_DATA_DIR", str(mnist_path))
    assert resolve_data_dir(None) == mnist_path
    monkeypatch.delenv("CAPSBENCH_DATA_DIR")
    with pytest.raises(DataError, match="no MNIST folder given: pass --data-dir"):
        resolve_data_dir(None)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere", "test")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found in"):
        load_mnist(tmp_path, "test")


def test_truncated_file(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path, gunzip=True)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: 7839900 bytes of data, the header promises 7840000"):
        load_mnist(tmp_path, "test")


def test_corrupt_gzip(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[100:120] = b"\x00" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: cannot be read as gzip"):
        load_mnist(tmp_path, "test")


def test_wrong_magic_number(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path, gunzip=True)
    # labels where images should be
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist(tmp_path, "test")


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="truncated header"):
        read_idx(path, IMAGE_MAGIC)


def test_shift_moves_each_image_by_at_most_two_pixels_and_covers_every_offset(rng):
    images = np.zeros((500, 1, 28, 28), dtype=np.float32)
    images[:, 0, 14, 14] = 1.0
    shifted = shift_images(images, rng)
    positions = np.argwhere(shifted[:, 0] == 1.0)
    assert len(positions) == 500  # one lit pixel per image, nothing lost at the centre
    offsets = {(int(r) - 14, int(c) - 14) for _, r, c in positions}
    span = range(-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS + 1)
    assert offsets == {(dy, dx) for dy in span for dx in span}


def test_shift_fills_with_zeros_at_the_border(rng):
    images = np.ones((200, 1, 28, 28), dtype=np.float32)
    shifted = shift_images(images, rng)
    lost_rows_and_columns = 28 * 28 - shifted.sum(axis=(1, 2, 3))
    assert lost_rows_and_columns.min() == 0  # the unshifted image
    assert lost_rows_and_columns.max() == 28 * 28 - 26 * 26  # shifted 2 pixels both ways


def test_batches_cover_the_epoch_once(test_split, rng):
    subset = test_split.head(300)
    seen = np.concatenate([labels for _, labels in iterate_batches(subset, 128, rng)])
    assert len(seen) == 300
    assert sorted(seen.tolist()) == sorted(subset.labels.tolist())


def test_synthetic_batches_are_seeded():
    a, la = synthetic_batch(PAPER, 4, seed=1)
    b, lb = synthetic_batch(PAPER, 4, seed=1)
    c, _ = synthetic_batch(PAPER, 4, seed=2)
    assert a.shape == (4, 1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
