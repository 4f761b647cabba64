"""How much of denoising is second order, and when memorisation wins: held-out denoising MSE of the
Wiener filter (the best linear denoiser) against the exact optimal denoiser of the training set
(docs/DESIGN.md §2.1, §2.3), and a given network, on training subsets of N/8, N/4, N/2 and N images.

Every model denoises the same noisy images: one draw per held-out image and level from one seeded
generator (:func:`localdiff.evaluate.noisy_draws`), shared by every training-set size. Comparisons are
paired (:func:`localdiff.paired.compare`): mean of the per-image differences ``optimal - wiener``, its
95% Student-t interval, images on which optimal is lower.

The training subsets are ``data.subset(size, seed)`` (a seeded permutation's first ``size`` images), so
they are nested: N/8 inside N/4 inside N/2 inside N. Their moments are accumulated along that
permutation and merged (``MomentState.merge``), one pass over N/2 images for the three smaller sets, and
the optimal denoiser of every size comes from one pass over the N images (:func:`nested_optimal`).

**Memorisation horizon** (at one training-set size): the lowest probed noise level (smallest t) at
which the optimal denoiser's held-out MSE is below Wiener's with the paired 95% interval entirely
below 0. At lower noise the memorising denoiser, which can only return blends of training images,
does not beat the linear one on images it has not seen (``loses_at`` lists where it is significantly
worse). ``None`` when optimal beats Wiener at no probed level. More training images push the horizon
towards lower noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..calibrate_masked import per_image_mse
from ..denoisers import make_denoiser
from ..distributed import tqdm
from ..errors import ConfigError
from ..evaluate import noisy_draws
from ..paired import compare
from ..stats import MomentState, Spectrum, eigendecompose, moments
from ..schedules import NoiseLevel

SIZE_DIVISORS = (8, 4, 2, 1)  # training-set sizes N/8, N/4, N/2, N
HORIZON_DEFINITION = ("memorisation horizon = the smallest probed timestep t (lowest noise) at which the optimal "
                      "denoiser's held-out MSE is lower than Wiener's with the paired 95% Student-t interval of "
                      "(optimal - wiener) entirely below 0; null if optimal is significantly lower at no probed level; "
                      "both denoisers are fitted on the same seeded training subset")


def subset_sizes(n: int, divisors: Sequence[int] = SIZE_DIVISORS) -> list[int]:
    """``[N // d for d in divisors]`` (at least 1 image each, no duplicates), ascending."""
    if any(int(d) < 1 for d in divisors):
        raise ConfigError(f"training-set divisors must be positive integers, got {list(divisors)}")
    return sorted({max(1, n // int(d)) for d in divisors})


def nested_spectra(data, sizes: Sequence[int], seed: int, full: Spectrum | None = None, *,
                   progress: bool = True) -> dict[int, Spectrum]:
    """Spectra of ``data.subset(size, seed)`` for every size (ascending), from incremental moments along the
    subset permutation; ``full`` (the spectrum of all of ``data``) is reused for ``size == len(data)``."""
    n = len(data)
    perm = np.random.default_rng(seed).permutation(n)  # the permutation ImageDataset.subset draws
    state, done, out = MomentState.empty(data.dim), 0, {}
    for size in tqdm(sorted(sizes), desc="subset statistics", unit="set", disable=not progress, leave=False):
        if size == n and full is not None:
            out[size] = full
            continue
        state = state.merge(moments(data.select(np.sort(perm[done:size])), progress=False))
        done = size
        # the subset's own fingerprint: make_denoiser then checks that these statistics are that subset's
        out[size] = eigendecompose(state.mean, state.covariance(), state.count, data.subset(size, seed).fingerprint)
    return out


def nested_optimal(data, sizes: Sequence[int], seed: int, images: torch.Tensor, x_t: dict[int, torch.Tensor],
                   levels: Sequence[NoiseLevel], *, chunk: int = 2048, device: str = "cpu",
                   progress: bool = True) -> dict[int, dict[int, torch.Tensor]]:
    """The exact optimal denoiser of every nested subset at once: ``{size: {t: per-image MSE [M]}}``.

    ``data.subset(size, seed)`` is the set of the first ``size`` images of one seeded permutation, so the
    training set is streamed once in that order (float64, the optimal denoiser's arithmetic, docs/DESIGN.md
    §2.3) and a running softmax state per level holds every prefix: each size reads the state of the
    chunks before its end, merged with the part of its last chunk (:class:`SoftmaxState` merges exactly).
    The same numbers as ``make_denoiser("optimal", data.subset(size, seed))`` at a cost of one pass over N
    images instead of one per size."""
    from ..denoisers.empirical import optimal_logits
    from ..denoisers.stream.softmax import SoftmaxState, merge

    sizes = sorted(sizes)
    ordered = data.select(np.random.default_rng(seed).permutation(len(data))[:sizes[-1]])  # subset order
    xs = {lv.t: x_t[lv.t].reshape(len(images), -1).to(device, torch.float64) for lv in levels}  # [M, n]
    clean = images.reshape(len(images), -1).to(torch.float64)
    running: dict[int, SoftmaxState | None] = {lv.t: None for lv in levels}
    out: dict[int, dict[int, torch.Tensor]] = {s: {} for s in sizes}
    for start in tqdm(range(0, sizes[-1], chunk), desc="optimal, nested sets", unit="chunk", disable=not progress,
                      leave=False):
        y = ordered.chunk_at(start, chunk, device=device, dtype=torch.float64, flat=True)  # [k, n]
        stop, y_sq = start + y.shape[0], (y * y).sum(dim=1)
        ends = [s for s in sizes if start < s <= stop]  # sizes whose last image is in this chunk
        for lv in levels:
            logits = optimal_logits(xs[lv.t], y, y_sq, lv.a, lv.b2)  # [M, k]
            for s in ends:
                k = s - start
                state = SoftmaxState.of(logits, y) if k == y.shape[0] else SoftmaxState.of(logits[:, :k], y[:k])
                x0 = merge(running[lv.t], state).mean().to("cpu", images.dtype)  # [M, n], as a denoiser returns it
                out[s][lv.t] = (x0.double() - clean).pow(2).mean(dim=1)
            if stop < sizes[-1]:
                running[lv.t] = merge(running[lv.t], SoftmaxState.of(logits, y))
    return out


def _comparison(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], t: int) -> dict:
    c = compare(a.numpy(), b.numpy(), a=names[0], b=names[1], metric=f"mse_t{t}", lower_is_better=True)
    verdict = f"{names[0]} lower" if c.a_better else f"{names[1]} lower" if c.b_better else "tied"
    return {**c.to_dict(), "verdict": verdict}


def horizon(comparisons: dict[int, dict], levels: Sequence[NoiseLevel]) -> dict:
    """The memorisation horizon (module docstring) from ``{t: optimal-minus-wiener comparison}``."""
    beats = sorted(t for t, c in comparisons.items() if c["verdict"] == "optimal lower")
    loses = sorted(t for t, c in comparisons.items() if c["verdict"] == "wiener lower")
    t_h = beats[0] if beats else None
    sigma = next((lv.sigma for lv in levels if lv.t == t_h), None)
    return {"horizon_t": t_h, "horizon_sigma": sigma, "beats_at": beats, "loses_at": loses,
            "loses_below_horizon": [t for t in loses if t_h is not None and t < t_h]}


def memorisation(data, images: torch.Tensor, levels: Sequence[NoiseLevel], *, spectrum: Spectrum | None = None,
                 divisors: Sequence[int] = SIZE_DIVISORS, seed: int = 0, unet=None, device: str = "cpu",
                 batch_size: int = 100, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Held-out MSE of wiener and optimal at each training-set size (and ``unet`` at N), paired, and the
    horizon per size. ``images`` [M, C, H, W] are held-out clean images on the [-1, 1] scale.

    Returns the record and the per-image errors ``{"<size>/<model>": [T, M] float64}`` (levels in order)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(data.shape):
        raise ConfigError(f"held-out images of shape {tuple(images.shape)} do not match the data's {data.shape}")
    if images.shape[0] < 2:
        raise ConfigError("the memorisation stage needs at least 2 held-out images (a paired interval needs two)")
    ts = [lv.t for lv in levels]
    x_t = dict(noisy_draws(images, ts, torch.Generator().manual_seed(int(seed))))  # {t: [M, C, H, W]}
    n = len(data)
    sizes = subset_sizes(n, divisors)
    spectra = nested_spectra(data, sizes, seed, spectrum, progress=progress)
    optimal = nested_optimal(data, sizes, seed, images, x_t, levels, device=device, progress=progress)
    per_size, errors_at_n, arrays = {}, {}, {}
    bar = tqdm(total=len(sizes) * len(ts), desc="held-out MSE", unit="level", disable=not progress, leave=False)
    for size in sizes:
        dens = {"wiener": make_denoiser("wiener", data.subset(size, seed=seed), spectrum=spectra[size], device=device)}
        if size == n and unet is not None:
            dens["unet"] = unet
        err = {name: {} for name in dens}
        err["optimal"] = optimal[size]
        for t in ts:
            for name, den in dens.items():
                err[name][t] = per_image_mse(den, x_t[t], images, t, batch_size)
            bar.update(1)
        for name, e in err.items():
            arrays[f"{size}/{name}"] = torch.stack([e[t] for t in ts]).numpy()
        comps = {t: _comparison(err["optimal"][t], err["wiener"][t], ("optimal", "wiener"), t) for t in ts}
        per_size[str(size)] = {
            "size": size, "fraction": size / n,
            "mse": {name: {str(t): {"mean": float(v.mean()), "se": float(v.std(unbiased=True) / len(v) ** 0.5)}
                           for t, v in e.items()} for name, e in err.items()},
            "optimal_minus_wiener": {str(t): c for t, c in comps.items()},
            **horizon(comps, levels)}
        if size == n:
            errors_at_n = err
    bar.close()
    out = {"definition": HORIZON_DEFINITION, "held_out_images": int(images.shape[0]), "seed": int(seed),
           "sizes": sizes, "subset_rule": f"data.subset(size, seed={seed}): nested seeded subsets", "per_size": per_size,
           "horizon_by_size": {str(s): per_size[str(s)]["horizon_t"] for s in sizes}}
    if "unet" in errors_at_n:
        e = errors_at_n
        out["unet"] = {"minus_wiener": {str(t): _comparison(e["unet"][t], e["wiener"][t], ("unet", "wiener"), t)
                                        for t in ts},
                       "minus_optimal": {str(t): _comparison(e["unet"][t], e["optimal"][t], ("unet", "optimal"), t)
                                         for t in ts}}
    return out, arrays


__all__ = ["memorisation", "horizon", "nested_spectra", "nested_optimal", "subset_sizes", "SIZE_DIVISORS", "HORIZON_DEFINITION"]
