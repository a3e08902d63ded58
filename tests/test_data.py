"""Dataset loaders: IDX (plain and gzipped), CIFAR-10 pickles (safely), digits, MNIST-1D, splits, errors.

Small files are written here in the exact on-disk formats and read back; the real
Fashion-MNIST files are checked too when Debian's package is installed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from topodecorr.experiments import data as D  # noqa: E402
from topodecorr.experiments.data import DATASETS, DataError, DatasetSplits, load_dataset  # noqa: E402

# -- writers of the exact formats ----------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 00 00 08 ndim, big-endian uint32 dims, row-major data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def fake_images(n: int, offset: int, rng: np.random.Generator, hw=(28, 28)) -> np.ndarray:
    """Random uint8 images whose first two pixels encode ``offset + i`` (so rows can be traced)."""
    x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    return x


def write_idx_dataset(directory: Path, gz: bool, n_train=50, n_test=20, dotted=False, seed=0):
    """The four IDX files; returns the raw arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": fake_images(n_train, 0, rng),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": fake_images(n_test, 1000, rng),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(directory / name, arr, gz)
    return arrays


def trace_ids(X: torch.Tensor) -> np.ndarray:
    """Recover the ids planted by :func:`fake_images` from scaled images (n, 1, H, W)."""
    px = np.rint(X[:, 0, 0, :2].numpy() * 255).astype(int)
    return px[:, 0] * 256 + px[:, 1]


