"""Named datasets with the paper's deterministic train / validation / test splits.

Every loader returns a :class:`DatasetSplits`: three ``(X, y)`` pairs of tensors,
``X`` float32 of shape ``(n, *input_shape)`` and ``y`` int64 of shape ``(n,)``.

Splits (the paper's protocol, METHOD.md section 6)
--------------------------------------------------
The official training set of ``N`` samples is split by one seeded permutation
``perm = numpy.random.default_rng(split_seed).permutation(N)`` into

    validation = perm[:n_val],  train = perm[n_val:],  n_val = round(val_fraction * N)

(80/20 by default: MNIST and Fashion-MNIST give 48 000 / 12 000), and the official
test set is the test split. The split depends only on ``split_seed``, so every run
of a sweep sees the same data.

Scaling
-------
Image pixels are scaled to [0, 1] exactly once, ``x / 255`` (``x / 16`` for the
scikit-learn digits, whose pixels are 0..16). The paper's published data script
divided by 255 twice, leaving its MNIST inputs in [0, 1/255]; this harness does
not reproduce that slip. MNIST-1D is used as generated (zero mean, unit variance).

Datasets (:data:`DATASETS`)
---------------------------
``digits``
    scikit-learn's 8x8 handwritten digits (1797 samples, embedded in scikit-learn,
    no download). It has no official test split, so a fixed 80/20 train/test split
    is made first with the seed :data:`DIGITS_TEST_SEED` (independent of
    ``split_seed``: 1438 / 359), then the 1438 are split 80/20 into train and
    validation (1150 / 288). ``input_shape = (1, 8, 8)``.
``mnist1d``
    MNIST-1D, generated offline by the ``mnist1d`` package's ``make_dataset`` with
    its default ``get_dataset_args()`` (5000 signals of length 40, generator seed
    42; its own 4000 / 1000 train/test split). Nothing is downloaded; the arrays are
    kept in memory for the life of the process. ``input_shape = (40,)``.
``fashion-mnist``, ``mnist``
    The four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or gzipped
    (``.gz``; also the ``train-images.idx3-ubyte`` spelling). Looked for in
    ``data_dir``, ``data_dir/<name>`` and torchvision's layout ``data_dir/MNIST/raw``
    / ``data_dir/FashionMNIST/raw``; without ``data_dir`` in ``$TOPODECORR_DATA``,
    the user cache directory (:func:`default_data_dir`) and, for Fashion-MNIST,
    :data:`DEBIAN_FASHION_MNIST` where Debian's ``dataset-fashion-mnist`` package
    installs them. If they are not found and torchvision is installed, they are
    downloaded through torchvision (into ``data_dir`` or the cache directory) when
    ``download=True`` and the network allows. ``input_shape = (1, 28, 28)``.
``cifar10``
    The python-pickle batches ``data_batch_1`` ... ``data_batch_5`` and
    ``test_batch`` directly under ``data_dir`` or under
    ``data_dir/cifar-10-batches-py`` (torchvision download as above).
    ``input_shape = (3, 32, 32)``.

Safety: no file read here can run code. IDX files are parsed byte by byte with
their header checked against the file size. CIFAR-10 pickles go through
:class:`RestrictedUnpickler`, which resolves only the three NumPy names an array
needs (``_reconstruct``, ``ndarray``, ``dtype``) and refuses every other global.
"""

from __future__ import annotations

import gzip
import io
import numbers
import os
import pickle
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DIGITS_TEST_SEED",
    "DataError",
    "DatasetSplits",
    "RefusedPickle",
    "RestrictedUnpickler",
    "default_data_dir",
    "load_cifar_batch",
    "load_dataset",
    "read_idx",
    "split_indices",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "mnist1d", "fashion-mnist", "mnist", "cifar10")

#: Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

#: Seed of the fixed train/test split of scikit-learn's digits (which has no official one).
DIGITS_TEST_SEED = 0

