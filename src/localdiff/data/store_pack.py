"""``pack``: any source ``load_dataset`` reads -> a store file (:mod:`.store`), written block by block.

How each source is read (the store then holds exactly what ``load_dataset(SOURCE, split=...)`` returns,
and each split's header records the ``meta`` it records):

* a ``.npy`` file (C order) streams: its header is parsed and its rows read 64 MiB at a time, so a file
  of any size is packed with that much in memory;
* a directory of Downsampled ImageNet batches streams one batch file at a time (one batch is decoded
  whole: about 2 x 1.6 GB at 64 px, the pickle's bytes and its array);
* everything else (IDX, CIFAR-10 batches, image folders, ``.npz``, built-in names, another store) is read
  one split at a time by ``load_dataset``, whose memory cap (``max_bytes``) bounds it: a split larger than
  the cap is refused with a DataError before it is read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import image_array, read_npy_header
from .dataset import DEFAULT_CHUNK
from .formats import imagenet_files, is_cifar_dir, is_imagenet_dir, read_imagenet_batch
from .limits import ReadLimits, format_bytes, nbytes_of, read_into
from .load import check_options, convert_channels, load_dataset, load_record
from .raw import RESIZE_METHOD, SPLIT_RULE, resize_images, split_indices, split_record
from .store import SPLIT_NAMES
from .store_write import StoreWriter, refuse_existing

PIECE_BYTES = 64 << 20  # rows read at a time from a streamed .npy
_STEP = DEFAULT_CHUNK  # images handed to the writer at a time from a dataset in memory


@dataclass
class PackedSplit:
    name: str
    count: int
    meta: dict


@dataclass
class PackResult:
    out: Path
    splits: list[PackedSplit]
    shape: tuple[int, int, int]
    dtype: str
    block_images: int
    bytes: int
    seconds: float
    streamed: bool

    def summary(self) -> str:
        parts = ", ".join(f"{s.name} {s.count:,} images" for s in self.splits)
        c, h, w = self.shape
        how = "streamed" if self.streamed else "read one split at a time"
        return (f"{self.out}: {parts} of {c} x {h} x {w} {self.dtype}, {format_bytes(self.bytes)} in blocks of "
                f"{self.block_images} images ({how}), {self.seconds:.1f} s "
                f"({self.bytes / max(self.seconds, 1e-9) / 1e6:.0f} MB/s)")


class _Transform:
    """``resolution`` and ``channels`` applied piece by piece, exactly as ``load_dataset`` applies them."""

    def __init__(self, resolution: int | None, channels: int | None):
        self.resolution, self.channels = resolution, channels
        self.native = self.resized = self.conversion = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.native is None:
            self.native = list(x.shape[1:])
        if self.resolution is not None and tuple(x.shape[2:]) != (self.resolution, self.resolution):
            x = resize_images(x, int(self.resolution))
            self.resized = RESIZE_METHOD
        x, self.conversion = convert_channels(x, self.channels)
        return x

    def meta(self, reader_meta: dict, source: str, split: str, shape) -> dict:
        return load_record(reader_meta, source=source, split=split, native=self.native, shape=shape,
                           resize=self.resized, conversion=self.conversion)


Pieces = Iterator[tuple[np.ndarray, "np.ndarray | None"]]


def _npy_pieces(path: Path, split: str, tf: _Transform, meta_out: dict) -> tuple[int, Pieces] | None:
    """Stream a C-order .npy: (images in the split, pieces); None where it must be read whole (Fortran order,
    or a header that does not describe the file: the whole-file reader then says what is wrong)."""
    f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        shape, fortran, dtype, header = read_npy_header(f, path, size)
        if fortran or len(shape) not in (3, 4) or nbytes_of(shape, dtype.itemsize) != size - header or not shape[0]:
            f.close()
            return None
    except BaseException:
        f.close()
        raise
    n = shape[0]
    keep = split_indices(n, split)
    if keep.size == 0:
        f.close()
        raise DataError(f"{path}: {n} image(s) leave none for split '{split}' ({SPLIT_RULE}); use split='all' or "
                        "add images")
    mask = np.zeros(n, bool)
    mask[keep] = True
    meta_out.update(format="npy", files=[path.name], **split_record(n, split))
    step = max(1, PIECE_BYTES // max(1, nbytes_of(shape[1:], dtype.itemsize)))

    def pieces() -> Pieces:
        with f:
            for s in range(0, n, step):
                x = read_into(f, np.empty((min(step, n - s), *shape[1:]), dtype), path, "the array")
                x = x[mask[s:s + len(x)]]
                if len(x):
                    yield tf(image_array(x, str(path))), None

    return int(keep.size), pieces()


def _imagenet_pieces(root: Path, split: str, limits: ReadLimits, tf: _Transform, meta_out: dict) -> tuple[None, Pieces]:
    files = imagenet_files(root, split)
    meta_out.update(format="imagenet-batches", files=[p.name for p in files], labels="0-based")

    def pieces() -> Pieces:
        for p in files:
            x, y = read_imagenet_batch(p, limits)
            yield tf(x), y

    return None, pieces()


def _dataset_pieces(ds) -> Pieces:
    for s in range(0, len(ds), _STEP):
        yield ds.raw[s:s + _STEP], None if ds.labels is None else ds.labels[s:s + _STEP]


def _open_split(source, split: str, resolution, channels, limits: ReadLimits, max_bytes):
    """(count or None, pieces, meta() -> the split's meta, streamed)."""
    path = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.exists():
        path = path.resolve()
        tf, reader_meta = _Transform(resolution, channels), {}
        opened = None
        if path.is_file() and path.suffix.lower() == ".npy":
            opened = _npy_pieces(path, split, tf, reader_meta)
        elif path.is_dir() and not is_cifar_dir(path) and is_imagenet_dir(path):
            opened = _imagenet_pieces(path, split, limits, tf, reader_meta)
        if opened is not None:
            count, pieces = opened
            return count, pieces, lambda shape: tf.meta(reader_meta, str(path), split, shape), True
    ds = load_dataset(source, split=split, resolution=resolution, channels=channels, max_bytes=max_bytes)
    return len(ds), _dataset_pieces(ds), lambda shape: dict(ds.meta), False


def pack(source, out: str | os.PathLike, *, splits: list[str] | None = None, block_images: int | None = None,
         resolution: int | None = None, channels: int | None = None, max_bytes: int | str | None = None,
         progress: bool = True, log: Callable[[str], None] | None = None) -> PackResult:
    """Write the ``splits`` of ``source`` (default: train, and test where the source has one) into a new store
    file ``out`` (never over an existing one), in blocks of ``block_images`` images (default: about 8 MiB).

    ``resolution`` / ``channels`` are applied as ``load_dataset`` applies them. Returns what was written.
    """
    from ..distributed import tqdm

    out = Path(out).expanduser().absolute()
    refuse_existing(out)
    explicit = splits is not None
    splits = list(splits or SPLIT_NAMES)
    for s in splits:
        check_options(s, resolution, channels, None, 0)
        if s not in SPLIT_NAMES:
            raise ConfigError(f"a store holds the splits {', '.join(SPLIT_NAMES)} ('all' is both); got '{s}'")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"--split names a split twice: {','.join(splits)}")
    limits = ReadLimits.resolve(max_bytes)
    t0, writer, done, streamed, total_bytes = time.perf_counter(), None, [], True, 0
    try:
        for name in splits:
            try:
                count, pieces, meta_of, was_streamed = _open_split(source, name, resolution, channels, limits, max_bytes)
            except DataError as exc:
                if explicit or name != "test" or not done:
                    raise
                if log:
                    log(f"no test split in {source} ({str(exc).splitlines()[0][:160]}); packed train only")
                continue
            streamed = streamed and was_streamed
            bar = tqdm(total=count, desc=f"pack {name}", unit="img", disable=not progress, leave=False)
            k, shape = 0, None
            for x, y in pieces:
                if writer is None:
                    writer = StoreWriter(out, shape=x.shape[1:], dtype=x.dtype, block_images=block_images)
                if shape is None:
                    writer.begin_split(name)
                    shape = x.shape[1:]
                writer.write(x, y)
                k += len(x)
                total_bytes += x.nbytes
                bar.update(len(x))
            bar.close()
            writer.end_split(meta_of(shape))
            done.append(PackedSplit(name, k, writer.splits[name].meta))
        src = {"path": str(Path(source).expanduser().resolve()) if isinstance(source, (str, os.PathLike))
               and Path(source).expanduser().exists() else str(source), "name": _name(source)}
        writer.commit(src)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return PackResult(out, done, tuple(writer.shape), writer.dtype.name, writer.block_images, total_bytes,
                      time.perf_counter() - t0, streamed)


def _name(source) -> str:
    p = Path(str(source))
    return p.stem if p.suffix else p.name


__all__ = ["pack", "PackResult", "PackedSplit", "PIECE_BYTES"]
