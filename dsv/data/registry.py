"""Datasets by name: :class:`DataConfig` in, :class:`~dsv.data.core.ImageDataset` out.

=================  =========================================================================
name               source
=================  =========================================================================
``fashion_mnist``  IDX files: ``<root>/fashion_mnist/``, ``<root>/``, ``<root>/FashionMNIST/raw/``,
                   then Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install
                   dataset-fashion-mnist``); torchvision download only with ``download=True``.
``mnist``          IDX files: ``<root>/mnist/``, ``<root>/``, ``<root>/MNIST/raw/``; download as above.
``cifar10``        torchvision's pickle batches ``<root>/[cifar10/]cifar-10-batches-py/``.
``cifar100``       torchvision's pickle batches ``<root>/[cifar100/]cifar-100-python/``.
``imagefolder``    ``<root>/train/<class>/*.png|jpg|jpeg`` and ``<root>/test/<class>/...`` (any sizes with
                   ``image_size``; grayscale or RGB; ``max_per_class`` caps large folders).
``tabular``        ``root`` = a CSV or Parquet file, ``label`` = its label column, ``features`` = the
                   numeric feature columns (default: all others); (N, D) features in their own units.
``digits``         scikit-learn's bundled 8x8 digits as (1, 8, 8) images; fixed stratified 80/20 split.
``photos``         crops of the two photographs bundled with scikit-learn (``load_sample_images``: a temple
                   in China, a flower) as (3, 32, 32) RGB images, classes = the photo; a natural-image pool
                   for 0-shot initialisation that needs no download (1000 train / 200 test crops, fixed seed).
``moons``          scikit-learn ``make_moons``, 2 classes, (N, 2) standardised features.
``blobs``          scikit-learn ``make_blobs``, 3 classes, (N, 2) standardised features.
=================  =========================================================================

The generated and bundled sets (digits, photos, moons, blobs) use a fixed data seed, so their test split
never changes; ``DataConfig.seed`` only picks the per-class subsets. Channel mean/std are computed
on the *full* training split before subsetting, so a smoke run on a subset normalises like the
full run does.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dsv.data.core import ImageDataset, channel_stats, per_class_indices, subset_per_class
from dsv.data.readers import (
    CIFAR_LAYOUT,
    IDX_FILES,
    SplitTensors,
    find_idx_files,
    has_cifar_files,
    read_cifar,
    read_idx_dataset,
    read_imagefolder,
    read_tabular,
    resize_images,
)

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

# System-wide install locations searched after the configured root (module-level so tests can
# point them elsewhere).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (),
}

# torchvision's class and the raw folder it downloads into, per IDX dataset.
_TORCHVISION_IDX: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "mnist": ("MNIST", "MNIST/raw"),
}
_TORCHVISION_CIFAR: dict[str, str] = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}

_HOW_TO_GET: dict[str, str] = {
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), copy the four IDX "
    "files into one of those folders, or set download: true",
    "mnist": "copy the four IDX files into one of those folders, or set download: true",
    "cifar10": "extract cifar-10-python.tar.gz into the root, or set download: true",
    "cifar100": "extract cifar-100-python.tar.gz into the root, or set download: true",
}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how much of it.

    Attributes:
        name: one of :data:`DATASET_NAMES`.
        root: folder searched for the files (and where downloads go).
        n_per_class: keep this many training samples per class (seeded); None keeps all.
        test_per_class: keep this many test samples per class (seeded); None keeps all.
        seed: seed of the per-class subsets.
        download: let torchvision download MNIST/Fashion-MNIST/CIFAR when no local copy is found.
        image_size: imagefolder: resize (shorter side, antialiased) and center-crop every image to this
            size, an int (square) or [H, W]; None requires one common size.
        channels: imagefolder: 1 (grayscale) or 3 (RGB); None = grayscale when every image is.
        max_per_class: imagefolder and tabular: read at most this many images (rows) per class and split,
            chosen with ``seed`` before decoding (for large folders); None reads all.
        label: tabular: the label column.
        features: tabular: the feature columns (numeric, complete); None = every column but the label.
        test_fraction: tabular: per-class share of the rows held out as the test split (stratified,
            seeded with ``seed``).
    """

    name: str = "fashion_mnist"
    root: str = "data"
    n_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    download: bool = False
    image_size: int | tuple[int, int] | None = None
    channels: int | None = None
    max_per_class: int | None = None
    label: str | None = None
    features: tuple[str, ...] | None = None
    test_fraction: float = 0.2

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """``image_size`` as (H, W)."""
        if self.image_size is None:
            return None
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)  # type: ignore[return-value]

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            hint = difflib.get_close_matches(self.name, DATASET_NAMES, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"name = {self.name!r} is not one of {', '.join(DATASET_NAMES)}{extra}")
        for key in ("n_per_class", "test_per_class", "max_per_class"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{key} must be >= 1 or null, got {v}")
        hw = self.image_hw
        if hw is not None and (len(hw) != 2 or min(hw) < 1):
            raise ValueError(f"image_size must be a positive int or [H, W], got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null, got {self.channels}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.name == "tabular" and not self.label:
            raise ValueError("label must name the label column of the tabular file (root)")
        image_only = [k for k in ("image_size", "channels") if getattr(self, k) is not None]
        if image_only and self.name != "imagefolder":
            raise ValueError(f"{image_only[0]} applies to name 'imagefolder' only (name is {self.name!r})")
        tab_only = [k for k in ("label", "features") if getattr(self, k) is not None]
        if tab_only and self.name != "tabular":
            raise ValueError(f"{tab_only[0]} applies to name 'tabular' only (name is {self.name!r})")


# ----------------------------------------------------------------------------------- IDX datasets


def _idx_search_dirs(name: str, root: Path) -> list[Path]:
    return [root / name, root, root / _TORCHVISION_IDX[name][1], *SYSTEM_DIRS.get(name, ())]


def _not_found(name: str, looked: list[str], download_error: Exception | None = None) -> FileNotFoundError:
    where = "\n  ".join(looked)
    how = _HOW_TO_GET[name]
    if download_error is not None:  # download was already on: only the manual routes are left
        how = how.replace(", or set download: true", "").replace(" or set download: true", "")
    msg = f"dataset {name!r}: files not found. Looked in:\n  {where}\nTo get the data: {how}."
    if download_error is not None:
        msg += f"\nThe download failed: {type(download_error).__name__}: {download_error}"
    return FileNotFoundError(msg)


def _load_idx(cfg: DataConfig) -> tuple[SplitTensors, str]:
    root = Path(cfg.root)
    dirs = _idx_search_dirs(cfg.name, root)
    for d in dirs:
        files = find_idx_files(d)
        if files is not None:
            return read_idx_dataset(files), str(d)
    looked = [f"{d}/ ({', '.join(s + '[.gz]' for s in IDX_FILES.values())})" for d in dirs]
    if not cfg.download:
        raise _not_found(cfg.name, looked)
    tv_class, raw = _TORCHVISION_IDX[cfg.name]
    try:
        import torchvision.datasets as tvd  # lazy: only for downloads

        for train in (True, False):
            getattr(tvd, tv_class)(root=str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types; report whichever happened
        raise _not_found(cfg.name, looked, e) from e
    files = find_idx_files(root / raw)
    if files is None:
        raise _not_found(cfg.name, [*looked, f"{root / raw}/ (after download)"])
    return read_idx_dataset(files), str(root / raw)


def _load_fashion(cfg: DataConfig) -> tuple[SplitTensors, str]:
    s, src = _load_idx(cfg)
    return SplitTensors(s.train_x, s.train_y, s.test_x, s.test_y, FASHION_CLASSES), src


def _load_mnist(cfg: DataConfig) -> tuple[SplitTensors, str]:
    s, src = _load_idx(cfg)
    return SplitTensors(s.train_x, s.train_y, s.test_x, s.test_y, DIGIT_CLASSES), src


# --------------------------------------------------------------------------------- CIFAR datasets


def _load_cifar(cfg: DataConfig) -> tuple[SplitTensors, str]:
    root = Path(cfg.root)
    folder = CIFAR_LAYOUT[cfg.name]["folder"]
    dirs = [root / folder, root / cfg.name / folder]
    for d in dirs:
        if has_cifar_files(d, cfg.name):
            return read_cifar(d, cfg.name), str(d)
    lay = CIFAR_LAYOUT[cfg.name]
    files = ", ".join([*lay["train"], *lay["test"], lay["meta"]])
    looked = [f"{d}/ ({files})" for d in dirs]
    if not cfg.download:
        raise _not_found(cfg.name, looked)
    try:
        import torchvision.datasets as tvd  # lazy: only for downloads

        getattr(tvd, _TORCHVISION_CIFAR[cfg.name])(root=str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types; report whichever happened
        raise _not_found(cfg.name, looked, e) from e
    return read_cifar(root / folder, cfg.name), str(root / folder)


# ----------------------------------------------------------------------------------- ImageFolder


def _load_imagefolder(cfg: DataConfig) -> tuple[SplitTensors, str]:
    root = Path(cfg.root)
    return read_imagefolder(root, cfg.image_hw, cfg.channels, cfg.max_per_class, cfg.seed), str(root)


def _load_tabular(cfg: DataConfig) -> tuple[SplitTensors, str]:
    assert cfg.label is not None  # DataConfig checks it
    path = Path(cfg.root)
    return read_tabular(path, cfg.label, cfg.features, cfg.test_fraction, _DATA_SEED, cfg.max_per_class), str(path)


# ---------------------------------------------------------------------- bundled / generated sets

_DATA_SEED = 0  # fixed: the test split of generated/bundled sets never depends on DataConfig.seed


def _stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Per-class random split of indices into (train, test), both sorted."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = round(idx.numel() * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _load_digits(cfg: DataConfig) -> tuple[SplitTensors, str]:
    # scikit-learn's bundled file, read as load_digits reads it (64 pixel columns and the label) without importing
    # scikit-learn: its import was a large share of a Fashion-MNIST prepare stage (the 0-shot pool is digits).
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset 'digits' is bundled with scikit-learn, which is not installed "
                                "(pip install scikit-learn)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"dataset 'digits': scikit-learn's bundled file {path} is missing")
    data = np.loadtxt(path, delimiter=",")  # (1797, 65) float64, as load_digits reads it
    x = torch.from_numpy(data[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(data[:, -1].astype(np.int64))
    tr, te = _stratified_split(y, 0.2, _DATA_SEED)
    return SplitTensors(x[tr], y[tr], x[te], y[te], DIGIT_CLASSES), "sklearn.datasets.load_digits"


def _load_photos(cfg: DataConfig) -> tuple[SplitTensors, str]:
    from sklearn.datasets import load_sample_images  # lazy: two JPEGs inside scikit-learn's wheel

    photos = load_sample_images()
    g = torch.Generator().manual_seed(_DATA_SEED)
    xs, ys = [], []
    for k, img in enumerate(photos.images):
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        h, w = t.shape[-2:]
        for _ in range(600):
            side = int(torch.randint(32, min(h, w) // 2 + 1, (1,), generator=g))
            top = int(torch.randint(0, h - side + 1, (1,), generator=g))
            left = int(torch.randint(0, w - side + 1, (1,), generator=g))
            crop = t[:, top:top + side, left:left + side].unsqueeze(0)
            xs.append(torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True,
                                                      align_corners=False)[0].clamp(0, 1))
            ys.append(k)
    x, y = torch.stack(xs), torch.tensor(ys)
    tr, te = _stratified_split(y, 1 / 6, _DATA_SEED)
    names = tuple(Path(f).stem for f in photos.filenames)
    return SplitTensors(x[tr], y[tr], x[te], y[te], names), "sklearn.datasets.load_sample_images (random crops)"


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    to_t = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return to_t(train), to_t(test)


def _load_moons(cfg: DataConfig) -> tuple[SplitTensors, str]:
    from sklearn.datasets import make_moons  # lazy

    xtr, ytr = make_moons(n_samples=1000, noise=0.15, random_state=_DATA_SEED)
    xte, yte = make_moons(n_samples=1000, noise=0.15, random_state=_DATA_SEED + 1)
    a, b = _standardise(xtr, xte)
    y = lambda v: torch.from_numpy(np.asarray(v, dtype=np.int64))  # noqa: E731
    return SplitTensors(a, y(ytr), b, y(yte), ("moon_0", "moon_1")), "sklearn.datasets.make_moons"


def _load_blobs(cfg: DataConfig) -> tuple[SplitTensors, str]:
    from sklearn.datasets import make_blobs  # lazy

    # Train and test from one call so both share the blob centres.
    x, y = make_blobs(n_samples=1800, centers=3, n_features=2, cluster_std=1.5, random_state=_DATA_SEED)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    tr, te = _stratified_split(yt, 0.5, _DATA_SEED)
    a, b = _standardise(x[tr.numpy()], x[te.numpy()])
    return SplitTensors(a, yt[tr], b, yt[te], ("blob_0", "blob_1", "blob_2")), "sklearn.datasets.make_blobs"


_LOADERS: dict[str, Callable[[DataConfig], tuple[SplitTensors, str]]] = {
    "fashion_mnist": _load_fashion,
    "mnist": _load_mnist,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "imagefolder": _load_imagefolder,
    "tabular": _load_tabular,
    "digits": _load_digits,
    "photos": _load_photos,
    "moons": _load_moons,
    "blobs": _load_blobs,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load a dataset by name, optionally keeping a seeded per-class subset.

    Args:
        cfg: dataset name, where to look, subset sizes and seed.

    Returns:
        :class:`ImageDataset` with images in [0, 1] (or standardised features for the toy sets),
        class names, and per-channel mean/std of the full training split.
        ``meta`` records the load time, the subset sizes and the full split sizes.

    Raises:
        ValueError: unknown name (raised by :class:`DataConfig`), corrupt files (naming the file),
            or a subset larger than a class.
        FileNotFoundError: data not found; the message lists every place searched and how to get it.
    """
    t0 = time.perf_counter()
    s, source = _LOADERS[cfg.name](cfg)
    classes = s.classes or tuple(str(i) for i in range(int(s.train_y.max()) + 1))
    mean, std = channel_stats(s.train_x)
    ds = ImageDataset(
        name=cfg.name,
        train_x=s.train_x,
        train_y=s.train_y,
        test_x=s.test_x,
        test_y=s.test_y,
        classes=classes,
        mean=mean,
        std=std,
        source=source,
        features=s.features,
        meta={"full_train": str(s.train_y.numel()), "full_test": str(s.test_y.numel())},
    )
    if cfg.n_per_class is not None:
        ds = subset_per_class(ds, cfg.n_per_class, cfg.seed)
    if cfg.test_per_class is not None:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = per_class_indices(ds.test_y, cfg.test_per_class, ds.num_classes, g)
        ds = replace(ds, test_x=ds.test_x[idx], test_y=ds.test_y[idx])
    ds.meta["load_seconds"] = f"{time.perf_counter() - t0:.3f}"
    return ds


__all__ = ["DATASET_NAMES", "DataConfig", "load_dataset", "resize_images"]