def cifar_batch(n: int, offset: int, rng: np.random.Generator) -> dict:
    """A batch dict exactly like the official ones (bytes keys, uint8 (n, 3072) data, list labels)."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(offset, offset + n)  # red plane, pixel (0, 0): an id
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in (np.arange(offset, offset + n) % 10)],
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(offset, offset + n)],
    }


def write_cifar(directory: Path, per_batch=4, n_test=5, protocol=4, seed=0) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = cifar_batch(per_batch, (i - 1) * per_batch, rng)
    batches["test_batch"] = cifar_batch(n_test, 200, rng)
    for name, b in batches.items():
        (directory / name).write_bytes(pickle.dumps(b, protocol=protocol))
    return batches


# -- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_roundtrip(tmp_path, gz, name):
    arrays = write_idx_dataset(tmp_path, gz=gz)
    d = load_dataset(name, data_dir=tmp_path, download=False)
    assert isinstance(d, DatasetSplits) and d.name == name and d.num_classes == 10
    assert d.input_shape == (1, 28, 28)
    assert d.sizes == {"train": 40, "val": 10, "test": 20}
    for X, y in (d.train, d.val, d.test):
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape[1:] == (1, 28, 28) and X.shape[0] == y.shape[0]
    # scaled exactly once: x / 255, in [0, 1]
    raw_test = arrays["t10k-images-idx3-ubyte"]
    np.testing.assert_array_equal(d.test[0][:, 0].numpy(), raw_test.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(d.test[1].numpy(), arrays["t10k-labels-idx1-ubyte"])
    # train and validation partition the official training set, labels travel with their images
    ids_tr, ids_va = trace_ids(d.train[0]), trace_ids(d.val[0])
    assert set(ids_tr).isdisjoint(ids_va)
    assert sorted(np.concatenate([ids_tr, ids_va])) == list(range(50))
    np.testing.assert_array_equal(d.train[1].numpy(), ids_tr % 10)
    np.testing.assert_array_equal(d.val[1].numpy(), ids_va % 10)
    assert str(tmp_path) in d.source


def test_split_is_seeded_and_deterministic(tmp_path):
    write_idx_dataset(tmp_path, gz=True)
    a = load_dataset("mnist", tmp_path, split_seed=3, download=False)
    b = load_dataset("mnist", tmp_path, split_seed=3, download=False)
    c = load_dataset("mnist", tmp_path, split_seed=4, download=False)
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[1], b.train[1])
    assert set(trace_ids(a.val[0])) != set(trace_ids(c.val[0]))
    assert torch.equal(a.test[0], c.test[0])  # the test split never depends on the seed
    # the documented rule: validation = first round(f * n) of default_rng(seed).permutation(n)
    perm = np.random.default_rng(3).permutation(50)
    assert sorted(trace_ids(a.val[0])) == sorted(perm[:10])


def test_val_fraction_sizes(tmp_path):
    write_idx_dataset(tmp_path, gz=False)
    d = load_dataset("mnist", tmp_path, val_fraction=0.3, download=False)
    assert d.sizes == {"train": 35, "val": 15, "test": 20}


@pytest.mark.parametrize("layout", ["named", "torchvision", "dotted"])
def test_idx_layouts(tmp_path, layout):
    if layout == "named":
        write_idx_dataset(tmp_path / "fashion-mnist", gz=True)
    elif layout == "torchvision":
        write_idx_dataset(tmp_path / "FashionMNIST" / "raw", gz=False)
    else:
        write_idx_dataset(tmp_path, gz=False, dotted=True)
    d = load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)
    assert d.sizes["test"] == 20


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPODECORR_DATA", str(tmp_path))
    write_idx_dataset(tmp_path / "mnist", gz=True)
    assert D.default_data_dir() == tmp_path
    assert load_dataset("mnist", download=False).sizes["train"] == 40


def _read_error(path: Path, ndim=None) -> str:
    with pytest.raises(DataError) as err:
        D.read_idx(path, ndim=ndim)
    assert str(path) in str(err.value)
    return str(err.value)


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    p = tmp_path / "f"
    p.write_bytes(good)
    np.testing.assert_array_equal(D.read_idx(p, ndim=3), np.arange(24).reshape(2, 3, 4))

    p.write_bytes(good[:-1])
    assert "truncated" in _read_error(p)
    p.write_bytes(good + b"\x00")
    assert "longer" in _read_error(p)
    p.write_bytes(good[:10])  # header cut short
    assert "truncated" in _read_error(p)
    p.write_bytes(b"\x00")
    _read_error(p)
    p.write_bytes(b"PK\x03\x04" + good[4:])  # not IDX at all
    assert "magic" in _read_error(p)
    p.write_bytes(bytes([0, 0, 0x07, 3]) + good[4:])  # unknown type code
    assert "magic" in _read_error(p)
    p.write_bytes(good)
    assert "dimensions" in _read_error(p, ndim=1)
    p.write_bytes(gzip.compress(good)[:-8])  # truncated gzip stream
    assert "gzip" in _read_error(p)


def test_other_idx_types_are_read_big_endian(tmp_path):
    vals = np.array([[1, -2], [300, -40000]], dtype=">i4")
    p = tmp_path / "ints"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + vals.tobytes())
    out = D.read_idx(p)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, [[1, -2], [300, -40000]])


def test_corrupt_dataset_file_names_the_file(tmp_path):
    write_idx_dataset(tmp_path, gz=False)
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", tmp_path, download=False)


def test_inconsistent_idx_files(tmp_path):
    arrays = write_idx_dataset(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"][:-1], gz=False)
    with pytest.raises(DataError, match="50 images but .* 49 labels"):
        load_dataset("mnist", tmp_path, download=False)
    bad = arrays["train-labels-idx1-ubyte"].copy()
    bad[0] = 12
    write_idx(tmp_path / "train-labels-idx1-ubyte", bad, gz=False)
    with pytest.raises(DataError, match="label 12 out of range"):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_idx_data_lists_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPODECORR_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", download=False)
    msg = str(err.value)
    for place in (tmp_path / "cache", tmp_path / "cache" / "FashionMNIST" / "raw", tmp_path / "debian"):
        assert str(place) in msg
    assert "dataset-fashion-mnist" in msg and "torchvision" in msg and "download=False" in msg
    assert isinstance(err.value, ValueError)

    # a directory holding only part of the files is reported as such
    write_idx_dataset(tmp_path / "d", gz=False)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing: t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path / "d", download=False)
    with pytest.raises(DataError, match="LeCun"):
        load_dataset("mnist", tmp_path / "d", download=False)


def test_download_fallback_is_used_and_its_failure_reported(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, root):
        calls.append((name, root))
        write_idx_dataset(root / "MNIST" / "raw", gz=True)
        return None

    monkeypatch.setattr(D, "_torchvision_download", fake_download)
    d = load_dataset("mnist", data_dir=tmp_path, download=True)
    assert calls == [("mnist", tmp_path)] and d.sizes["test"] == 20
    assert "MNIST" in d.source

    monkeypatch.setattr(D, "_torchvision_download", lambda name, root: "no network here")
    with pytest.raises(DataError, match="download: no network here"):
        load_dataset("mnist", data_dir=tmp_path / "empty", download=True)


def test_cifar10_without_network_does_not_ask_to_install_an_installed_torchvision(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TOPODECORR_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "_torchvision_download",
                        lambda name, root: "torchvision download into X failed: URLError: <urlopen error no route>")
    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda mod, *a: (real_find_spec("json") if installed else None) if mod == "torchvision"
                            else real_find_spec(mod, *a))
        with pytest.raises(DataError) as err:
            load_dataset("cifar10", data_dir=tmp_path / "empty", download=True)
        msg = str(err.value)
        assert "download: torchvision download into X failed: URLError" in msg
        if installed:  # the download itself failed: no advice to install what is there
            assert "install torchvision" not in msg
            assert msg.endswith("or run it where the internet can be reached: torchvision (installed) downloads the "
                                "files itself, which failed here (see 'download' above); then copy the folder over.")
        else:
            assert msg.endswith("or install torchvision (matching your torch version) so that it can download "
                                "the files.")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    with pytest.raises(DataError, match=r"or allow the download \(download=True\), which torchvision"):
        load_dataset("cifar10", data_dir=tmp_path / "empty", download=False)


# -- real Fashion-MNIST (only where Debian's package is installed) --------------------------------


@pytest.mark.skipif(
    not Path(D.DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
@pytest.mark.slow
def test_real_fashion_mnist_from_debian_package():
    d = load_dataset("fashion-mnist", data_dir=D.DEBIAN_FASHION_MNIST, download=False)
    assert d.sizes == {"train": 48000, "val": 12000, "test": 10000}
    assert float(d.test[0].min()) == 0.0 and float(d.test[0].max()) == 1.0
    assert torch.equal(torch.bincount(d.test[1]), torch.full((10,), 1000))
    assert int(d.test[1][0]) == 9  # the first test image is an ankle boot


# -- CIFAR-10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10_batches(tmp_path, sub):
    batches = write_cifar(tmp_path / sub if sub else tmp_path)
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert d.input_shape == (3, 32, 32) and d.sizes == {"train": 16, "val": 4, "test": 5}
    # channel planes, row-major: data[i, c*1024 + r*32 + col] == X[i, c, r, col] * 255
    raw = batches["test_batch"][b"data"]
    X = d.test[0].numpy()
    for c, r, col in ((0, 0, 1), (1, 5, 7), (2, 31, 30)):
        np.testing.assert_array_equal(np.rint(X[:, c, r, col] * 255), raw[:, c * 1024 + r * 32 + col])
    np.testing.assert_allclose(X, raw.reshape(-1, 3, 32, 32) / 255.0, rtol=0, atol=1e-7)
    assert d.test[1].tolist() == batches["test_batch"][b"labels"]
    ids_tr = np.rint(d.train[0][:, 0, 0, 0].numpy() * 255).astype(int)
    ids_va = np.rint(d.val[0][:, 0, 0, 0].numpy() * 255).astype(int)
    assert sorted(np.concatenate([ids_tr, ids_va])) == list(range(20))
    np.testing.assert_array_equal(d.train[1].numpy(), ids_tr % 10)


def py2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A protocol-2 pickle as Python 2 / NumPy 1 wrote the official files (opcode by opcode):
    ``numpy.core.multiarray._reconstruct`` and Python 2 ``str`` (SHORT_BINSTRING/BINSTRING)."""
    n = len(data)

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(b)]) + b

    out = b"\x80\x02}(" + s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", n) + b"M\x00\x0c\x86"  # version 1, shape (n, 3072)
    out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
    out += b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"  # not fortran, raw data
    out += s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return out + b"u."


