"""Readers for the on-disk formats the registry supports, plus a tensor resize helper.

Every reader returns plain tensors; :mod:`dsv.data.registry` turns them into an
:class:`~dsv.data.core.ImageDataset`. Optional dependencies (PIL for image folders) are imported
lazily inside the reader that needs them, so ``import dsv`` stays torch/numpy/stdlib only.

Formats:
* IDX (MNIST / Fashion-MNIST), gzipped or raw: parsed with numpy, magic number and size checked.
* CIFAR-10/100 "python version" pickle batches: read with a restricted unpickler that can only
  rebuild dicts/lists/bytes/str/numbers and numpy arrays, never call arbitrary globals.
* ImageFolder trees: ``<split>/<class>/*.png|jpg|jpeg``.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------- IDX

# Third byte of an IDX magic number -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into a numpy array.

    The IDX header is two zero bytes, a dtype code, the number of dimensions, then one big-endian
    int32 per dimension; the payload must hold exactly prod(dims) items.

    Args:
        path: file path; gzip is detected from its magic bytes, not the suffix.

    Returns:
        Array of shape ``dims`` in native byte order (uint8 for MNIST-style files).

    Raises:
        ValueError: when the file is truncated, not gzip-decodable, or has a bad header; the
            message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncation raises EOFError
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim < 1:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}; expected 0000 + dtype code "
            f"{'/'.join(f'{c:02x}' for c in _IDX_DTYPES)} + number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        raise ValueError(
            f"{path}: IDX payload is {payload} bytes but the header {dims} of {dtype} needs {expected}"
            " (truncated or corrupt file)"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# IDX file stems of the MNIST family; each may be stored with or without ".gz".
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four MNIST-family IDX files in ``directory`` (``.gz`` preferred), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


@dataclass(frozen=True)
class SplitTensors:
    """Raw train/test tensors as read from disk (images float32 in [0, 1])."""

    train_x: Tensor  # (N, C, H, W)
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, C, H, W)
    test_y: Tensor  # (M,) int64
    classes: tuple[str, ...] | None = None
    features: tuple[str, ...] = ()  # tabular data: the feature column names


def _idx_images(path: Path) -> Tensor:
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images of shape (N, H, W), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).unsqueeze(1).float().div_(255.0)  # (N, 1, H, W)


def _idx_labels(path: Path, n: int, images: Path) -> Tensor:
    arr = read_idx(path)
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected 1-D labels, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{path}: {arr.shape[0]} labels but {images} holds {n} images")
    return torch.from_numpy(arr.astype(np.int64))


def read_idx_dataset(files: dict[str, Path]) -> SplitTensors:
    """Read the four IDX files found by :func:`find_idx_files`.

    Returns:
        :class:`SplitTensors` with (N, 1, H, W) images in [0, 1] and int64 labels.
    """
    train_x = _idx_images(files["train_images"])
    test_x = _idx_images(files["test_images"])
    train_y = _idx_labels(files["train_labels"], train_x.shape[0], files["train_images"])
    test_y = _idx_labels(files["test_labels"], test_x.shape[0], files["test_images"])
    return SplitTensors(train_x, train_y, test_x, test_y)


# ------------------------------------------------------------------------------------------- CIFAR

# A CIFAR batch is a dict of lists, ints, strings and numpy arrays of plain numbers. The unpickler
# never lets pickle construct a numpy object: the globals a batch names (numpy 1.x pickles name
# numpy.core, numpy 2.x numpy._core; protocol 5 uses _frombuffer, older ones _reconstruct; protocol 2
# stores bytes through _codecs.encode) are replaced by inert stubs that only *record* their arguments,
# and :func:`_materialise` builds the arrays afterwards with np.frombuffer, after checking the dtype
# (plain numeric kinds only: an object dtype over raw bytes would be read as pointers) and that the
# byte count matches the shape. Everything else (builtins included) is refused.
_PLAIN_DTYPES = frozenset(f"{k}{n}" for k, ns in (("u", (1, 2, 4, 8)), ("i", (1, 2, 4, 8)), ("f", (2, 4, 8)),
                                                 ("b", (1,))) for n in ns)
_MAX_ARRAY_BYTES = 1 << 31


class _DtypeStub:
    """What ``numpy.dtype(name, align, copy)`` + BUILD recorded: the type name and byte order."""

    def __init__(self, name: Any = None, *_: Any) -> None:
        self.name, self.order = name, "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]
        else:
            raise pickle.UnpicklingError("refused a numpy dtype with a non-plain state")


class _ArrayStub:
    """What ``_reconstruct`` + BUILD (or ``_frombuffer``) recorded: shape, dtype, order, raw bytes."""

    def __init__(self, *_: Any) -> None:
        self.state: tuple[Any, ...] | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused an ndarray with a non-plain state")
        self.state = (state[1], state[2], bool(state[3]), state[4])


class _ScalarStub:
    def __init__(self, dtype: Any, raw: Any) -> None:
        self.state = ((), dtype, False, raw)


def _frombuffer_stub(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    stub = _ArrayStub()
    stub.state = (shape, dtype, order == "F", buf)
    return stub


def _encode_stub(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode with anything but (str, 'latin1')")
    return text.encode("latin1")


_STUBS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _encode_stub,
    **{(f"{mod}.multiarray", "_reconstruct"): _ArrayStub for mod in ("numpy.core", "numpy._core")},
    **{(f"{mod}.multiarray", "scalar"): _ScalarStub for mod in ("numpy.core", "numpy._core")},
    **{(f"{mod}.numeric", "_frombuffer"): _frombuffer_stub for mod in ("numpy.core", "numpy._core")},
}


def _plain_array(stub: _ArrayStub | _ScalarStub) -> np.ndarray:
    if stub.state is None:
        raise pickle.UnpicklingError("refused an ndarray that was never given its data")
    shape, dtype, fortran, raw = stub.state
    if not isinstance(dtype, _DtypeStub) or dtype.name not in _PLAIN_DTYPES:
        name = getattr(dtype, "name", type(dtype).__name__)
        raise pickle.UnpicklingError(f"refused an array of dtype {name!r}: only plain numeric arrays are allowed")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"refused an array with shape {shape!r}")
    if isinstance(raw, pickle.PickleBuffer):
        raw = raw.raw()
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise pickle.UnpicklingError(f"refused array data of type {type(raw).__name__}")
    dt = np.dtype(dtype.name).newbyteorder(dtype.order if dtype.order in "<>" else "=")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dt.itemsize > _MAX_ARRAY_BYTES or len(raw) != count * dt.itemsize:
        raise pickle.UnpicklingError(f"array data has {len(raw)} bytes, shape {shape} of {dt} needs {count * dt.itemsize}")
    arr = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()
    return arr if shape else arr.reshape(())[()]


def _materialise(obj: Any, depth: int = 0) -> Any:
    """Replace the stubs by validated numpy arrays; only dicts, lists, tuples, str, bytes, numbers, None."""
    if depth > 32:
        raise pickle.UnpicklingError("refused a pickle nested deeper than 32 levels")
    if isinstance(obj, _ArrayStub | _ScalarStub):
        return _plain_array(obj)
    if isinstance(obj, dict):
        return {_materialise(k, depth + 1): _materialise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_materialise(v, depth + 1) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    raise pickle.UnpicklingError(f"refused a {type(obj).__name__} object in a CIFAR batch")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that constructs nothing but builtin containers and inert stubs (see above).

    Plain ``pickle.load`` runs whatever callable the file names (``os.system`` included), and even
    numpy's own array constructors can be made to read raw bytes as object pointers; this one only
    records what the file says and lets :func:`_materialise` build checked numeric arrays.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STUBS:
            return _STUBS[(module, name)]
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: a CIFAR batch only contains dicts, lists and numpy arrays"
        )


def safe_unpickle(path: str | Path) -> Any:
    """Load a pickle with the restricted unpickler (``latin1`` for Python-2 era CIFAR files).

    Raises:
        ValueError: naming the file, when it is not a pickle, names a forbidden global, or holds anything
            but plain numeric arrays, lists, dicts, numbers and strings.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _materialise(_RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load())
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _names(values: Any, path: Path, key: str) -> tuple[str, ...]:
    if not isinstance(values, list | tuple):
        raise ValueError(f"{path}: {key!r} should be a list of class names, got {type(values).__name__}")
    return tuple(v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values)