#: Fraction of the digits held out as its test split.
DIGITS_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A dataset is missing, unreadable or malformed (the message names the file or places)."""


@dataclass(frozen=True, repr=False)
class DatasetSplits:
    """A dataset split into train, validation and test sets.

    Attributes
    ----------
    train, val, test : tuple of (Tensor, Tensor)
        ``(X, y)``: ``X`` float32 of shape ``(n, *input_shape)``, ``y`` int64 of shape ``(n,)``
        with values in ``[0, num_classes)``.
    input_shape : tuple of int
        Shape of one sample: ``(channels, height, width)`` for images, ``(length,)`` for MNIST-1D.
    num_classes : int
        Number of classes.
    name : str
        The dataset's name (one of :data:`DATASETS`).
    source : str
        Where the data came from (files, package and version), for the report.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    source: str

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split, ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": len(self.train[1]), "val": len(self.val[1]), "test": len(self.test[1])}

    def __repr__(self) -> str:
        s = self.sizes
        return (
            f"DatasetSplits(name={self.name!r}, train={s['train']}, val={s['val']}, test={s['test']}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})"
        )


# -- splitting ---------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into ``(train_idx, val_idx)``.

    ``perm = default_rng(seed).permutation(n)``; the first ``round(val_fraction * n)``
    indices are the validation set, the rest the training set (both sorted).

    >>> tr, va = split_indices(10, 0.2, seed=0)
    >>> len(tr), len(va), sorted(set(tr) | set(va)) == list(range(10))
    (8, 2, True)
    """
    _check_val_fraction(val_fraction)
    n_val = int(round(val_fraction * n))
    if n_val < 1 or n_val > n - 1:
        raise DataError(
            f"val_fraction={val_fraction} of {n} samples leaves an empty training or validation set; "
            "use a fraction that keeps at least one sample on each side"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real):
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1 (paper: 0.2), got {val_fraction!r}")


def _pairs(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: the dataset names serve --help without torch

    return (
        torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _make_splits(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    split_seed: int,
    val_fraction: float,
    num_classes: int,
    name: str,
    source: str,
) -> DatasetSplits:
    tr, va = split_indices(len(y_train), val_fraction, split_seed)
    return DatasetSplits(
        train=_pairs(X_train[tr], y_train[tr]),
        val=_pairs(X_train[va], y_train[va]),
        test=_pairs(X_test, y_test),
        input_shape=tuple(int(d) for d in X_train.shape[1:]),
        num_classes=num_classes,
        name=name,
        source=source,
    )


# -- locations ---------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The default data root: ``$TOPODECORR_DATA``, else ``$XDG_CACHE_HOME/topodecorr``, else ``~/.cache/topodecorr``.

    Downloads through torchvision go here when no ``data_dir`` is given.
    """
    env = os.environ.get("TOPODECORR_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "topodecorr"


_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _idx_candidates(name: str, roots: list[Path]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        out += [root, root / name, root / _TORCHVISION_DIRS[name] / "raw"]
    return out


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    return [default_data_dir()]


# -- IDX ---------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); download the file again") from exc
    return raw


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a NumPy array, checking its header.

    The format: two zero bytes, a type code (0x08 = unsigned byte, ...), the number of
    dimensions ``d``, then ``d`` big-endian uint32 sizes, then the data in row-major order.

    Parameters
    ----------
    path : path-like
        The file (``.gz`` or not: gzip is recognised by its content).
    ndim : int, optional
        The expected number of dimensions (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        Of the header's shape, in native byte order.

    Raises
    ------
    DataError
        Bad magic number, unexpected dimensions, or a data size that does not match the
        header (a truncated or padded file); the message names the file.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(buf)} bytes); download the file again")
    zero0, zero1, code, d = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_TYPES:
        raise DataError(
            f"{path}: not an IDX file (magic number {buf[:4].hex()}; expected 0000 followed by a type code "
            "such as 08 and the number of dimensions)"
        )
    if ndim is not None and d != ndim:
        raise DataError(f"{path}: IDX file has {d} dimensions, expected {ndim}")
    header = 4 + 4 * d
    if len(buf) < header:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes, header needs {header})")
    shape = tuple(int(s) for s in np.frombuffer(buf, dtype=">u4", count=d, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(buf) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{path}: IDX file {what}: header shape {shape} needs {expected} data bytes, found {found}; "
            "download the file again"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    for base in (stem, dotted):
        for suffix in ("", ".gz"):
            p = directory / (base + suffix)
            if p.is_file():
                return p
    return None


def _load_idx_dir(directory: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    files = {key: _find_idx_file(directory, stem) for key, stem in _IDX_FILES.items()}
    paths: dict[str, Path] = {k: v for k, v in files.items() if v is not None}
    Xtr = read_idx(paths["train_images"], ndim=3)
    ytr = read_idx(paths["train_labels"], ndim=1)
    Xte = read_idx(paths["test_images"], ndim=3)
    yte = read_idx(paths["test_labels"], ndim=1)
    for X, y, ix, iy in ((Xtr, ytr, "train_images", "train_labels"), (Xte, yte, "test_images", "test_labels")):
        if X.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(f"{paths[ix]} / {paths[iy]}: expected unsigned-byte IDX files (type code 08)")
        if len(X) != len(y):
            raise DataError(f"{paths[ix]} has {len(X)} images but {paths[iy]} has {len(y)} labels")
        if len(y) and int(y.max()) >= 10:
            raise DataError(f"{paths[iy]}: label {int(y.max())} out of range 0..9")
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise DataError(
            f"{paths['train_images']} has images of size {Xtr.shape[1:]} but {paths['test_images']} "
            f"has {Xte.shape[1:]}"
        )
    # (n, H, W) uint8 -> (n, 1, H, W) float32 in [0, 1], scaled once
    Xtr = (Xtr.astype(np.float32) / np.float32(255.0))[:, None]
    Xte = (Xte.astype(np.float32) / np.float32(255.0))[:, None]
    listed = ", ".join(p.name for p in paths.values())
    return Xtr, ytr, Xte, yte, f"{name} IDX files in {directory} ({listed})"


def _locate_idx(name: str, candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """First directory holding all four IDX files; notes on partial finds."""
    notes: list[str] = []
    for d in candidates:
        if not d.is_dir():
            continue
        found = {k: _find_idx_file(d, s) for k, s in _IDX_FILES.items()}
        if all(found.values()):
            return d, notes
        if any(found.values()):
            missing = [_IDX_FILES[k] for k, v in found.items() if v is None]
            notes.append(f"{d} holds only some of the files (missing: {', '.join(missing)}[.gz])")
    return None, notes


# -- torchvision download (optional) -------------------------------------------------------------


def _torchvision_download(name: str, root: Path) -> str | None:
    """Download ``name`` into ``root`` through torchvision; returns None on success, else why not."""
    try:
        from torchvision import datasets as tvd  # optional, imported only here
    except ImportError:
        return "torchvision is not installed (pip install torchvision, matching your torch version)"
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as exc:  # network errors, checksum errors, permissions: all reported
        return f"torchvision download into {root} failed: {type(exc).__name__}: {exc}"
    return None


_HOW_TO_GET = {
    "mnist": (
        "put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; plain or .gz) from Yann LeCun's MNIST page in a "
        "directory and pass it as data_dir (--data-dir)"
    ),
    "fashion-mnist": (
        "run `make data` in the repository (it installs the Debian/Ubuntu package dataset-fashion-mnist, "
        "or prints the apt-get command to run as root), "
        "or put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from Zalando Research's fashion-mnist "
        "repository on GitHub in a directory and pass it as data_dir (--data-dir)"
    ),
    "cifar10": (
        "download the 'CIFAR-10 python version' archive from Alex Krizhevsky's CIFAR page (University of "
        "Toronto), extract it (it holds cifar-10-batches-py/ with data_batch_1..5 and test_batch) and pass "
        "the directory as data_dir (--data-dir)"
    ),
}


def _missing(name: str, looked: list[Path], notes: list[str], download_note: str | None) -> DataError:
    lines = [f"{name}: data not found. Looked in:"]
    lines += [f"  - {p}" + ("" if p.is_dir() else " (no such directory)") for p in looked]
    lines += [f"  note: {n}" for n in notes]
    if download_note:
        lines.append(f"  download: {download_note}")
    lines.append(f"To get it: {_HOW_TO_GET[name]}, {_download_advice(download_note)}.")
    return DataError("\n".join(lines))


def _download_advice(download_note: str | None) -> str:
    """The last way to get a dataset, torchvision's download, worded for what happened to it."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "or install torchvision (matching your torch version) so that it can download the files"
    if download_note is not None and download_note.startswith("not attempted"):
        return "or allow the download (download=True), which torchvision (installed) does itself"
    return ("or run it where the internet can be reached: torchvision (installed) downloads the files itself, "
            "which failed here (see 'download' above); then copy the folder over")


def _load_idx_dataset(name: str, data_dir, download: bool):
    roots = _roots(data_dir)
    candidates = _idx_candidates(name, roots)
    if data_dir is None and name == "fashion-mnist":
        candidates.append(Path(DEBIAN_FASHION_MNIST))
    found, notes = _locate_idx(name, candidates)
    download_note = None
    if found is None and download:
        download_note = _torchvision_download(name, roots[0])
        if download_note is None:
            found, notes = _locate_idx(name, candidates)
    elif found is None:
        download_note = "not attempted (download=False)"
    if found is None:
        raise _missing(name, candidates, notes, download_note)
    return _load_idx_dir(found, name)


# -- CIFAR-10 ----------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    # Old pickles (NumPy 1.x, Python 2: the official CIFAR files) name numpy.core, new ones
    # numpy._core; both resolve to the function imported above, never by importing the name.
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for a global (or persistent id) that :class:`RestrictedUnpickler` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, bytes, numbers and NumPy arrays, and nothing else.

    ``find_class`` resolves exactly ``numpy.core.multiarray._reconstruct`` (or its NumPy 2
    name ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``
    — what a pickled array needs — and raises :class:`RefusedPickle` (a
    :class:`pickle.UnpicklingError`) for any
    other global, so a pickle cannot call ``os.system``, ``eval`` or import anything.
    Persistent ids are refused too.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):  # noqa: D102 - documented above
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        obj = RestrictedUnpickler._allowed.get((module, name))
        if obj is None:
            raise RefusedPickle(
                f"refusing to load the global {module}.{name}: only NumPy arrays, dicts, lists, bytes and "
                "numbers are allowed in a CIFAR-10 batch"
            )
        return obj

    def persistent_load(self, pid):  # noqa: D102
        raise RefusedPickle("refusing a persistent id: not allowed in a CIFAR-10 batch")


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load one CIFAR-10 python batch safely.

    The file is a pickled dict with (at least) ``b"data"``: uint8 array of shape
    ``(n, 3072)`` — per image the 1024 red, then green, then blue values, each plane
    row-major — and ``b"labels"``: ``n`` integers in 0..9. It is read with
    :class:`RestrictedUnpickler` (``encoding="bytes"``, as the official Python 2 files
    need).

    Returns
    -------
    images : numpy.ndarray
        uint8, shape ``(n, 3, 32, 32)``.
    labels : numpy.ndarray
        int64, shape ``(n,)``.

    Raises
    ------
    DataError
        The file is unreadable, is a refused or corrupt pickle, or lacks the expected
        keys, shapes or types; the message names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from exc
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedPickle as exc:
        raise DataError(f"{path}: not a safe CIFAR-10 batch: {exc}") from exc
    except Exception as exc:  # truncated or garbled pickles raise EOFError, ValueError, ...
        raise DataError(f"{path}: corrupt CIFAR-10 batch ({type(exc).__name__}: {exc}); download it again") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")

    def get(key: str):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise DataError(f"{path}: missing key {key.encode()!r} (keys: {sorted(map(repr, obj))})")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (n, 3072), found {desc}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: b'labels' must be a list of integers")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    return data.reshape(-1, 3, 32, 32), y


def _locate_cifar(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    notes: list[str] = []
    for d in candidates:
        if not d.is_dir():
            continue
        present = [f for f in (*_CIFAR_TRAIN, _CIFAR_TEST) if (d / f).is_file()]
        if len(present) == 6:
            return d, notes
        if present:
            missing = sorted(set((*_CIFAR_TRAIN, _CIFAR_TEST)) - set(present))
            notes.append(f"{d} holds only some batches (missing: {', '.join(missing)})")
    return None, notes


def _load_cifar10(data_dir, download: bool):
    roots = _roots(data_dir)
    candidates: list[Path] = []
    for r in roots:
        candidates += [r, r / "cifar-10-batches-py", r / "cifar10", r / "cifar10" / "cifar-10-batches-py"]
    found, notes = _locate_cifar(candidates)
    download_note = None
    if found is None and download:
        download_note = _torchvision_download("cifar10", roots[0])
        if download_note is None:
            found, notes = _locate_cifar(candidates)
    elif found is None:
        download_note = "not attempted (download=False)"
    if found is None:
        raise _missing("cifar10", candidates, notes, download_note)
    parts = [load_cifar_batch(found / f) for f in _CIFAR_TRAIN]
    Xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    Xte, yte = load_cifar_batch(found / _CIFAR_TEST)
    scale = np.float32(255.0)
    return Xtr.astype(np.float32) / scale, ytr, Xte.astype(np.float32) / scale, yte, f"CIFAR-10 python batches in {found}"


# -- digits and MNIST-1D -----------------------------------------------------------------------


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the experiments extra
        raise DataError("digits needs scikit-learn: pip install 'topodecorr[experiments]'") from exc
    import sklearn

    bunch = load_digits()
    X = (bunch.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    keep, held = split_indices(len(y), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    source = (
        f"scikit-learn {sklearn.__version__} load_digits (1797 8x8 images, pixels/16); fixed "
        f"{1 - DIGITS_TEST_FRACTION:.0%}/{DIGITS_TEST_FRACTION:.0%} train/test split with seed {DIGITS_TEST_SEED}"
    )
    return X[keep], y[keep], X[held], y[held], source


@lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError("mnist1d needs the mnist1d package: pip install 'topodecorr[experiments]'") from exc
    from importlib import metadata

    args = get_dataset_args()
    # make_dataset seeds the *global* NumPy and random generators: keep the caller's streams intact
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = tuple(np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test"))
    for a in arrays:
        a.setflags(write=False)
    try:
        version = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:  # pragma: no cover
        version = "?"
    source = (
        f"mnist1d {version} make_dataset(get_dataset_args()): {args.num_samples} signals of length "
        f"{args.final_seq_length}, seed {args.seed}, generated offline"
    )
    return (*arrays, source)  # type: ignore[return-value]


def _load_mnist1d():
    Xtr, ytr, Xte, yte, source = _mnist1d_arrays()
    return Xtr.astype(np.float32), ytr.astype(np.int64), Xte.astype(np.float32), yte.astype(np.int64), source


# -- entry point -------------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    *,
    download: bool = True,
) -> DatasetSplits:
    """Load a named dataset with the paper's train / validation / test splits.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    data_dir : path-like, optional
        Where the files are (IDX files, CIFAR-10 batches); see the module docstring for the
        places searched with and without it. Ignored by ``digits`` and ``mnist1d``.
    split_seed : int
        Seed of the train/validation permutation.
    val_fraction : float
        Fraction of the official training set held out for validation (paper: 0.2).
    download : bool
        Allow a torchvision download (mnist, fashion-mnist, cifar10) when the files are
        not found and torchvision is installed.

    Returns
    -------
    DatasetSplits
        ``X`` float32 ``(n, *input_shape)`` in [0, 1] (MNIST-1D: standardised), ``y`` int64 ``(n,)``.

    Raises
    ------
    DataError
        Unknown name, bad split arguments, missing data (the message lists every place
        searched and how to get the data) or a corrupt file (the message names it).

    Examples
    --------
    >>> d = load_dataset("digits")
    >>> d.sizes, d.input_shape, d.num_classes
    ({'train': 1150, 'val': 288, 'test': 359}, (1, 8, 8), 10)
    >>> float(d.train[0].min()), float(d.train[0].max()), d.train[1].dtype
    (0.0, 1.0, torch.int64)
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise DataError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    _check_val_fraction(val_fraction)
    loaders: dict[str, Callable[[], tuple]] = {
        "digits": _load_digits,
        "mnist1d": _load_mnist1d,
        "fashion-mnist": lambda: _load_idx_dataset("fashion-mnist", data_dir, download),
        "mnist": lambda: _load_idx_dataset("mnist", data_dir, download),
        "cifar10": lambda: _load_cifar10(data_dir, download),
    }
    Xtr, ytr, Xte, yte, source = loaders[name]()
    return _make_splits(
        Xtr, ytr, Xte, yte,
        split_seed=int(split_seed), val_fraction=float(val_fraction), num_classes=10, name=name, source=source,
    )
