"""The paper's headline table on MNIST: the final R² of the Wiener, optimal and masked denoisers
against the trained U-Net (arXiv 2509.09672), from the public API only.

Every model samples 10 DDIM steps from the same initial noise; R² is the official per-sample
``1 - sum (x - y)^2 / (n Var(y))`` against the U-Net's sample y, averaged over the samples. About a
minute on two CPU cores (the first run also computes the data's statistics, then cached). Measured
with 8 samples (docs/RESULTS.md): masked 0.630 ± 0.116, wiener 0.616 ± 0.085, optimal 0.136 ± 0.231.

    python examples/reproduce_table.py                 # the full training set (60,000 images), 8 samples
    python examples/reproduce_table.py --subset 5000 --num 2   # a quick check
"""

import argparse
import time

from localdiff import data_spectrum, load_dataset, make_denoiser, r2_score, sample

parser = argparse.ArgumentParser(description="Final R² against the U-Net on MNIST.")
parser.add_argument("--subset", type=int, default=None, help="fit on a seeded subset of this many images")
parser.add_argument("--num", type=int, default=8, help="samples per model, all from the same noise")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

data = load_dataset("mnist", split="train", subset=args.subset)  # [N, 1, 28, 28] in [-1, 1]
spectrum = data_spectrum(data, progress=False)  # mean and covariance, computed once for wiener and masked
unet = make_denoiser("unet", data)  # the network shipped for MNIST
reference = sample(unet, num=args.num, seed=args.seed, progress=False)

print(f"MNIST, {len(data)} training images, {args.num} samples, DDIM 10 steps, seed {args.seed}")
print(f"{'model':<10} {'final R² vs U-Net':>18} {'sd':>7} {'seconds':>8}")
for name in ("wiener", "optimal", "masked"):
    start = time.perf_counter()
    den = make_denoiser(name, data, spectrum=spectrum)
    samples = sample(den, num=args.num, seed=args.seed, progress=False)  # the same initial noise
    r2 = r2_score(samples, reference)  # [num], one R² per sample
    seconds = time.perf_counter() - start
    print(f"{name:<10} {r2.mean().item():>18.3f} {r2.std(unbiased=False).item():>7.3f} {seconds:>8.1f}")
