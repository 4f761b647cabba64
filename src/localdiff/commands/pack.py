"""``localdiff pack SOURCE OUT``: convert a dataset into a store (data/store.py), an uint8 file read block by
block, so that sets larger than memory can be used by every command (``--data OUT``)."""

from __future__ import annotations

import sys

from ..errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pack", help="convert a dataset into a store read block by block (for sets larger than memory)",
        description="Convert any source --data reads (IDX, CIFAR-10 batches, Downsampled ImageNet batches, image "
                    "folders, .npy/.npz, a built-in name) into a store file: the images in blocks, each with a "
                    "checksum, and a header with the shape, splits, labels and what was read. --data STORE then "
                    "reads it block by block, never holding it whole. OUT is never overwritten.")
    p.add_argument("source", metavar="SOURCE", help="a path or built-in name, as for --data / --dataset")
    p.add_argument("out", metavar="OUT", help="the store file to write (must not exist), e.g. imagenet64.ldstore")
    p.add_argument("--split", default=None,
                   help="train, test, all or a comma list (default: train, and test where the source has one)")
    p.add_argument("--block-images", type=int, default=None,
                   help="images per block (default: the largest power of two in 8 MiB; 512 at 3 x 64 x 64)")
    p.add_argument("--resolution", type=int, default=None, help="resize every image to RESOLUTION x RESOLUTION")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 or 3 channels")
    p.add_argument("--max-data-bytes", metavar="SIZE", default=None,
                   help="memory cap for a split that is read whole (IDX, CIFAR, image folders, .npz); default "
                        "$LOCALDIFF_MAX_DATA_BYTES, else half of the machine's memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_splits(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError("--split is empty; give train, test, all or a comma list")
    return ["train", "test"] if names == ["all"] else names


def run(args) -> int:
    from ..data.store_pack import pack
    from ..distributed import world

    if world().active:
        raise ConfigError("pack writes one file: run it in one process, without torchrun")
    result = pack(args.source, args.out, splits=parse_splits(args.split), block_images=args.block_images,
                  resolution=args.resolution, channels=args.channels, max_bytes=args.max_data_bytes,
                  progress=not args.no_progress, log=lambda m: print(f"localdiff pack: {m}", file=sys.stderr))
    print(f"packed {args.source} -> {result.summary()}")
    return 0
