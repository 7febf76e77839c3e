"""training.data: real offline datasets load right; user files round-trip; errors are clear."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetError,
    ImageSet,
    conform_images,
    load_dataset,
    read_idx,
    split_train_calibration,
)


def _one_line(error: pytest.ExceptionInfo[DatasetError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_fashion_folder(folder: Path, n: int, *, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The four official IDX files, tiny, with random content; returns the test split written."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        written[prefix] = (images, labels)
    return written["t10k"]


# --------------------------------------------------------------------------- real datasets


@pytest.fixture(scope="module")
def fashion_train() -> ImageSet:
    return load_dataset("fashion-mnist:train")


def test_fashion_mnist_train_is_the_real_60k(fashion_train: ImageSet) -> None:
    assert fashion_train.images.shape == (60000, 1, 28, 28)
    assert fashion_train.images.dtype == np.uint8
    assert fashion_train.labels is not None
    assert np.array_equal(np.bincount(fashion_train.labels), np.full(10, 6000))
    assert fashion_train.images.min() == 0 and fashion_train.images.max() == 255
    assert len(fashion_train.class_names) == 10


def test_fashion_mnist_test_is_t10k() -> None:
    test = load_dataset("fashion-mnist:test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == np.uint8
    assert test.labels is not None and set(np.unique(test.labels)) == set(range(10))
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))


def test_fashion_mnist_calibration_split_comes_from_the_train_file(fashion_train: ImageSet) -> None:
    train_idx, calib_idx = split_train_calibration(len(fashion_train), 5000, seed=0)
    calib = fashion_train.subset(calib_idx)
    assert len(calib) == 5000 and len(train_idx) == 55000
    assert calib.labels is not None and len(np.unique(calib.labels)) == 10


def test_mnist_has_5000_digits_of_all_classes_and_limit_is_a_random_sample() -> None:
    mnist = load_dataset("mnist")
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == np.uint8
    assert mnist.labels is not None
    assert np.array_equal(np.bincount(mnist.labels), np.full(10, 500))
    sample = load_dataset("mnist", limit=50, seed=3)
    assert sample.labels is not None and len(sample) == 50
    # The stored order is sorted by label: a prefix would be all zeros.
    assert len(np.unique(sample.labels)) >= 5
    assert np.array_equal(load_dataset("mnist", limit=50, seed=3).images, sample.images)
    assert not np.array_equal(load_dataset("mnist", limit=50, seed=4).images, sample.images)


def test_sklearn_digits_rescale_and_conform_to_28x28() -> None:
    native = load_dataset("sklearn-digits")
    assert native.images.shape == (1797, 1, 8, 8) and native.images.max() == 255
    digits = load_dataset("sklearn-digits", shape=(1, 28, 28), limit=20)
    assert digits.images.shape == (20, 1, 28, 28) and digits.images.dtype == np.uint8
    assert digits.labels is not None and len(np.unique(digits.labels)) > 1
    expected = Image.fromarray(native.images[0, 0]).resize((28, 28), Image.Resampling.BILINEAR)
    assert np.array_equal(
        load_dataset("sklearn-digits", shape=(1, 28, 28)).images[0, 0], np.asarray(expected)
    )


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_photos_conform(shape: tuple[int, int, int]) -> None:
    photos = load_dataset("photos", shape=shape)
    assert photos.images.shape == (len(photos), *shape) and len(photos) >= 5
    assert photos.images.dtype == np.uint8
    assert "chelsea" in photos.source
    assert photos.images.std() > 10  # real content, not blank


def test_conform_matches_pil_convert_then_resize() -> None:
    import skimage.data

    rgb = skimage.data.chelsea()
    images = rgb.transpose(2, 0, 1)[None]
    grey = conform_images(images, (1, 28, 28))[0, 0]
    expected = Image.fromarray(rgb).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    assert np.array_equal(grey, np.asarray(expected))
    noise = np.random.default_rng(0).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    luma = conform_images(noise.transpose(2, 0, 1)[None], (1, 60, 50))[0, 0]
    assert np.array_equal(luma, np.asarray(Image.fromarray(noise).convert("L")))
    colour = conform_images(images[:, :1], (3, 20, 24))
    assert colour.shape == (1, 3, 20, 24)
    assert np.array_equal(colour[:, 0], colour[:, 2])


# --------------------------------------------------------------------------- user files


def test_image_folder_round_trip_with_class_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 12, 10), dtype=np.uint8)
    for i, image in enumerate(pixels):
        folder = tmp_path / ("bags" if i < 3 else "shoes") / ("nested" if i == 5 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i}.png")
    loaded = load_dataset(f"folder:{tmp_path}")
    assert loaded.images.shape == (6, 1, 12, 10)
    assert loaded.class_names == ("bags", "shoes")
    assert loaded.labels is not None and loaded.labels.tolist() == [0, 0, 0, 1, 1, 1]
    by_label = {int(lab): [] for lab in loaded.labels}
    for image, label in zip(loaded.images, loaded.labels, strict=True):
        by_label[int(label)].append(image[0])
    for i, image in enumerate(pixels):
        assert any(np.array_equal(image, got) for got in by_label[0 if i < 3 else 1])
    # A bare path works, and a limited load is the same sample of the same pixels.
    assert load_dataset(str(tmp_path)).fingerprint() == loaded.fingerprint()
    sample = load_dataset(str(tmp_path), limit=4, seed=7)
    assert len(sample) == 4 and all(any(np.array_equal(s, x) for x in loaded.images) for s in sample.images)


def test_image_folder_colour_and_unlabelled(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (2, 9, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb[0]).save(tmp_path / "a.png")
    Image.fromarray(rgb[1]).save(tmp_path / "b.bmp")
    loaded = load_dataset(f"folder:{tmp_path}")
    assert loaded.labels is None
    assert np.array_equal(loaded.images, rgb.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "single-array"])
def test_npz_round_trip(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    channels = 1 if layout in ("NHW", "single-array") else 3
    expected = rng.integers(0, 256, (5, channels, 7, 6), dtype=np.uint8)
    labels = np.arange(5)
    path = tmp_path / "set.npz"
    if layout == "NHW":
        np.savez(path, images=expected[:, 0], labels=labels)
    elif layout == "NHWC":
        np.savez(path, images=expected.transpose(0, 2, 3, 1), labels=labels)
    elif layout == "NCHW":
        np.savez(path, images=expected, labels=labels)
    else:
        np.savez(path, expected[:, 0])
    loaded = load_dataset(f"npz:{path}")
    assert np.array_equal(loaded.images, expected)
    if layout == "single-array":
        assert loaded.labels is None
    else:
        assert loaded.labels is not None and loaded.labels.tolist() == labels.tolist()
    assert load_dataset(str(path)).fingerprint() == loaded.fingerprint()


def test_fashion_mnist_from_any_idx_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _write_fashion_folder(tmp_path / "plain", 4, compress=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "plain"))
    loaded = load_dataset("fashion-mnist:test")
    assert np.array_equal(loaded.images[:, 0], images) and loaded.labels is not None
    assert loaded.labels.tolist() == labels.tolist()
    images, _ = _write_fashion_folder(tmp_path / "gz", 3, compress=True)
    assert np.array_equal(load_dataset("fashion-mnist:test", data_dir=tmp_path / "gz").images[:, 0], images)


# --------------------------------------------------------------------------- splits and fingerprints


def test_split_is_disjoint_deterministic_and_seed_dependent() -> None:
    train, calib = split_train_calibration(1000, 0.1, seed=0)
    assert len(calib) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(calib.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, calib])), np.arange(1000))
    again_train, again_calib = split_train_calibration(1000, 0.1, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(calib, again_calib)
    assert not np.array_equal(split_train_calibration(1000, 0.1, seed=1)[1], calib)
    assert len(split_train_calibration(1000, 250, seed=0)[1]) == 250
    for bad in (0, 1000, 0.0, 1.0, True):
        with pytest.raises(DatasetError):
            split_train_calibration(1000, bad, seed=0)


def test_fingerprint_is_stable_and_follows_content() -> None:
    digits = load_dataset("sklearn-digits")
    assert digits.fingerprint() == load_dataset("sklearn-digits").fingerprint()
    assert len(digits.fingerprint()) == 64
    changed = digits.images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert ImageSet("x", changed).fingerprint() != digits.fingerprint()
    assert digits.subset(np.arange(len(digits))[::-1]).fingerprint() != digits.fingerprint()
    # Same bytes, other shape.
    assert ImageSet("x", digits.images.reshape(-1, 1, 4, 16)).fingerprint() != digits.fingerprint()


# --------------------------------------------------------------------------- errors


def test_missing_fashion_mnist_names_package_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetError) as error:
        load_dataset("fashion-mnist:train")
    message = _one_line(error)
    assert "dataset-fashion-mnist" in message and DATA_DIR_ENV in message and str(tmp_path) in message


def test_idx_with_bad_magic_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DatasetError) as error:
        read_idx(path)
    message = _one_line(error)
    assert str(path) in message and "magic" in message


def test_truncated_idx_is_reported(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(DatasetError) as error:
        read_idx(gz)
    assert str(gz) in _one_line(error) and "gzip" in str(error.value)
    plain = tmp_path / "short-idx3-ubyte"
    plain.write_bytes(data[:-5])
    with pytest.raises(DatasetError) as error:
        read_idx(plain)
    assert str(plain) in _one_line(error) and "truncated" in str(error.value)


def test_npz_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    wrong_ndim = tmp_path / "flat.npz"
    np.savez(wrong_ndim, images=np.zeros((4, 784), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        load_dataset(f"npz:{wrong_ndim}")
    assert str(wrong_ndim) in _one_line(error) and "ndim 2" in str(error.value)
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.full((2, 5, 5), 0.5))
    with pytest.raises(DatasetError) as error:
        load_dataset(f"npz:{floats}")
    assert str(floats) in _one_line(error) and "0..255" in str(error.value)
    no_images = tmp_path / "keys.npz"
    np.savez(no_images, a=np.zeros((2, 5, 5), np.uint8), b=np.zeros(2))
    with pytest.raises(DatasetError) as error:
        load_dataset(f"npz:{no_images}")
    assert str(no_images) in _one_line(error) and "images" in str(error.value)


def test_garbage_png_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError) as error:
        load_dataset(f"folder:{tmp_path}")
    assert str(bad) in _one_line(error)


def test_unknown_spec_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10")
    message = _one_line(error)
    assert "'cifar10'" in message
    assert all(name in message for name in DATASETS)
    with pytest.raises(DatasetError):
        load_dataset(str(tmp_path / "missing.npz"))
