"""MNIST from the four original IDX files, the paper's shift augmentation, and seeded synthetic batches.

Nothing is ever downloaded: the files are read from a folder the user names (``--data-dir`` or the
environment variable ``CAPSBENCH_DATA_DIR``), gzipped or not.  A missing, truncated or corrupt file
raises :class:`DataError` with one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import UserError
from harness.settings import DATA_DIR_ENV
from harness.spec import MAX_SHIFT_PIXELS, CapsNetConfig

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_COUNTS = {"train": 60_000, "test": 10_000}
MNIST_IMAGE_SIZE = 28
FIX = f"pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding the four original MNIST IDX files"


class DataError(UserError, RuntimeError):
    """A data file that is missing, truncated, corrupt or not what it should be (exit status 2)."""


@dataclass(frozen=True)
class Dataset:
    """Images as float32 (N, 1, 28, 28) in [0, 1] and labels as int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> Dataset:
        return self if count is None else Dataset(self.images[:count], self.labels[:count])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The folder named on the command line, else $CAPSBENCH_DATA_DIR; an error if neither is given."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DataError(f"no MNIST folder given: {FIX}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"MNIST folder {path} does not exist: {FIX}")
    return path


def find_idx_file(data_dir: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``data_dir`` (the uncompressed file wins if both are there)."""
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {stem}[.gz] not found in {data_dir}: {FIX}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'IDX'} ({error}); "
                        "replace it with an original copy") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one IDX file of unsigned bytes, checking its magic number and that its size matches."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: truncated header ({len(data)} bytes); replace it with an original copy")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: magic number {found:#010x}, expected {magic:#010x}; is this the right file?")
    shape = struct.unpack(">" + "I" * ndim, data[4:header_size])
    expected = int(np.prod(shape))
    if len(data) - header_size != expected:
        raise DataError(
            f"{path}: {len(data) - header_size} bytes of data, the header promises {expected} "
            "(truncated or corrupt); replace it with an original copy"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_mnist(data_dir: str | os.PathLike | None, split: str) -> Dataset:
    """The 'train' (60,000) or 'test' (10,000) split, as float32 images in [0, 1] and int64 labels."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {list(MNIST_FILES)}, got {split!r}")
    folder = resolve_data_dir(data_dir)
    image_stem, label_stem = MNIST_FILES[split]
    image_path, label_path = find_idx_file(folder, image_stem), find_idx_file(folder, label_stem)
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[1:] != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise DataError(f"{image_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DataError(f"{label_path}: label {labels.max()} is not a digit 0-9")
    if len(images) != MNIST_COUNTS[split]:
        raise DataError(f"{image_path}: {len(images)} images, the {split} split has {MNIST_COUNTS[split]}")
    return Dataset(to_float_images(images), labels.astype(np.int64))


def to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1] (not normalised: the decoder ends in a sigmoid)."""
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


def shift_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT_PIXELS) -> np.ndarray:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with zeros."""
    count, channels, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(2, 3))
    offsets = rng.integers(0, 2 * max_shift + 1, size=(2, count))
    return np.ascontiguousarray(windows[np.arange(count), :, offsets[0], offsets[1]])


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    rng: np.random.Generator,
    shuffle: bool = True,
    augment: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of one epoch (the last one may be smaller), shuffled and shifted when asked."""
    order = rng.permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        images = dataset.images[index]
        yield (shift_images(images, rng) if augment else images), dataset.labels[index]


def synthetic_batch(config: CapsNetConfig, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded batch of uniform [0, 1] images and random labels, for runs that need no data."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, *config.input_shape), dtype=np.float32)
    labels = rng.integers(0, config.num_classes, size=batch_size, dtype=np.int64)
    return images, labels
