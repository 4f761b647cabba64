"""Sensitivity fields (Jacobian rows) of any denoiser, and the locality measures computed from them.

The field of output pixel i at timestep t is ``F_i(t) = E_{x_t}[d x0_hat_i / d x_t]`` with x_t drawn
from the forward process on held-out images (docs/DESIGN.md §3); ``E|d x0_hat_i / d x_t|`` is kept too.
What each denoiser offers is read from its :class:`~localdiff.denoisers.Capabilities`: closed forms
where it declares one (``jacobian_rows``: wiener, linear, optimal, masked), one evaluation per
timestep where its Jacobian is input-independent, and autograd otherwise, many rows per backward pass
(the input batch is replicated once per requested row, which is exact for a batch-independent model;
any other model is differentiated one input at a time). For colour images a pixel's output is the mean
over its output channels unless ``out_channel`` picks one; fields keep one map per input channel
``[C, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .distributed import tqdm
from .errors import ConfigError
from .schedules import NoiseLevel, level_key

Pixel = tuple[int, int]


def parse_pixels(spec: str | Sequence[Pixel], shape: tuple[int, int, int]) -> list[Pixel]:
    """``"center"``, ``"all"``, ``"r,c;r,c"`` or a list of (row, col) -> validated list of (row, col)."""
    _, h, w = shape
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("center", "centre"):
            return [(h // 2, w // 2)]
        if s == "all":
            return [(r, c) for r in range(h) for c in range(w)]
        try:
            pixels = [tuple(int(v) for v in part.split(",")) for part in s.split(";") if part.strip()]
        except ValueError as exc:
            raise ConfigError(f"pixels must be 'center', 'all' or 'r,c;r,c', got '{spec}'") from exc
    else:
        pixels = [tuple(int(v) for v in p) for p in spec]
    for p in pixels:
        if len(p) != 2 or not (0 <= p[0] < h and 0 <= p[1] < w):
            raise ConfigError(f"pixel {p} is not a (row, col) inside the {h}x{w} image")
    if not pixels:
        raise ConfigError("no pixels given")
    return [(int(r), int(c)) for r, c in pixels]


def _output_index(pixels: list[Pixel], shape, out_channel) -> torch.Tensor:
    """Flat output indices [P, Cout] whose mean (over Cout) is each pixel's output."""
    c, h, w = shape
    chans = list(range(c)) if out_channel in (None, "mean") else [int(out_channel)]
    if any(not 0 <= ch < c for ch in chans):
        raise ConfigError(f"out_channel {out_channel} is outside 0..{c - 1}")
    return torch.tensor([[ch * h * w + r * w + col for ch in chans] for r, col in pixels], dtype=torch.long)


def has_closed_form(den) -> bool:
    """Whether ``den`` declares an exact ``jacobian_rows``."""
    return den.capabilities.closed_form_jacobian


def jacobian_rows(den, x_t: torch.Tensor, t: int, pixels: list[Pixel], *, method: str = "auto",
                  out_channel=None, rows_per_pass: int = 64) -> torch.Tensor:
    """``d x0_hat[pixel] / d x_t`` for each input in ``x_t`` [D, C, H, W] -> [D, P, C, H, W] (float64).

    ``method``: "closed" (the denoiser's own ``jacobian_rows``), "autograd", or "auto" (closed form
    where one exists). ``rows_per_pass`` bounds how many rows one backward pass computes.
    """
    shape = tuple(x_t.shape[1:])
    index = _output_index(pixels, shape, out_channel)  # [P, Cout]
    P, Cout = index.shape
    if method == "auto":
        method = "closed" if has_closed_form(den) else "autograd"
    if method == "closed":
        if not has_closed_form(den):
            raise ConfigError(f"model '{den.name}' has no closed-form Jacobian; use autograd")
        rows = den.jacobian_rows(x_t, t, index.reshape(-1))  # [D, P*Cout, n]
        rows = rows.reshape(x_t.shape[0], P, Cout, -1).mean(dim=2)
        return rows.reshape(x_t.shape[0], P, *shape).detach().to("cpu", torch.float64)
    if method != "autograd":
        raise ConfigError(f"unknown Jacobian method '{method}': use auto, closed or autograd")
    if den.capabilities.piecewise_constant:
        raise ConfigError(f"model '{den.name}' is piecewise constant in x_t: its Jacobian is zero almost everywhere")
    if not den.capabilities.batch_independent:  # replicating the batch would mix the inputs: one at a time
        return torch.cat([_rows_autograd(den, x_t[d:d + 1], t, index, rows_per_pass, 1) for d in range(len(x_t))])
    return _rows_autograd(den, x_t, t, index, rows_per_pass)