def test_cifar_python2_numpy1_pickle_loads(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    p = tmp_path / "test_batch"
    p.write_bytes(py2_style_batch(data, [3, 1, 4]))
    X, y = D.load_cifar_batch(p)
    np.testing.assert_array_equal(X, data.reshape(3, 3, 32, 32))
    assert y.tolist() == [3, 1, 4] and y.dtype == np.int64


class _Evil:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return (os.system, (f"touch '{self.marker}'",))
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("via", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "inside-batch"])
def test_malicious_cifar_pickle_runs_nothing(tmp_path, via, nested):
    marker = tmp_path / "PWNED"
    write_cifar(tmp_path)
    payload = _Evil(marker, via)
    obj = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload]} if nested else payload
    (tmp_path / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match="refusing to load the global") as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert "test_batch" in str(err.value)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_malicious_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payload above really runs code when unpickled without restriction."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_Evil(marker, "builtins.eval"), protocol=2))
    assert marker.exists()


def test_restricted_unpickler_refuses_everything_else():
    for module, name in [("builtins", "getattr"), ("numpy", "load"), ("subprocess", "Popen"),
                         ("numpy._core.numeric", "_frombuffer"), ("copyreg", "_reconstructor")]:
        with pytest.raises(pickle.UnpicklingError):
            D.RestrictedUnpickler(__import__("io").BytesIO(b"")).find_class(module, name)


