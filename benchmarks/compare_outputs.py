"""Every registered model's outputs from one source tree, for refactors that must not change them.

    python benchmarks/compare_outputs.py record --src /path/to/old/src --out old.npz
    python benchmarks/compare_outputs.py record --src src --out new.npz
    python benchmarks/compare_outputs.py compare old.npz new.npz        # exit 1 unless bit-identical

``record`` runs in a subprocess with ``--src`` first on ``sys.path``, builds every model it finds
registered (default options, the contract test's faster ones for the slow fits) on 300 MNIST training
images, and stores, per model: x0_hat at t = 999, 900, 500, 100, 0 for 4 held-out noisy images
(float32 and float64 inputs), the closed-form Jacobian rows of three pixels where declared, and a
10-step DDIM sample from fixed noise. ``compare`` lists every array that differs, with its largest
absolute difference; names renamed between the trees are matched through ``RENAMED``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

RENAMED = {"masked-quadratic": "wiener-quadratic"}  # old name -> new name
DDIM = (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
FAST = {"linear": {"steps": 40, "batch_size": 16, "timesteps": (999, *DDIM), "progress": False},
        "ls": {"patch_size": 5}, "els": {"patch_size": 5}, "els-boundary": {"patch_size": 5},
        "pspc": {"patch_size": 5}, "scfdm": {"num_samples": 4}}
TIMESTEPS = (999, 900, 500, 100, 0)


def record(out: str, num: int, models: list[str] | None) -> None:
    import torch

    torch.set_num_threads(2)
    from localdiff import available_models, load_dataset, make_denoiser
    from localdiff.diffusion import DEFAULT_SCHEDULE as S, sample

    data = load_dataset("mnist", subset=num, seed=0)
    held = load_dataset("mnist", split="test", subset=4, seed=1)
    x0 = held.tensor(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    init = torch.randn((2, *data.shape), generator=gen, dtype=torch.float32)
    arrays = {}
    for name in models or available_models():
        opts = dict(FAST.get(name, {}))
        den = make_denoiser(name, data, device="cpu", **opts)
        key = RENAMED.get(name, name)
        for t in TIMESTEPS:
            x = S.q_sample(x0, t, noise)
            with torch.no_grad():
                arrays[f"{key}/t{t}/f64"] = den(x, t).numpy()
                arrays[f"{key}/t{t}/f32"] = den(x.float(), t).numpy()
            if den.capabilities.closed_form_jacobian:
                arrays[f"{key}/t{t}/jac"] = den.jacobian_rows(x, t, torch.tensor([0, 406, 783])).cpu().numpy()
        with torch.no_grad():
            arrays[f"{key}/sample"] = sample(den, init_noise=init, steps=10, progress=False).numpy()
        print(name, flush=True)
        del den
    np.savez(out, **arrays)


def compare(a: str, b: str) -> int:
    old, new = np.load(a), np.load(b)
    bad = 0
    for key in sorted(set(old.files) | set(new.files)):
        if key not in old.files or key not in new.files:
            print(f"only in {'new' if key in new.files else 'old'}: {key}")
            bad += 1
            continue
        x, y = old[key], new[key]
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else "shape"
            print(f"differs: {key}: {diff}")
            bad += 1
    print(f"{len(old.files)} arrays compared, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--num", type=int, default=300)
    r.add_argument("--models", default=None, help="comma-separated (default: every registered model)")
    r.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args()
    if args.cmd == "compare":
        return compare(args.old, args.new)
    if not args.inner:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.src), "OMP_WAIT_POLICY": "PASSIVE"}
        return subprocess.call([sys.executable, __file__, *sys.argv[1:], "--inner"], env=env)
    record(args.out, args.num, args.models.split(",") if args.models else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
