"""The trained linear denoiser (``linear``), ``x0_hat = A_t x_t + c_t`` (docs/DESIGN.md §2.2), fitted by SGD on the
denoising loss.

One affine map per fitted timestep minimises ``E ||A x_t + c - x0||^2`` over the training images with
fresh noise in every batch. The loss is a convex quadratic whose unique minimiser is the Wiener filter
(``A_t = J_t``, ``c_t = mu - a J_t mu``), so the fit is a numerical check of the paper's statement that a
linear model learns only pairwise pixel correlations; :attr:`TrainedLinearDenoiser.history` records how
far ``A_t`` is from the closed-form ``J_t`` as training goes.

The optimiser (chosen by measurement, see ``LinearConfig``): plain SGD with a constant step and
Polyak-Ruppert averaging of the iterates (for least squares, averaged constant-step SGD reaches the
statistical rate; Bach & Moulines 2013), in *whitened* input coordinates. With ``precondition="whiten"``
the model is written ``x0_hat = mu + U (M z + d)`` with ``z = D^-1/2 U^T (x_t - a mu)`` and
``D = a^2 lam + b2``, the input's covariance ``a^2 Sigma + b2 I = U D U^T`` from the data spectrum
(the standard "centre and whiten the inputs" preprocessing). This is only a change of variables,
``A = U M D^-1/2 U^T`` and ``c = mu + U d - a A mu``: every affine map is reachable, the loss and its
minimiser are unchanged, nothing constrains M (it is a dense matrix, started at 0), but the loss's Hessian
becomes the identity, so every direction converges at the same rate. Without it (``precondition="none"``,
SGD on A and c in pixel coordinates) the Hessian's condition number on MNIST is about 2e5 at t=0 and
the small-variance directions barely move. The noise is drawn directly in the eigenbasis, ``U^T eps``,
which is again a standard normal vector.

Variance reduction that keeps the gradient unbiased: images are visited in shuffled passes (epochs)
and each image appears in its batch twice, with noise ``eps`` and ``-eps`` (antithetic pairs), which
cancels the gradient terms linear in the noise. The step is ``lr / (lambda_max(H) + R^2 / m)`` with
``R^2`` the largest expected squared input norm over the training set and m the distinct images per
batch, the usual stability bound of SGD on least squares (heavy-tailed whitened data at low noise
forces small steps there).

Measured with the defaults on full MNIST (60,000 images, one CPU thread beside another busy process):
``||A_t - J_t||_F / ||J_t||_F`` is 0.020 (t=0) to 0.044 (t=900) at the 10 DDIM timesteps and
``||c_t - c*_t|| / ||c*_t||`` at most 0.046, in 37-54 s per timestep. The error falls like
1/sqrt(steps) (about 0.06 after 1000 steps): it is the sampling noise of the stochastic gradients,
about sqrt(n / number of noise draws). Plain SGD in pixel coordinates (``precondition="none"``) with
the same budget ends at 0.096 (t=500) and 0.50 (t=100).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from ..diffusion import timesteps_for
from ..distributed import tqdm
from ..errors import ConfigError
from ..schedules import NoiseLevel
from ..stats import Spectrum, data_spectrum
from ..data.dataset import DEFAULT_CHUNK
from ..device import resolve_dtype
from .base import Capabilities, Denoiser, DenoiserConfig
from .wiener import wiener_jacobian, wiener_shrinkage


def wiener_offset(spec: Spectrum, a: float, b2: float) -> torch.Tensor:
    """``c_t = mu - a J_t mu = U diag(b2 / (a^2 lam + b2)) U^T mu`` [n]: the offset of the Wiener filter."""
    U = spec.eigvecs
    return U @ ((b2 / (a * a * spec.eigvals + b2)) * (U.T @ spec.mean))


@dataclass
class LinearConfig(DenoiserConfig):
    timesteps: tuple[int, ...] | None = None  # fitted timesteps (--opt timesteps=900,500,100); None = 10 DDIM steps
    steps: int = 2000  # SGD steps per timestep
    batch_size: int = 512  # x_t per step (antithetic: batch_size / 2 images, each with eps and -eps)
    lr: float = 0.25  # step = lr / (lambda_max(H) + R^2 / images per batch); 0.1-0.5 work, near 1 it is noisy
    average_from: float = 0.5  # Polyak averaging starts by this fraction of the steps (earlier once converged)
    precondition: Literal["whiten", "none"] = "whiten"  # "whiten" (centred, whitened inputs) or "none" (plain SGD on A, c in pixels)
    antithetic: bool = True  # each image twice per batch, with eps and -eps
    seed: int = 0  # seeds the shuffling and the noise (torch.Generator seed * 1000 + t per timestep)
    eval_every: int = 100  # steps between history entries
    dtype: Literal["float32", "float64"] = "float32"  # arithmetic of the SGD steps (the averaged iterate and A_t, c_t are float64)
    cache: bool = True  # reuse the on-disk statistics cache
    progress: bool = True  # a tqdm bar over the SGD steps


class FitHistory(TypedDict):
    """How one timestep's fit went (a plain dict, ready for JSON): entries every ``eval_every`` steps."""

    timestep: int
    step: list[int]  # the step count of each entry
    rel_error: list[float]  # ||A_t - J_t||_F / ||J_t||_F of the current estimate (the Polyak average once it runs)
    loss: list[float]  # mean squared error per pixel of the SGD batches since the previous entry
    step_size: float  # the SGD step used
    averaged_from: int  # first step included in the Polyak average
    seconds: float
    final_rel_error: float  # of the stored A_t against wiener_jacobian, in pixel coordinates
    offset_rel_error: float  # ||c_t - c*_t|| / ||c*_t||, c*_t = mu - a J_t mu


