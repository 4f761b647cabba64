"""``localdiff noise``: write initial noise for ``sample --init-noise`` (and for other tools), so that runs of
different models, processes or programs start from the same latents.

The file holds ``initial_noise(num, shape, seed)`` (:func:`localdiff.diffusion.initial_noise`): standard
normal float32 ``[N, C, H, W]`` from a ``torch.Generator`` seeded with ``--seed``, the very latents that
``localdiff sample --num N --seed S`` draws itself, so ``--init-noise`` of this file reproduces that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "noise", help="write initial noise (.npy, float32 [N,C,H,W]) for sample --init-noise",
        description="Write standard normal initial noise for `localdiff sample --init-noise FILE`: the same latents "
                    "`sample --num N --seed S` draws, so other models, processes or tools can start from them.")
    p.add_argument("--num", type=int, required=True, help="number of images N")
    p.add_argument("--shape", required=True, metavar="C,H,W",
                   help="shape of one image, as the data it will be sampled with: 1,28,28 for MNIST")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0, as sample's)")
    p.add_argument("--out", required=True, metavar="FILE.npy",
                   help="new .npy file (never overwritten; one holding this very noise is left as it is)")
    p.add_argument("--no-progress", action="store_true", help="(no progress bars are drawn by this command)")
    p.set_defaults(func=run)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"1,28,28"`` -> ``(1, 28, 28)``; anything else is a ConfigError naming --shape."""
    parts = [t.strip() for t in text.replace("x", ",").split(",") if t.strip()]
    try:
        shape = tuple(int(t) for t in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--shape takes the size of one image as C,H,W with positive integers (1,28,28 for MNIST), "
                          f"got {text!r}")
    return shape  # type: ignore[return-value]


def _holds(path: Path, noise) -> bool:
    """Whether the .npy file ``path`` holds exactly ``noise``."""
    import numpy as np

    try:
        existing = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return existing.dtype == noise.dtype and existing.shape == noise.shape and bool(np.array_equal(existing, noise))


def run(args) -> int:
    from ..diffusion import initial_noise
    from ..distributed import is_main
    from ..fileio import write_npy

    if args.num < 1:
        raise ConfigError(f"--num must be a positive number of images, got {args.num}")
    shape = parse_shape(args.shape)
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: the noise is written as a .npy file; give a name ending in .npy")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name ending in .npy")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    noise = initial_noise(args.num, shape, seed=args.seed).numpy()  # [N, C, H, W] float32
    if out.exists():  # the same noise again is fine (a README block run twice); other contents are kept
        if not _holds(out, noise):
            raise ConfigError(f"--out {out}: the file already exists with other contents (files are never "
                              "overwritten); choose another name or delete it")
        print(f"{out} already holds this noise ({args.num} images of {'x'.join(map(str, shape))}, seed {args.seed})")
        return 0
    if is_main():  # under torchrun rank 0 writes; every rank would write the same bytes
        write_npy(out, noise)
        print(f"wrote {args.num} noise images of {'x'.join(map(str, shape))} (seed {args.seed}) to {out}",
              file=sys.stdout)
    return 0