def test_cifar_bad_batches(tmp_path):
    p = tmp_path / "b"
    good = pickle.dumps(cifar_batch(2, 0, np.random.default_rng(0)), protocol=4)
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"b: corrupt"):
        D.load_cifar_batch(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=4))
    with pytest.raises(DataError, match=r"\(n, 3072\)"):
        D.load_cifar_batch(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=4))
    with pytest.raises(DataError, match="uint8"):
        D.load_cifar_batch(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=4))
    with pytest.raises(DataError, match="missing key b'labels'"):
        D.load_cifar_batch(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=4))
    with pytest.raises(DataError, match="0..9"):
        D.load_cifar_batch(p)
    p.write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(DataError, match="dict"):
        D.load_cifar_batch(p)


def test_missing_cifar_lists_places(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "missing: data_batch_3" in msg
    assert "CIFAR-10 python version" in msg


# -- digits and MNIST-1D ------------------------------------------------------------------------


def test_digits_splits():
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=1)
    assert a.sizes == {"train": 1150, "val": 288, "test": 359} and a.input_shape == (1, 8, 8)
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])  # fixed test split
    assert not torch.equal(a.val[0], b.val[0])
    from sklearn.datasets import load_digits

    raw = load_digits()
    X = (raw.data / 16.0).reshape(-1, 1, 8, 8)
    assert float(a.train[0].max()) == 1.0 and float(a.train[0].min()) == 0.0
    # the documented rule, rebuilt from NumPy: a fixed 80/20 train/test split (seed 0), then 80/20 train/val
    perm = np.random.default_rng(D.DIGITS_TEST_SEED).permutation(1797)
    test_idx, pool = np.sort(perm[:359]), np.sort(perm[359:])
    perm2 = np.random.default_rng(1).permutation(len(pool))
    val_idx, train_idx = pool[np.sort(perm2[:288])], pool[np.sort(perm2[288:])]
    for (Xs, ys), idx in zip((b.train, b.val, b.test), (train_idx, val_idx, test_idx)):
        np.testing.assert_allclose(Xs.numpy(), X[idx], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(ys.numpy(), raw.target[idx])
    assert len(set(train_idx) | set(val_idx) | set(test_idx)) == 1797


@pytest.mark.slow
def test_mnist1d_offline_deterministic_and_keeps_global_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = load_dataset("mnist1d")
    assert np.random.random() == expected_np and random.random() == expected_py
    assert a.sizes == {"train": 3200, "val": 800, "test": 1000} and a.input_shape == (40,)
    assert a.train[0].dtype == torch.float32 and set(a.test[1].tolist()) == set(range(10))
    D._mnist1d_arrays.cache_clear()  # regenerate: the same arrays
    b = load_dataset("mnist1d")
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert "mnist1d" in a.source


# -- arguments ----------------------------------------------------------------------------------


def test_bad_arguments():
    assert DATASETS == ("digits", "mnist1d", "fashion-mnist", "mnist", "cifar10")
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    for frac in (0, 1, -0.1, 1.5, "0.2", True):
        with pytest.raises(DataError, match="val_fraction"):
            load_dataset("digits", val_fraction=frac)
    for seed in (-1, True, 1.5):
        with pytest.raises(DataError, match="split_seed"):
            load_dataset("digits", split_seed=seed)
    with pytest.raises(DataError, match="empty"):
        D.split_indices(3, 0.01, 0)


def test_repr_is_short():
    r = repr(load_dataset("digits"))
    assert "train=1150" in r and len(r) < 400