def parse_timesteps(value, schedule) -> tuple[int, ...]:
    """``None`` -> the 10 DDIM timesteps; an int or a sequence of ints -> validated, descending, unique."""
    if value is None:
        return tuple(timesteps_for(10, "ddim", schedule))
    if not hasattr(value, "__iter__"):  # a single timestep
        value = [value]
    out = sorted({schedule.check_t(t) for t in value}, reverse=True)
    if not out:
        raise ConfigError("model 'linear': option timesteps is empty; give e.g. timesteps=900,500,100")
    return tuple(out)


def _index_stream(num: int, m: int, generator: torch.Generator, device) -> Iterator[torch.Tensor]:
    """Batches of ``m`` image indices from successive shuffled passes over ``num`` images."""
    buf = torch.empty(0, dtype=torch.long, device=device)
    while True:
        while buf.numel() < m:
            buf = torch.cat([buf, torch.randperm(num, generator=generator, device=device)])
        yield buf[:m]
        buf = buf[m:]


class TrainedLinearDenoiser(Denoiser):
    """``x0_hat = A_t x_t + c_t``, one affine map per fitted timestep, trained by SGD (fitted on construction).

    ``A[t]`` [n, n] and ``c[t]`` [n] are float64; ``history[t]`` is a :class:`FitHistory` dict. Calling it at a
    timestep it was not fitted at raises ConfigError.
    """

    name = "linear"
    Config = LinearConfig
    capabilities = Capabilities(closed_form_jacobian=True, constant_jacobian=True, trained=True)
    uses_statistics = True

    def __init__(self, data, config: LinearConfig, schedule=None, *, spectrum: Spectrum | None = None):
        super().__init__(data.shape, config, schedule)
        config = self.config  # typed and checked
        for key in ("steps", "batch_size", "eval_every"):
            if getattr(config, key) < 1:
                raise ConfigError(f"model 'linear': option {key} must be a positive integer, got {getattr(config, key)}")
        if config.antithetic and config.batch_size % 2:
            raise ConfigError(f"model 'linear': batch_size must be even with antithetic noise pairs, got "
                              f"{config.batch_size}; use an even batch_size or antithetic=false")
        if not (config.lr > 0 and 0 <= config.average_from <= 1):
            raise ConfigError(f"model 'linear': need lr > 0 and 0 <= average_from <= 1, got lr={config.lr}, "
                              f"average_from={config.average_from}")
        self.dtype = resolve_dtype(config.dtype)
        if not self.schedule.discrete:
            raise ConfigError("model 'linear' is fitted at the timesteps of a discrete (DDPM) schedule; build it on "
                              "one and evaluate it at any family's level of the same sigma")
        self.timesteps = parse_timesteps(config.timesteps, self.schedule)
        self.config = dataclasses.replace(config, timesteps=self.timesteps)  # record what was fitted
        self.capabilities = dataclasses.replace(self.capabilities, fitted_timesteps=self.timesteps)
        spec = spectrum if spectrum is not None else data_spectrum(data, device=self.device, cache=config.cache,
                                                                 progress=config.progress)
        self.spectrum = spec.to(self.device)
        self.A: dict[int, torch.Tensor] = {}
        self.c: dict[int, torch.Tensor] = {}
        self.history: dict[int, FitHistory] = {}
        self.fit(data)

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, data, timesteps: Sequence[int] | None = None) -> dict[int, FitHistory]:
        """Fit (A_t, c_t) on ``data`` at ``timesteps`` (default: the configured ones, refitting them) by SGD.

        Called on construction; call it again to add timesteps. Returns the new :class:`FitHistory` per
        timestep (all of them stay in ``self.history``).
        """
        ts = self.timesteps if timesteps is None else parse_timesteps(timesteps, self.schedule)
        if tuple(data.shape) != self.shape:
            raise ConfigError(f"model 'linear': data of shape {tuple(data.shape)} does not match {self.shape}")
        cfg = self.config
        if self.spectrum.fingerprint and self.spectrum.fingerprint != data.fingerprint:  # other data: its statistics
            self.spectrum = data_spectrum(data, device=self.device, cache=cfg.cache, progress=cfg.progress)
        spec = self.spectrum
        Y = torch.empty(len(data), data.dim, dtype=self.dtype, device=self.device)  # [N, n], resident
        start = 0
        for y in data.chunks(device=self.device, dtype=torch.float64, flat=True):
            if cfg.precondition == "whiten":
                y = (y - spec.mean) @ spec.eigvecs  # eigen coordinates of the centred images
            Y[start:start + y.shape[0]] = y
            start += y.shape[0]
        bar = tqdm(total=len(ts) * cfg.steps, desc="fit linear", unit="step", disable=not cfg.progress, leave=False)
        for t in ts:
            self.A[t], self.c[t], self.history[t] = self._fit_one(Y, t, bar)
        bar.close()
        if timesteps is not None:
            self.timesteps = tuple(sorted(set(self.timesteps) | set(ts), reverse=True))
            self.config = dataclasses.replace(self.config, timesteps=self.timesteps)
            self.capabilities = dataclasses.replace(self.capabilities, fitted_timesteps=self.timesteps)
        return {t: self.history[t] for t in ts}

    def _fit_one(self, Y: torch.Tensor, t: int, bar) -> tuple[torch.Tensor, torch.Tensor, FitHistory]:
        cfg, spec = self.config, self.spectrum
        a, b2 = self.schedule.a(t), self.schedule.b2(t)
        s = math.sqrt(b2)
        N, n = Y.shape
        whiten = cfg.precondition == "whiten"
        lam = spec.eigvals
        J = None if whiten else wiener_jacobian(spec, a, b2)  # [n, n] float64, for the history
        j = wiener_shrinkage(lam, a, b2)  # eigenvalues of J_t
        # R^2 = max over images of E||input||^2 (the noise adds its trace), and a bound on lambda_max(H)
        w64 = (a * a * lam + b2).rsqrt() if whiten else torch.ones_like(lam)  # D^-1/2 whitens a y' + s eps
        r2 = max(float((a * y.to(torch.float64) * w64).square().sum(1).max()) for y in Y.split(DEFAULT_CHUNK))
        if whiten:
            r2 += float((b2 * w64 * w64).sum())
            h_max = 1.0  # E[z z^T] = I and E[z] = 0
        else:
            r2 += n * b2 + 1.0  # the constant input of c
            h_max = a * a * float(lam[0] + spec.mean.square().sum()) + b2 + 1.0  # >= lambda_max(E[u u^T])
        w = w64.to(self.dtype)
        B = cfg.batch_size
        m = B // 2 if cfg.antithetic else B  # distinct images per batch
        step = cfg.lr / (h_max + r2 / m)
        avg_from = int(cfg.average_from * cfg.steps)
        if whiten:  # every direction contracts by (1 - 2 step) per step: the transient is below e^-4 by then
            avg_from = min(avg_from, math.ceil(2.0 / step))
        gen = torch.Generator(device=self.device).manual_seed(int(cfg.seed) * 1000 + t)
        stream = _index_stream(N, m, gen, self.device)
        M = torch.zeros(n, n, dtype=self.dtype, device=self.device)  # A = 0 ...
        d = torch.zeros(n, dtype=self.dtype, device=self.device)  # ... and c = mu (whiten: x0_hat = mu + U d)
        if not whiten:
            d += spec.mean.to(self.dtype)  # c = mu in pixel coordinates too
        M_sum, d_sum, count = torch.zeros_like(M, dtype=torch.float64), torch.zeros_like(d, dtype=torch.float64), 0
        hist = FitHistory(timestep=t, step=[], rel_error=[], loss=[], step_size=step, averaged_from=avg_from,
                          seconds=0.0, final_rel_error=float("nan"), offset_rel_error=float("nan"))
        loss_sum, loss_count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        t0 = time.perf_counter()
        for k in range(cfg.steps):
            y = Y[next(stream)]  # [m, n]
            eps = torch.randn(y.shape, generator=gen, device=self.device, dtype=self.dtype)
            if cfg.antithetic:
                y, eps = torch.cat([y, y]), torch.cat([eps, -eps])  # [B, n]
            z = a * y + s * eps  # x_t (pixels) or U^T (x_t - a mu) (eigen coordinates)
            if whiten:
                z = z * w  # whitened input
            r = torch.addmm(d, z, M.T) - y  # residual x0_hat - x0, [B, n]
            M.addmm_(r.T, z, alpha=-2.0 * step / B)  # SGD on (1/B) sum ||r||^2
            d.sub_(r.sum(0), alpha=2.0 * step / B)
            loss_sum += r.square().sum()
            loss_count += 1
            if k >= avg_from:  # Polyak-Ruppert average of the iterates (float64 running sums)
                count += 1
                M_sum.add_(M)
                d_sum.add_(d)
            if (k + 1) % cfg.eval_every == 0 or k + 1 == cfg.steps:
                M_est = M_sum / count if count else M.to(torch.float64)
                if whiten:  # ||M D^-1/2 - diag(j)||_F: the Frobenius norm is rotation invariant
                    err = (M_est * w64 - torch.diag(j)).norm() / j.norm()
                else:
                    err = (M_est - J).norm() / J.norm()
                hist["step"].append(k + 1)
                hist["rel_error"].append(float(err))
                hist["loss"].append(float(loss_sum) / (loss_count * B * n))  # mean squared error per pixel
                loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            bar.update(1)
        hist["seconds"] = time.perf_counter() - t0
        M_est = M_sum / count if count else M.to(torch.float64)
        d_est = d_sum / count if count else d.to(torch.float64)
        if whiten:  # back to pixels: A = U M D^-1/2 U^T, c = mu + U d - a A mu
            U = spec.eigvecs
            A = U @ (M_est * w64) @ U.T
            c = spec.mean + U @ d_est - a * (A @ spec.mean)
        else:
            A, c = M_est, d_est
        J_full = wiener_jacobian(spec, a, b2) if J is None else J
        c_star = wiener_offset(spec, a, b2)
        hist["final_rel_error"] = float((A - J_full).norm() / J_full.norm())
        hist["offset_rel_error"] = float((c - c_star).norm() / c_star.norm().clamp_min(1e-300))
        return A, c, hist

    # -- the denoiser ------------------------------------------------------------------------------
    def _fitted(self, t) -> tuple[int, float]:
        """The fitted timestep at the level ``t`` (a timestep, or a NoiseLevel at the same sigma as a fitted
        one, of any family) and the input scale ``a_t / a`` that brings ``x_t`` to the fitted level."""
        level = self.schedule.at(t)
        ts = self.schedule.timestep_of(level)
        if ts is None or ts not in self.A:
            fitted = sorted(self.A, reverse=True)
            at = f"t={ts}" if ts is not None else level.label
            add = f" (option timesteps={','.join(map(str, fitted + [ts]))})" if ts is not None else ""
            raise ConfigError(f"model 'linear' was fitted at timesteps {', '.join(map(str, fitted))} only, not at "
                              f"{at}; fit it there too{add} or evaluate it only at the fitted timesteps (the default "
                              "fits the 10 DDIM steps 900..0)")
        return ts, self.schedule.at(ts).a / level.a

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        t, scale = self._fitted(level)
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)  # [B, n]
        if scale != 1.0:  # a level of another family at the fitted sigma: x_t / a is what the map reads
            x = x * scale
        return torch.addmm(self.c[t], x, self.A[t].T).reshape(x_t.shape)  # A_t x_t + c_t

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the (input-independent) Jacobian ``A_t``, repeated for each input: [B, Q, n]."""
        t, scale = self._fitted(level)
        index = index.to(self.A[t].device)
        return (scale * self.A[t][index] if scale != 1.0 else self.A[t][index]).unsqueeze(0).expand(x_t.shape[0], -1, -1)

    def jacobian(self, t) -> torch.Tensor:
        """``A_t`` [n, n] (float64)."""
        ts, scale = self._fitted(t)
        return self.A[ts] if scale == 1.0 else scale * self.A[ts]

    def offset(self, t) -> torch.Tensor:
        """``c_t`` [n] (float64)."""
        return self.c[self._fitted(t)[0]]

    def settings(self) -> dict:
        out = super().settings()
        out["timesteps"] = list(self.timesteps)
        out["fit"] = {str(t): {"rel_error": h["final_rel_error"], "offset_rel_error": h["offset_rel_error"],
                               "seconds": round(h["seconds"], 3), "step_size": h["step_size"]}
                      for t, h in sorted(self.history.items(), reverse=True)}
        return out


__all__ = ["FitHistory", "LinearConfig", "TrainedLinearDenoiser", "parse_timesteps", "wiener_offset"]
