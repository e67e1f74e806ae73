"""The MNIST reader on the real files and on broken copies; augmentation; synthetic batches."""

import gzip
import re
import shutil
import struct

import numpy as np
import pytest

from harness.data import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
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


def test_batches_cover_the_epoch_once_with_each_image_beside_its_label(test_split, rng):
    subset = test_split.head(300)
    batches = list(iterate_batches(subset, 128, rng))
    assert [len(labels) for _, labels in batches] == [128, 128, 44]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    # every original image exactly once, and each still beside its own label
    index = {image.tobytes(): k for k, image in enumerate(subset.images)}
    order = [index[image.tobytes()] for image in images]
    assert sorted(order) == list(range(300))
    np.testing.assert_array_equal(labels, subset.labels[order])
    assert order != list(range(300))  # shuffled


def test_without_shuffle_the_order_is_the_files(test_split, rng):
    subset = test_split.head(100)
    labels = np.concatenate([labels for _, labels in iterate_batches(subset, 32, rng, shuffle=False)])
    np.testing.assert_array_equal(labels, subset.labels)


def test_augmentation_shifts_real_images_and_is_absent_when_off(test_split):
    """With augment every image is its original moved by some (dy, dx) in [-2, 2]^2 and most move; without,
    each batch holds the original images."""
    subset = test_split.head(64)
    (shifted, labels), = iterate_batches(subset, 64, np.random.default_rng(0), shuffle=False, augment=True)
    (plain, _), = iterate_batches(subset, 64, np.random.default_rng(0), shuffle=False, augment=False)
    np.testing.assert_array_equal(plain, subset.images)
    padded = np.pad(subset.images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    moved = 0
    for k in range(64):
        candidates = {(dy, dx) for dy in range(5) for dx in range(5)
                      if np.array_equal(padded[k, :, dy : dy + 28, dx : dx + 28], shifted[k])}
        assert candidates, f"image {k} is not a shift of its original by at most 2 pixels"
        moved += (2, 2) not in candidates
    assert moved > 40  # 24 of the 25 offsets move the image


def test_the_training_epochs_draw_their_batches_from_seed_and_epoch(test_split):
    """A resumed run draws what the uninterrupted one would have: epoch e's batches depend on (seed, e) only."""
    from harness.training.loop import training_batches

    subset = test_split.head(96)
    first = [labels for _, labels in training_batches(subset, 32, seed=3, epoch=2, augment=True)]
    again = [labels for _, labels in training_batches(subset, 32, seed=3, epoch=2, augment=True)]
    other = [labels for _, labels in training_batches(subset, 32, seed=3, epoch=3, augment=True)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def write_idx(path, magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def small_split(folder, images=10, labels=10, label_values=None, size=28):
    write_idx(folder / "t10k-images-idx3-ubyte", IMAGE_MAGIC, np.zeros((images, size, size)))
    values = np.arange(labels) % 10 if label_values is None else np.asarray(label_values)
    write_idx(folder / "t10k-labels-idx1-ubyte", LABEL_MAGIC, values)


@pytest.mark.parametrize("kwargs, problem", [
    ({"images": 10, "labels": 9}, "has 10 images but"),
    ({"label_values": [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]}, "label 10 is not a digit 0-9"),
    ({"size": 27}, "images are (27, 27), expected 28x28"),
    ({}, "10 images, the test split has 10000"),
])
def test_a_split_that_is_not_mnist_is_named(tmp_path, kwargs, problem):
    small_split(tmp_path, **kwargs)
    with pytest.raises(DataError, match=re.escape(problem)):
        load_mnist(tmp_path, "test")


def test_synthetic_batches_are_seeded():
    a, la = synthetic_batch(PAPER, 4, seed=1)
    b, lb = synthetic_batch(PAPER, 4, seed=1)
    c, _ = synthetic_batch(PAPER, 4, seed=2)
    assert a.shape == (4, 1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