def _cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    d = _str_keys(safe_unpickle(path), path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: CIFAR batch needs keys 'data' and {label_key!r}, found {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(d[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    x = torch.from_numpy(data.copy()).view(-1, 3, 32, 32).float().div_(255.0)  # (N, 3, 32, 32)
    return x, torch.from_numpy(labels)


# Torchvision's directory layout of the "python version" archives.
CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
    },
}


def has_cifar_files(directory: Path, name: str) -> bool:
    """Whether ``directory`` holds every batch and the meta file of ``name`` (cifar10/cifar100)."""
    lay = CIFAR_LAYOUT[name]
    return all((directory / f).is_file() for f in [*lay["train"], *lay["test"], lay["meta"]])


def read_cifar(directory: Path, name: str) -> SplitTensors:
    """Read torchvision's CIFAR-10/100 pickle batches from ``directory``.

    Args:
        directory: the ``cifar-10-batches-py`` or ``cifar-100-python`` folder.
        name: "cifar10" or "cifar100".

    Returns:
        :class:`SplitTensors` with (N, 3, 32, 32) images in [0, 1] and class names from the meta file.
    """
    lay = CIFAR_LAYOUT[name]
    parts = [_cifar_batch(directory / f, lay["label_key"]) for f in lay["train"]]
    test_x, test_y = _cifar_batch(directory / lay["test"][0], lay["label_key"])
    meta_path = directory / lay["meta"]
    meta = _str_keys(safe_unpickle(meta_path), meta_path)
    if lay["names_key"] not in meta:
        raise ValueError(f"{meta_path}: missing {lay['names_key']!r}, found {sorted(meta)}")
    classes = _names(meta[lay["names_key"]], meta_path, lay["names_key"])
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(f"{directory}: {split} labels outside [0, {len(classes)}) of {meta_path}")
    return SplitTensors(train_x, train_y, test_x, test_y, classes)


# ------------------------------------------------------------------------------------- ImageFolder

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _list_images(split_dir: Path) -> list[tuple[Path, str]]:
    items = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append((f, class_dir.name))
    return items


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image); never retried as IO."""


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageDecodeError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def _decode(path: Path, mode: str) -> np.ndarray:
    """The pixels of one image file in ``mode``; a truncated or corrupt file is an error naming it."""
    try:
        with _open_image(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: "Truncated File Read", "broken data stream", ...
        raise ImageDecodeError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _fit(im: Any, size: tuple[int, int]) -> Any:
    """Resize (shorter side first, antialiased) and center-crop a PIL image to (H, W), with torchvision."""
    from torchvision.transforms.v2 import functional as TF

    h, w = size
    scale = max(h / im.height, w / im.width)
    im = TF.resize(im, [max(h, round(im.height * scale)), max(w, round(im.width * scale))], antialias=True)
    return TF.center_crop(im, [h, w])


def _decode_fitted(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """:func:`_decode`, resized and center-cropped to ``size`` (H, W) when given."""
    if size is None:
        return _decode(path, mode)
    try:
        with _open_image(path) as im:
            return np.asarray(_fit(im.convert(mode), size), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _cap(items: list[tuple[Path, str]], per_class: int | None, seed: int) -> list[tuple[Path, str]]:
    """At most ``per_class`` files of every class, chosen seeded, in their listed order."""
    if per_class is None:
        return items
    g = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, (_, c) in enumerate(items):
        by_class.setdefault(c, []).append(i)
    keep: list[int] = []
    for idx in by_class.values():
        keep += idx if len(idx) <= per_class else sorted(g.choice(idx, per_class, replace=False).tolist())
    return [items[i] for i in sorted(keep)]


def read_imagefolder(
    root: Path,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> SplitTensors:
    """Read a ``root/train/<class>/*.png|jpg|jpeg`` + ``root/test/<class>/...`` tree.

    Classes are the sorted sub-folder names of ``train``; ``test`` may use any subset of them.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        image_size: (H, W) every image is resized to (shorter side first, antialiased) and center-cropped
            to, with torchvision's transforms; None requires all images to share one size.
        channels: 1 (grayscale) or 3 (RGB); None = 1 when every image is grayscale, else 3.
        max_per_class: read at most this many files per class and split (chosen with ``seed`` before
            anything is decoded); None reads all.
        seed: seed of the per-class choice.
        workers: decoding threads (PIL releases the GIL while decoding); None = min(8, CPU count).

    Returns:
        :class:`SplitTensors` with (N, C, H, W) images in [0, 1].

    Raises:
        FileNotFoundError: when a split folder is missing or holds no images.
        ImageDecodeError: an undecodable or truncated file, naming it.
        ValueError: images of different sizes without ``image_size`` (naming the odd file), or a test class
            without a train folder.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    splits: dict[str, list[tuple[Path, str]]] = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(f"imagefolder: no {split!r} folder at {d}; expected {d}/<class>/*.png|jpg")
        splits[split] = _cap(_list_images(d), max_per_class, seed)
        if not splits[split]:
            raise FileNotFoundError(
                f"imagefolder: {d} has no images; expected {d}/<class>/*{'|*'.join(IMAGE_SUFFIXES)}"
            )
    classes = tuple(sorted({c for _, c in splits["train"]}))
    unknown = sorted({c for _, c in splits["test"]} - set(classes))
    if unknown:
        raise ValueError(f"imagefolder: test classes {unknown} have no train folder under {root / 'train'}")
    if channels not in (None, 1, 3):
        raise ValueError(f"imagefolder: channels must be 1, 3 or null, got {channels}")

    # Pass 1: headers only (PIL reads pixel data lazily) to choose the mode and check the size.
    size: tuple[int, int] | None = None
    first: Path | None = None
    gray = True
    for f, _ in splits["train"] + splits["test"]:
        with _open_image(f) as im:
            if size is None:
                size, first = im.size, f
            elif im.size != size and image_size is None:
                raise ValueError(
                    f"imagefolder: {f} is {im.size[0]}x{im.size[1]} (WxH) but {first} is "
                    f"{size[0]}x{size[1]}; set the data config's image_size to resize every image to one size"
                )
            gray = gray and im.mode in _GRAY_MODES
    if channels is not None:
        gray = channels == 1
    mode = "L" if gray else "RGB"

    index = {c: i for i, c in enumerate(classes)}
    n_workers = workers or min(8, os.cpu_count() or 1)
    out: list[Tensor] = []
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for split in ("train", "test"):
            arrays = list(pool.map(lambda f: _decode_fitted(f, mode, image_size), [f for f, _ in splits[split]]))
            x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
            x = x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
            y = torch.tensor([index[c] for _, c in splits[split]], dtype=torch.long)
            out += [x, y]
    return SplitTensors(out[0], out[1], out[2], out[3], classes)


# ------------------------------------------------------------------------------------------ tabular

TABULAR_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")


def _read_table(path: Path) -> Any:
    """The file as a pyarrow Table: columns are read as plain Arrow arrays (no pandas metadata is interpreted,
    no extension type is deserialised)."""
    import pyarrow as pa

    if not path.is_file():
        raise FileNotFoundError(f"tabular: file {str(path)!r} not found (the data config's root names the CSV or "
                                f"Parquet file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"tabular: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    raise ValueError(f"tabular: {path} is not a {' or '.join(TABULAR_SUFFIXES)} file")


def read_tabular(path: Path, label: str, features: tuple[str, ...] | None = None, test_fraction: float = 0.2,
                 seed: int = 0, max_per_class: int | None = None) -> SplitTensors:
    """Read a CSV or Parquet table as (N, D) float32 features in their original units and integer labels.

    Args:
        path: the file.
        label: the label column (any type; classes are its distinct values, sorted).
        features: the feature columns; None = every other column. Each must be numeric (or boolean) and
            complete (no missing values).
        test_fraction: per-class share of rows held out as the test split (stratified, seeded).
        seed: seed of that split and of the ``max_per_class`` choice.
        max_per_class: keep at most this many rows per class (before the split).

    Raises:
        ValueError: a missing or duplicated column, a non-numeric or incomplete feature column (naming it), an
            empty label (naming its row), fewer than two rows in a class.
    """
    import pyarrow as pa

    table = _read_table(path)
    names = list(table.column_names)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tabular: {path} has duplicate column name(s) {dupes}; every column needs its own name")
    if label not in names:
        raise ValueError(f"tabular: label column {label!r} is not in {path}; its columns: {', '.join(names)}")
    cols = list(features) if features else [c for c in names if c != label]
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"tabular: feature column(s) {missing} are not in {path}; its columns: {', '.join(names)}")
    if not cols:
        raise ValueError(f"tabular: {path} has no feature column besides the label {label!r}")
    arrays = []
    for name in cols:
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise ValueError(f"tabular: feature column {name!r} of {path} is {col.type}, not numeric; encode it or "
                             "leave it out of the data config's features")
        if col.null_count:
            raise ValueError(f"tabular: feature column {name!r} of {path} has {col.null_count} missing value(s)")
        values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"tabular: feature column {name!r} of {path} has NaN or infinite values")
        arrays.append(values)
    x = torch.from_numpy(np.stack(arrays, axis=1).astype(np.float32))
    raw = table.column(label).to_pylist()
    # A CSV reader gives an empty cell of a text column as "", not as a missing value.
    empty = [i for i, v in enumerate(raw) if v is None or (isinstance(v, str) and not v.strip())]
    if empty:
        where = f"row {empty[0] + 1}" + (f" (line {empty[0] + 2} with the header)" if path.suffix.lower() == ".csv"
                                         else "")
        more = f" and {len(empty) - 1} more row(s)" if len(empty) > 1 else ""
        raise ValueError(f"tabular: label column {label!r} of {path} is empty in {where}{more}; every row needs a "
                         "label")
    distinct = sorted(set(raw), key=lambda v: (not isinstance(v, int | float), v if isinstance(v, int | float) else str(v)))
    index = {v: i for i, v in enumerate(distinct)}
    y = torch.tensor([index[v] for v in raw], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in range(len(distinct)):
        idx = (y == cls).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        if idx.numel() < 2:
            raise ValueError(f"tabular: class {distinct[cls]!r} of {path} has {idx.numel()} row(s); every class "
                             "needs at least one training and one test row")
        k = min(max(1, round(idx.numel() * test_fraction)), idx.numel() - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = torch.cat(train).sort().values, torch.cat(test).sort().values
    return SplitTensors(x[tr], y[tr], x[te], y[te], tuple(str(v) for v in distinct), tuple(cols))


# ------------------------------------------------------------------------------------------ resize

# ITU-R BT.601 luma weights, as PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


def resize_images(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Convert images to a target (C, H, W): grayscale <-> RGB, then bilinear resize.

    Used to initialise candidates of one dataset from another (e.g. 8x8 digits -> 28x28).

    Args:
        x: (N, C, H, W) images in [0, 1], C in {1, 3}.
        shape: target (C', H', W'), C' in {1, 3}.

    Returns:
        (N, C', H', W') float images in [0, 1] (antialiased when shrinking).

    Raises:
        ValueError: for non-4-D input or channel counts other than 1 and 3 that differ.
    """
    if x.dim() != 4:
        raise ValueError(f"resize_images expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    c_out, h_out, w_out = shape
    c_in = x.shape[1]
    if c_in != c_out:
        if c_in == 1 and c_out == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c_in == 3 and c_out == 1:
            w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"resize_images: cannot convert {c_in} channels to {c_out} (only 1 <-> 3)")
    if tuple(x.shape[-2:]) != (h_out, w_out):
        shrink = h_out < x.shape[-2] or w_out < x.shape[-1]
        x = F.interpolate(x, size=(h_out, w_out), mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp(0.0, 1.0).contiguous()
