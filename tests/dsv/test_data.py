"""Dataset registry and readers, on tiny files written here in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv.data import registry
from dsv.data.readers import read_idx, resize_images, safe_unpickle
from dsv.data.registry import DATASET_NAMES, DataConfig, load_dataset

# ----------------------------------------------------------------------------- writers (real formats)


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """Write ``arr`` (uint8) as an IDX file: 00 00 08 <ndim>, big-endian int32 dims, payload."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_tree(directory: Path, n_train_per_class: int = 10, n_test_per_class: int = 4, hw: int = 6,
                  classes: int = 10, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Write the four MNIST-family files; returns (train_images, train_labels) as written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    out = None
    for split, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.repeat(np.arange(classes, dtype=np.uint8), n)
        images = rng.integers(0, 256, size=(labels.size, hw, hw), dtype=np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte{sfx}", labels, gz)
        out = out or (images, labels)
    return out


def write_cifar(directory: Path, name: str, n: int = 6, protocol: int = pickle.DEFAULT_PROTOCOL) -> np.ndarray:
    """Write torchvision's CIFAR layout: dicts with bytes keys, uint8 (N, 3072) data. Returns batch 1 data."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    n_classes = 10 if name == "cifar10" else 100
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    first = None
    for f in files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": f.encode(),
            label_key: [int(v) for v in rng.integers(0, n_classes, size=n)],
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * n
        with (directory / f).open("wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        first = data if first is None else first
    if name == "cifar10":
        meta_file, meta = "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                           b"num_cases_per_batch": n, b"num_vis": 3072}
    else:
        meta_file, meta = "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}
    with (directory / meta_file).open("wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    assert first is not None
    return first


def write_png_tree(root: Path, mode: str = "L", size: tuple[int, int] = (5, 4)) -> dict[str, list[np.ndarray]]:
    """root/{train,test}/{cat,dog}/*.png with known pixels; returns the train arrays per class."""
    from PIL import Image

    rng = np.random.default_rng(2)
    written: dict[str, list[np.ndarray]] = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(arr, mode=mode).save(d / f"{i}.png")
                if split == "train":
                    written.setdefault(cls, []).append(arr)
    return written


@pytest.fixture
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide Debian's system-wide Fashion-MNIST so the tests only see the files they wrote."""
    monkeypatch.setattr(registry, "SYSTEM_DIRS", {"fashion_mnist": (), "mnist": ()})


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["fashion_mnist", "", "FashionMNIST/raw"])
def test_fashion_mnist_reads_idx(tmp_path: Path, no_system_dirs: None, gz: bool, sub: str) -> None:
    images, labels = make_idx_tree(tmp_path / sub, gz=gz)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert ds.train_x.shape == (100, 1, 6, 6) and ds.test_x.shape == (40, 1, 6, 6)
    assert ds.train_x.dtype == torch.float32
    torch.testing.assert_close(ds.train_x[:, 0], torch.from_numpy(images).float() / 255, rtol=0, atol=0)
    assert ds.train_y.tolist() == labels.tolist()
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert ds.source == str(tmp_path / sub).rstrip("/")
    # channel stats are those of the training images
    ref = images.astype(np.float64) / 255
    assert ds.mean.item() == pytest.approx(ref.mean(), abs=1e-6)
    assert ds.std.item() == pytest.approx(ref.std(ddof=1), abs=1e-6)


def test_mnist_reads_idx(tmp_path: Path) -> None:
    make_idx_tree(tmp_path / "mnist")
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert ds.classes == tuple("0123456789") and ds.train_x.shape[0] == 100


def test_per_class_subset_is_seeded(tmp_path: Path, no_system_dirs: None) -> None:
    make_idx_tree(tmp_path)
    full = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    a = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), n_per_class=3, test_per_class=2, seed=0))
    b = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), n_per_class=3, test_per_class=2, seed=0))
    c = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), n_per_class=3, test_per_class=2, seed=1))
    assert a.train_y.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.bincount(a.test_y).tolist() == [2] * 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert not torch.equal(a.train_x, c.train_x)
    # normalisation statistics come from the full training split, not the subset
    assert torch.equal(a.mean, full.mean) and torch.equal(a.std, full.std)
    with pytest.raises(ValueError, match="fewer than the 11 per class"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), n_per_class=11))


def test_missing_fashion_mnist_lists_places_and_apt_hint(tmp_path: Path, no_system_dirs: None) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    for place in ("nowhere/fashion_mnist/", "nowhere/ ", "nowhere/FashionMNIST/raw/"):
        assert place in msg
    assert "download: true" in msg


def test_missing_searches_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr_share"
    monkeypatch.setattr(registry, "SYSTEM_DIRS", {"fashion_mnist": (system,), "mnist": ()})
    with pytest.raises(FileNotFoundError, match="usr_share"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "root")))
    make_idx_tree(system)
    assert load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "root"))).source == str(system)


def test_truncated_idx_names_the_file(tmp_path: Path, no_system_dirs: None) -> None:
    make_idx_tree(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_idx_payload_and_magic_are_checked(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = write_idx(tmp_path / "good", arr, gz=False)
    assert np.array_equal(read_idx(good), arr)
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"short: IDX payload is 23 bytes .* needs 24"):
        read_idx(short)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x01\x02\x08\x03" + good.read_bytes()[4:])
    with pytest.raises(ValueError, match="magic: not an IDX file"):
        read_idx(magic)


def test_label_count_mismatch(tmp_path: Path, no_system_dirs: None) -> None:
    make_idx_tree(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="5 labels but .*t10k-images-idx3-ubyte.gz holds 40 images"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), test_per_class=10))
    assert ds.source == "/usr/share/datasets/fashion-mnist"
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (100, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert ds.mean.item() == pytest.approx(0.2860, abs=1e-3)  # the well-known Fashion-MNIST statistics
    assert ds.std.item() == pytest.approx(0.3530, abs=1e-3)


# -------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_pickle_batches(tmp_path: Path, protocol: int) -> None:
    first = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", protocol=protocol)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert ds.classes == tuple(f"c{i}" for i in range(10))
    # row layout: 1024 red, then green, then blue values, row-major (the CIFAR format)
    expect = torch.from_numpy(first.reshape(6, 3, 32, 32)).float() / 255
    torch.testing.assert_close(ds.train_x[:6], expect, rtol=0, atol=0)
    assert ds.mean.shape == (3,)


def test_cifar_pickles_of_numpy1_are_read(tmp_path: Path) -> None:
    """The published CIFAR files predate numpy 2: their pickles name numpy.core, not numpy._core."""
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d, "cifar10", protocol=2)
    for f in d.iterdir():
        f.write_bytes(f.read_bytes().replace(b"numpy._core", b"numpy.core"))
    assert b"numpy.core.multiarray" in (d / "test_batch").read_bytes()
    assert load_dataset(DataConfig(name="cifar10", root=str(tmp_path))).train_x.shape == (30, 3, 32, 32)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar100" / "cifar-100-python", "cifar100")
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert ds.num_classes == 100 and ds.classes[3] == "f3"
    assert ds.train_x.shape == (6, 3, 32, 32) and int(ds.train_y.max()) < 100


class _Evil:
    """Pickles to a call of os.system: what a poisoned dataset file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d, "cifar10")
    marker = tmp_path / "pwned"
    with (d / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3: refused to load global (posix|os|nt)\.system"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()
    evil_eval = tmp_path / "eval.pkl"
    evil_eval.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")  # protocol-0 pickle calling eval("1+1")
    with pytest.raises(ValueError, match="refused to load global builtins.eval"):
        safe_unpickle(evil_eval)


def test_missing_cifar_lists_places(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/ \(data_batch_1.*\n.*cifar10/cifar-10-batches-py"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


# -------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_grayscale(tmp_path: Path) -> None:
    written = write_png_tree(tmp_path, mode="L")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert ds.classes == ("cat", "dog")
    assert ds.train_x.shape == (6, 1, 4, 5) and ds.test_x.shape == (4, 1, 4, 5)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    expect = torch.from_numpy(np.stack(written["cat"] + written["dog"])).float() / 255
    torch.testing.assert_close(ds.train_x[:, 0], expect, rtol=0, atol=0)


def test_imagefolder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    from PIL import Image

    write_png_tree(tmp_path, mode="L")
    Image.fromarray(np.full((4, 5, 3), 200, dtype=np.uint8), mode="RGB").save(tmp_path / "test" / "dog" / "rgb.jpg")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert ds.train_x.shape == (6, 3, 4, 5) and ds.test_x.shape == (5, 3, 4, 5)
    # a grayscale image converted to RGB has three equal channels
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 1]) and torch.equal(ds.train_x[:, 1], ds.train_x[:, 2])


def test_imagefolder_odd_size_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    write_png_tree(tmp_path, mode="L")
    Image.fromarray(np.zeros((7, 7), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png is 7x7 .* set the data config's image_size"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_mixed_sizes_resized_and_cropped(tmp_path: Path) -> None:
    """image_size: every image resized (shorter side) and center-cropped with torchvision; a constant image
    stays constant, a wide one keeps its centre."""
    from PIL import Image

    write_png_tree(tmp_path, mode="L")
    Image.fromarray(np.full((7, 7), 200, dtype=np.uint8)).save(tmp_path / "train" / "dog" / "big.png")
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255  # white centre third
    Image.fromarray(wide).save(tmp_path / "train" / "cat" / "wide.png")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=6))
    assert ds.input_shape == (1, 6, 6) and ds.train_y.numel() == 8
    names = sorted(p.name for p in (tmp_path / "train" / "cat").iterdir())
    wide_img = ds.train_x[names.index("wide.png")]
    assert wide_img[..., 1:5].min() > 0.99 and wide_img.mean() > 0.9  # the crop is the white centre
    dog = sorted(p.name for p in (tmp_path / "train" / "dog").iterdir())
    big = ds.train_x[4 + dog.index("big.png")]
    assert torch.allclose(big, torch.full_like(big, 200 / 255), atol=1 / 255)
    rect = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=(4, 8)))
    assert rect.input_shape == (1, 4, 8)


def test_imagefolder_channels_and_cap(tmp_path: Path) -> None:
    write_png_tree(tmp_path, mode="RGB")
    gray = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), channels=1))
    assert gray.input_shape == (1, 4, 5)
    capped = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), max_per_class=2, seed=1))
    assert capped.input_shape == (3, 4, 5)
    assert torch.bincount(capped.train_y).tolist() == [2, 2] and torch.bincount(capped.test_y).tolist() == [2, 2]
    again = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), max_per_class=2, seed=1))
    assert torch.equal(capped.train_x, again.train_x)


def test_imagefolder_parallel_decoding_equals_serial(tmp_path: Path) -> None:
    from dsv.data.readers import read_imagefolder

    write_png_tree(tmp_path, mode="RGB")
    one = read_imagefolder(tmp_path, workers=1)
    four = read_imagefolder(tmp_path, workers=4)
    assert torch.equal(one.train_x, four.train_x) and torch.equal(one.test_y, four.test_y)


def test_image_only_keys_refused_elsewhere() -> None:
    with pytest.raises(ValueError, match="image_size applies to name 'imagefolder' only"):
        DataConfig(name="digits", image_size=8)
    with pytest.raises(ValueError, match="label must name the label column"):
        DataConfig(name="tabular", root="x.csv")


# ------------------------------------------------------------------------------------------ tabular


def _table(tmp_path: Path, suffix: str = ".csv", **extra: list) -> Path:  # noqa: ANN003
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    frame = pd.DataFrame({"height": rng.normal(170, 10, n), "weight": rng.normal(70, 5, n),
                          "smoker": rng.integers(0, 2, n).astype(bool),
                          "species": ["oak" if i % 2 else "ash" for i in range(n)], **extra})
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tabular_reads_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    path = _table(tmp_path, suffix)
    ds = load_dataset(DataConfig(name="tabular", root=str(path), label="species"))
    assert ds.classes == ("ash", "oak") and ds.features == ("height", "weight", "smoker")
    assert ds.input_shape == (3,) and ds.train_y.numel() + ds.test_y.numel() == 40
    assert torch.bincount(ds.test_y).tolist() == [4, 4]  # 20 % of each class, stratified
    frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    # original units: every training row is a row of the file
    file_rows = frame[["height", "weight"]].to_numpy()
    gaps = np.abs(ds.train_x[:, :2].double().numpy()[:, None, :] - file_rows[None]).max(axis=2).min(axis=1)
    assert gaps.max() < 1e-3
    only = load_dataset(DataConfig(name="tabular", root=str(path), label="species", features=("weight",)))
    assert only.input_shape == (1,)


def test_tabular_integer_labels_sort_numerically(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"a": np.arange(30.0), "y": [10, 2, 1] * 10}).to_csv(tmp_path / "n.csv", index=False)
    ds = load_dataset(DataConfig(name="tabular", root=str(tmp_path / "n.csv"), label="y"))
    assert ds.classes == ("1", "2", "10")


def test_tabular_bad_columns_are_named(tmp_path: Path) -> None:
    from tasks.prepare import check_columns

    path = _table(tmp_path, city=["x"] * 40)
    with pytest.raises(ValueError, match="feature column 'city' .* not numeric"):
        load_dataset(DataConfig(name="tabular", root=str(path), label="species"))
    assert check_columns(DataConfig(name="tabular", root=str(path), label="kind")) == [
        f"prepare.data.label = 'kind' is not a column of {path}; its columns: height, weight, smoker, species, city"
    ]
    assert "prepare.data.features ['age']" in check_columns(
        DataConfig(name="tabular", root=str(path), label="species", features=("age",)))[0]
    (tmp_path / "h").mkdir()
    holes = _table(tmp_path / "h", ".parquet", bmi=[None] + [20.0] * 39)
    with pytest.raises(ValueError, match="feature column 'bmi' .* 1 missing value"):
        load_dataset(DataConfig(name="tabular", root=str(holes), label="species"))
    (tmp_path / "t.txt").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a .csv or .parquet or .pq file"):
        load_dataset(DataConfig(name="tabular", root=str(tmp_path / "t.txt"), label="b"))


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    write_png_tree(tmp_path)
    for f in (tmp_path / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="test has no images"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no 'train' folder"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nothing")))


# ---------------------------------------------------------------------------- digits and toy sets


def test_digits() -> None:
    a = load_dataset(DataConfig(name="digits"))
    b = load_dataset(DataConfig(name="digits", seed=5))
    assert a.train_x.shape == (1438, 1, 8, 8) and a.test_x.shape == (359, 1, 8, 8)
    assert float(a.train_x.min()) == 0.0 and float(a.train_x.max()) == 1.0
    assert torch.equal(a.test_x, b.test_x)  # the split is fixed, independent of the subset seed
    # stratified: every class is ~20% test
    frac = torch.bincount(a.test_y, minlength=10).float() / (
        torch.bincount(a.test_y, minlength=10) + torch.bincount(a.train_y, minlength=10)
    )
    assert torch.all((frac - 0.2).abs() < 0.02)
    s = load_dataset(DataConfig(name="digits", n_per_class=5, seed=3))
    assert torch.bincount(s.train_y).tolist() == [5] * 10


@pytest.mark.parametrize(("name", "classes", "n"), [("moons", 2, 1000), ("blobs", 3, 900)])
def test_toy_sets(name: str, classes: int, n: int) -> None:
    a = load_dataset(DataConfig(name=name))
    b = load_dataset(DataConfig(name=name))
    assert a.train_x.shape == (n, 2) and a.num_classes == classes
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert torch.bincount(a.train_y).tolist() == [n // classes] * classes
    torch.testing.assert_close(a.mean, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std, torch.ones(2), atol=2e-3, rtol=0)
    assert not torch.equal(a.train_x, a.test_x)


# ------------------------------------------------------------------------------------ names, resize


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"'fashion-mnist' is not one of .*cifar10.*did you mean 'fashion_mnist'"):
        DataConfig(name="fashion-mnist")
    with pytest.raises(ValueError, match="n_per_class must be >= 1"):
        DataConfig(name="digits", n_per_class=0)
    assert set(DATASET_NAMES) == {
        "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "tabular", "digits", "photos", "moons", "blobs"
    }


def test_resize_images() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    up = resize_images(x, (1, 28, 28))
    assert up.shape == (4, 1, 28, 28) and float(up.min()) >= 0 and float(up.max()) <= 1
    rgb = resize_images(x, (3, 8, 8))
    assert torch.equal(rgb[:, 0], x[:, 0]) and torch.equal(rgb[:, 2], x[:, 0])
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    torch.testing.assert_close(resize_images(red, (1, 4, 4)), torch.full((1, 1, 4, 4), 0.299))
    const = torch.full((2, 3, 32, 32), 0.4)
    torch.testing.assert_close(resize_images(const, (3, 28, 28)), torch.full((2, 3, 28, 28), 0.4))
    with pytest.raises(ValueError, match="cannot convert 2 channels to 3"):
        resize_images(torch.zeros(1, 2, 4, 4), (3, 4, 4))


def test_photos_are_natural_image_crops_without_download() -> None:
    ds = load_dataset(DataConfig(name="photos"))
    assert ds.input_shape == (3, 32, 32) and ds.classes == ("china", "flower")
    assert ds.train_x.shape[0] == 1000 and ds.test_x.shape[0] == 200
    assert float(ds.train_x.min()) >= 0.0 and float(ds.train_x.max()) <= 1.0
    # natural images: neighbouring pixels are strongly correlated (noise would give ~0)
    a, b = ds.train_x[..., :-1].flatten(), ds.train_x[..., 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
    assert torch.equal(load_dataset(DataConfig(name="photos")).train_x[:3], ds.train_x[:3])  # fixed seed


def test_per_class_indices_at_most_caps_small_classes() -> None:
    from dsv.data.core import per_class_indices

    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 4)
    with pytest.raises(ValueError, match="class 1 has only 2 samples"):
        per_class_indices(y, 3, 3, torch.Generator().manual_seed(0))
    idx = per_class_indices(y, 3, 3, torch.Generator().manual_seed(0), at_most=True)
    assert [int((y[idx] == c).sum()) for c in range(3)] == [3, 2, 3]
    assert sorted(idx[3:5].tolist()) == [5, 6]  # all of the small class
    # a class with enough samples draws exactly as without the cap
    big = per_class_indices(y[:5], 3, 1, torch.Generator().manual_seed(0))
    assert idx[:3].tolist() == big.tolist()