def _rows_autograd(den, x_t, t, index, rows_per_pass, per_pass=None):
    """Autograd rows [D, P, C, H, W]: ``per_pass`` pixels per backward pass, the D inputs replicated once
    per pixel in one batch (default: as many pixels as keep the batch within ``rows_per_pass``)."""
    D = x_t.shape[0]
    shape = tuple(x_t.shape[1:])
    P = index.shape[0]
    per_pass = per_pass or max(1, rows_per_pass // D)  # pixels per backward pass
    out = torch.empty(D, P, *shape, dtype=torch.float64)
    for start in range(0, P, per_pass):
        group = index[start:start + per_pass]  # [G, Cout]
        G = group.shape[0]
        x = x_t.detach().repeat(G, 1, 1, 1).requires_grad_(True)  # [G*D, C, H, W]
        y = den(x, t).reshape(G, D, -1)  # [G, D, n]
        sel = torch.stack([y[g][:, group[g]].mean(dim=1) for g in range(G)])  # [G, D]
        (grad,) = torch.autograd.grad(sel.sum(), x)
        out[:, start:start + G] = grad.reshape(G, D, *shape).transpose(0, 1).to("cpu", torch.float64)
    return out


def draw_noisy(data, t, draws: int, generator: torch.Generator, schedule) -> torch.Tensor:
    """``draws`` samples of x_t [D, C, H, W] at the level ``t``: held-out images (without replacement) through
    q(x_t | x0)."""
    idx = torch.randperm(len(data), generator=generator)[:draws]
    if len(idx) < draws:  # fewer images than draws: cycle through them again
        idx = idx.repeat((draws + len(idx) - 1) // len(idx))[:draws]
    x0 = torch.stack([data[int(i)] for i in idx])
    return schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator))


@dataclass
class Fields:
    """Sensitivity fields of one denoiser: ``mean`` and ``abs_mean`` are [T, P, C, H, W] at the levels
    ``timesteps`` (integer timesteps as given, or the keys of continuous levels, ``"s=1.23"``) of noise-to-signal
    ratios ``sigmas``."""

    mean: torch.Tensor
    abs_mean: torch.Tensor
    timesteps: list
    pixels: list[Pixel]
    draws: int
    method: str
    extra: dict = field(default_factory=dict)
    sigmas: list[float] = field(default_factory=list)


def draw_seed(seed: int, level: NoiseLevel) -> int:
    """The seed of the field draws at ``level``: ``seed * 1000 + t`` for a timestep (as before), else a
    deterministic integer of its sigma, so every model analysed with the same seed sees the same x_t."""
    if level.t is not None:
        return int(seed) * 1000 + level.t
    return int(seed) * 1000 + 10 ** 6 + int(round(math.log(level.sigma) * 1e6)) % (2 ** 30)


def sensitivity_fields(den, data, pixels="center", timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                       draws: int = 16, seed: int = 0, *, method: str = "auto", out_channel=None,
                       rows_per_pass: int = 64, progress: bool = True) -> Fields:
    """Average Jacobian rows of ``den`` over ``draws`` noisy held-out images from ``data`` (a dataset, or
    images as an array, as ``make_denoiser`` takes them) per level of ``timesteps`` (timesteps of the
    denoiser's schedule, or NoiseLevels).

    The draws depend only on ``seed`` and the level, so every denoiser analysed with the same seed sees the
    same x_t (a fair comparison). Input-independent closed forms (Wiener) use one evaluation.
    """
    from .data import as_dataset

    if draws < 1:
        raise ConfigError(f"draws must be positive, got {draws}")
    data = as_dataset(data, what="the held-out images the field draws come from")
    shape = tuple(data.shape)
    if tuple(den.shape) != shape:
        raise ConfigError(f"held-out data shape {shape} does not match the denoiser's {den.shape}")
    pix = parse_pixels(pixels, shape)
    levels = [den.schedule.at(t) for t in timesteps]  # validated here, once
    ts = [t if isinstance(t, NoiseLevel) and t.t is None else lv.t for t, lv in zip(timesteps, levels)]
    ts = [level_key(t) if isinstance(t, NoiseLevel) else t for t in ts]
    caps = den.capabilities
    unfitted = [str(lv.t) for lv in levels if lv.t is not None and not caps.accepts(lv)]
    if unfitted:
        raise ConfigError(f"model '{den.name}' was fitted at timesteps {', '.join(map(str, caps.fitted_timesteps))} "
                          f"only, not at {', '.join(unfitted)}")
    resolved = method if method != "auto" else ("closed" if caps.closed_form_jacobian else "autograd")
    input_free = resolved == "closed" and caps.constant_jacobian
    means, abss = [], []
    for level in tqdm(levels, desc=f"fields {den.name}", unit="t", disable=not progress, leave=False):
        gen = torch.Generator().manual_seed(draw_seed(seed, level))
        x_t = draw_noisy(data, level, 1 if input_free else draws, gen, den.schedule)
        rows = jacobian_rows(den, x_t, level, pix, method=resolved, out_channel=out_channel,
                             rows_per_pass=rows_per_pass)  # [D, P, C, H, W]
        means.append(rows.mean(0))
        abss.append(rows.abs().mean(0))
    return Fields(torch.stack(means), torch.stack(abss), ts, pix, draws, resolved,
                  sigmas=[lv.sigma for lv in levels])


