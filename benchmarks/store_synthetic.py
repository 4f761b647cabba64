"""Synthetic stores of the real sizes whose statistics resemble natural images: colour Gaussian random fields
with a 1/f^2 power spectrum, generated and written block by block (never held whole in memory).

    python benchmarks/store_synthetic.py imagenet64 /work/bigdata/imagenet64-grf.ldstore   # 1,281,167 x 3x64x64, 15.7 GB
    python benchmarks/store_synthetic.py celeba64 /work/bigdata/celeba64-grf.ldstore       # 30,000 (+ 1,000 test)
    python benchmarks/store_synthetic.py cifar /work/bigdata/cifar-grf.ldstore             # 50,000 (+ 10,000 test) x 3x32x32

Each image: three independent fields (white complex noise times 1/f in the Fourier domain, so the power
falls as 1/f^2 as in natural images; the DC term has the amplitude of the lowest frequency, so images
differ in brightness), mixed into R, G, B by a luminance / blue-yellow / red-green matrix (natural
colour is mostly luminance: the channels correlate at about 0.9), scaled to a standard deviation of 55
grey levels around 115, rounded and clipped to 0..255. Deterministic given ``--seed``: torch's generator
draws block after block, so the same command writes the same file (same fingerprint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

SETS = {  # name: (train images, test images, side)
    "imagenet64": (1_281_167, 0, 64),
    "celeba64": (30_000, 1_000, 64),
    "cifar": (50_000, 10_000, 32),
}
# R, G, B from (luminance, blue-yellow, red-green) components of standard deviations 1, 0.3 and 0.1
COLOUR = torch.tensor([[1.0, 0.3, 0.1], [1.0, 0.0, -0.2], [1.0, -0.3, 0.1]])
MEAN, STD = 115.0, 55.0


class Fields:
    """Blocks of colour 1/f^2 Gaussian random fields as uint8 ``[b, 3, s, s]``."""

    def __init__(self, side: int, seed: int):
        self.side = side
        self.gen = torch.Generator().manual_seed(seed)
        fy, fx = torch.fft.fftfreq(side)[:, None], torch.fft.rfftfreq(side)[None, :]
        f = torch.sqrt(fx * fx + fy * fy)
        f[0, 0] = 1.0 / side  # the DC term: as strong as the lowest frequency
        self.amplitude = 1.0 / f  # power ~ 1/f^2
        probe = torch.Generator().manual_seed(12345)
        self.scale = STD / float(self._mixed(4096, probe).std())  # one constant for every block

    def _mixed(self, b: int, gen: torch.Generator) -> torch.Tensor:
        s = self.side
        z = torch.randn(b, 3, s, s // 2 + 1, dtype=torch.complex64, generator=gen)
        z.mul_(self.amplitude)
        x = torch.fft.irfft2(z, s=(s, s))  # [b, 3, s, s] independent fields
        return torch.einsum("ij,bjhw->bihw", COLOUR, x)

    def block(self, b: int) -> torch.Tensor:
        return self._mixed(b, self.gen).mul_(self.scale).add_(MEAN).round_().clamp_(0, 255).to(torch.uint8)


def write_store(name: str, out: Path, *, seed: int = 0, block_images: int | None = None, progress: bool = True,
                num: int | None = None) -> dict:
    """Write the synthetic set ``name`` (``SETS``) to the new store ``out``; returns counts and timings."""
    from localdiff.data.store_write import StoreWriter

    train, test, side = SETS[name]
    if num is not None:
        train = num
    fields = Fields(side, seed)
    t0, gen_s = time.perf_counter(), 0.0
    step = 4096
    with StoreWriter(out, shape=(3, side, side), block_images=block_images) as w:
        for split, count in (("train", train), ("test", test)):
            if not count:
                continue
            w.begin_split(split)
            done = 0
            while done < count:
                k = min(step, count - done)
                g = time.perf_counter()
                x = fields.block(k).numpy()
                gen_s += time.perf_counter() - g
                w.write(x)
                done += k
                if progress and (done // step) % 25 == 0:
                    rate = w.images_written / (time.perf_counter() - t0)
                    print(f"\r{split}: {done:,} / {count:,} images, {rate:,.0f} images/s", end="", file=sys.stderr)
            w.end_split({"source": f"synthetic:{name}-grf", "format": "colour 1/f^2 Gaussian random field",
                         "seed": seed, "mean": MEAN, "std": STD, "colour": COLOUR.tolist(), "split": split})
        w.commit({"path": f"benchmarks/store_synthetic.py {name}", "name": f"{name}-grf"})
    if progress:
        print(file=sys.stderr)
    total = time.perf_counter() - t0
    return {"set": name, "train": train, "test": test, "side": side, "bytes": os.path.getsize(out),
            "seconds": total, "generate_s": gen_s, "write_s": total - gen_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", choices=sorted(SETS))
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-images", type=int, default=None)
    p.add_argument("--num", type=int, default=None, help="fewer training images (a quick check)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    r = write_store(args.set, Path(args.out), seed=args.seed, block_images=args.block_images, num=args.num)
    print(f"{args.out}: {r['train']:,} + {r['test']:,} images of 3 x {r['side']} x {r['side']}, "
          f"{r['bytes'] / 1e9:.2f} GB in {r['seconds']:.0f} s (generating {r['generate_s']:.0f} s, writing "
          f"{r['write_s']:.0f} s)")


if __name__ == "__main__":
    main()