def full_jacobian(den, x_t: torch.Tensor, t: int, *, method: str = "auto", rows_per_pass: int = 256,
                  out_channel=None) -> torch.Tensor:
    """All rows at one input ``x_t`` [1, C, H, W] -> [H*W, C, H, W] (one row per output pixel)."""
    _, _, h, w = x_t.shape
    pixels = [(r, c) for r in range(h) for c in range(w)]
    return jacobian_rows(den, x_t, t, pixels, method=method, out_channel=out_channel,
                         rows_per_pass=rows_per_pass)[0]


# -- locality measures -------------------------------------------------------------------------

def _distances(shape, pixel: Pixel) -> np.ndarray:
    _, h, w = shape
    rr, cc = np.mgrid[0:h, 0:w]
    return np.hypot(rr - pixel[0], cc - pixel[1])


def energy_radius(fld: np.ndarray, pixel: Pixel, fraction: float) -> float:
    """Smallest radius around ``pixel`` holding ``fraction`` of the field's energy (sum of squares over channels)."""
    energy = (np.asarray(fld, dtype=np.float64) ** 2).sum(axis=0)  # [H, W]
    total = energy.sum()
    if not total > 0:
        return float("nan")
    d = _distances(fld.shape, pixel).ravel()
    order = np.argsort(d, kind="stable")
    cum = np.cumsum(energy.ravel()[order]) / total
    return float(d[order][np.searchsorted(cum, fraction - 1e-12)])


def window_energy(fld: np.ndarray, pixel: Pixel, k: int) -> float:
    """Fraction of the field's energy inside the k x k window centred on ``pixel``."""
    energy = (np.asarray(fld, dtype=np.float64) ** 2).sum(axis=0)
    total = energy.sum()
    if not total > 0:
        return float("nan")
    r, c, h = pixel[0], pixel[1], k // 2
    return float(energy[max(0, r - h): r + h + 1, max(0, c - h): c + h + 1].sum() / total)


def cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def locality_measures(fields: Fields, windows: Sequence[int] = (3, 5, 7)) -> dict:
    """r50, r90 and k x k window energy of each (timestep, pixel) signed mean field."""
    out: dict = {}
    for ti, t in enumerate(fields.timesteps):
        per_t = {}
        for pi, p in enumerate(fields.pixels):
            f = fields.mean[ti, pi].numpy()
            per_t[f"{p[0]},{p[1]}"] = {
                "r50": energy_radius(f, p, 0.5),
                "r90": energy_radius(f, p, 0.9),
                **{f"energy_{k}x{k}": window_energy(f, p, k) for k in windows},
                "norm": float(np.linalg.norm(f)),
            }
        out[str(t)] = per_t
    return out


def field_similarity(fields_by_model: dict[str, Fields]) -> dict:
    """Cosine similarity of every pair of models' signed mean fields, per timestep (mean over pixels)."""
    names = list(fields_by_model)
    out: dict = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            fa, fb = fields_by_model[a], fields_by_model[b]
            if fa.timesteps != fb.timesteps or fa.pixels != fb.pixels:
                raise ConfigError(f"fields of {a} and {b} were computed at different timesteps or pixels")
            out[f"{a}|{b}"] = {
                str(t): float(np.mean([cosine(fa.mean[ti, pi], fb.mean[ti, pi]) for pi in range(len(fa.pixels))]))
                for ti, t in enumerate(fa.timesteps)
            }
    return out


__all__ = ["Fields", "sensitivity_fields", "jacobian_rows", "full_jacobian", "parse_pixels", "draw_noisy",
           "energy_radius", "window_energy", "cosine", "locality_measures", "field_similarity"]
