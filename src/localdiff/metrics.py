"""Evaluation (docs/DESIGN.md §4): R² and MSE of a model's x0_hat against a reference (the U-Net), per
sampling step in two modes, and each image's distance to its nearest training image (memorisation).

* ``r2_score``: the official definition, per sample ``R2 = 1 - sum (x - y)^2 / (n Var(y))`` with y
  the reference output and ``Var`` the population variance over its n values; averaged over samples.
* "own trajectory": the model's x0_hat at step s along its own trajectory against the reference's
  x0_hat at step s along the reference's own trajectory, both from the same initial noise (how the
  paper compares models).
* "single step": at step s the reference is applied to the model's own x_t, so the comparison
  isolates one denoising call from the drift of the two trajectories apart.

All arithmetic is float64. Nothing here prints or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .data.dataset import DEFAULT_CHUNK, to_float
from .data.shards import shard_of
from .distributed import gather, tqdm
from .errors import ConfigError

MODES = ("own_trajectory", "single_step")


def _flat(x) -> torch.Tensor:
    """``[N, ...]`` -> float64 ``[N, n]`` on the CPU."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ConfigError(f"expected a batch [N, ...] of images, got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)


def _check_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(x.shape) != tuple(y.shape):
        raise ConfigError(f"cannot compare images of shape {tuple(x.shape)} with a reference of shape {tuple(y.shape)}")
    return _flat(x), _flat(y)


def r2_score(x, y) -> torch.Tensor:
    """Per-sample R² [N] of ``x`` against the reference ``y`` (both [N, ...]): ``1 - SS_res / (n Var(y))``.

    NaN for a sample whose reference is constant (``Var(y) = 0``: R² is undefined there).
    """
    x, y = _check_pair(x, y)
    ss_res = ((x - y) ** 2).sum(dim=1)  # [N]
    ss_tot = ((y - y.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)  # [N] = n * Var(y)
    r2 = 1.0 - ss_res / ss_tot
    return torch.where(ss_tot > 0, r2, torch.full_like(r2, float("nan")))


def mse(x, y) -> torch.Tensor:
    """Per-sample mean squared error [N] over the n values of each image."""
    x, y = _check_pair(x, y)
    return ((x - y) ** 2).mean(dim=1)


@dataclass
class StepComparison:
    """R² and MSE per step and sample, ``r2`` and ``mse`` [S, N] float64, against a reference; ``timesteps``
    holds each step's key (``"900"``, or ``"s=1.23"`` for a continuous level)."""

    timesteps: list[str]
    r2: torch.Tensor
    mse: torch.Tensor

    def mean_r2(self) -> list[float]:
        """R² per step, averaged over samples (the official reduction)."""
        return [float(v) for v in self.r2.mean(dim=1)]

    def mean_mse(self) -> list[float]:
        return [float(v) for v in self.mse.mean(dim=1)]

    def by_step(self) -> dict[str, dict[str, float]]:
        """``{"900": {"r2": ..., "mse": ...}, ...}``: sample means keyed by timestep."""
        return {str(t): {"r2": r, "mse": m} for t, r, m in zip(self.timesteps, self.mean_r2(), self.mean_mse())}


def compare_steps(x0_hat, reference, timesteps) -> StepComparison:
    """Compare per-step estimates ``x0_hat`` [S, N, ...] with ``reference`` [S, N, ...] at every step
    (``timesteps``: the steps' keys)."""
    x0_hat, reference = torch.as_tensor(x0_hat), torch.as_tensor(reference)
    if tuple(x0_hat.shape) != tuple(reference.shape):
        raise ConfigError(f"trajectories differ in shape: {tuple(x0_hat.shape)} vs {tuple(reference.shape)}")
    if x0_hat.shape[0] != len(timesteps):
        raise ConfigError(f"{x0_hat.shape[0]} steps but {len(timesteps)} timesteps")
    r2 = torch.stack([r2_score(a, b) for a, b in zip(x0_hat, reference)])  # [S, N]
    err = torch.stack([mse(a, b) for a, b in zip(x0_hat, reference)])  # [S, N]
    return StepComparison([str(t) for t in timesteps], r2, err)


def own_trajectory_comparison(model, reference) -> StepComparison:
    """Each step's x0_hat of ``model`` against ``reference``, both :class:`Trajectory` runs from the same noise."""
    for name, traj in (("model", model), ("reference", reference)):
        if traj.x0_hat is None:
            raise ConfigError(f"the {name} trajectory has no per-step x0_hat; sample with return_trajectory=True")
    if list(model.keys) != list(reference.keys):
        raise ConfigError(f"the trajectories visit different levels: {model.keys} vs {reference.keys}")
    if model.xt is not None and reference.xt is not None and not torch.equal(model.xt[0], reference.xt[0]):
        raise ConfigError("the trajectories start from different initial noise; use the same seed or init_noise")
    return compare_steps(model.x0_hat, reference.x0_hat, model.keys)


def reference_on_trajectory(reference: Callable[[torch.Tensor, int], torch.Tensor], traj, *,
                            batch_size: int | None = None, progress: bool = False,
                            desc: str = "single step") -> torch.Tensor:
    """``reference(x_t, level)`` at every step's x_t and level of ``traj`` -> [S, N, C, H, W] float32 on the CPU."""
    if traj.xt is None:
        raise ConfigError("the trajectory has no per-step x_t; sample with return_trajectory=True")
    device = getattr(reference, "device", torch.device("cpu"))
    N = traj.xt.shape[1]
    bs = N if batch_size is None else max(1, int(batch_size))
    out = torch.empty(traj.xt.shape, dtype=torch.float32)
    with torch.no_grad():
        for s, t in enumerate(tqdm(traj.steps, desc=desc, unit="step", disable=not progress, leave=False)):
            for start in range(0, N, bs):
                x = traj.xt[s, start:start + bs].to(device)
                out[s, start:start + bs] = reference(x, t).detach().to("cpu", torch.float32)
    return out


def single_step_comparison(traj, reference, *, batch_size: int | None = None,
                           progress: bool = False) -> tuple[StepComparison, torch.Tensor]:
    """The model's x0_hat at each step against ``reference`` applied to the model's own x_t at that step.

    Returns the comparison and the reference's outputs [S, N, C, H, W].
    """
    ref = reference_on_trajectory(reference, traj, batch_size=batch_size, progress=progress)
    return compare_steps(traj.x0_hat, ref, traj.keys), ref


# -- memorisation: distance to the nearest training image -------------------------------------

@dataclass
class NearestImages:
    """Per query: L2 distance (data scale [-1, 1]) to its nearest and second-nearest training image.

    ``ratio = distance / second`` is the usual memorisation score: near 0 when a query copies one
    training image far more closely than any other.
    """

    distance: torch.Tensor  # [Q] float64
    index: torch.Tensor  # [Q] int64, index into the training set
    second: torch.Tensor  # [Q] float64 (inf when the training set holds one image)
    image: torch.Tensor | None = None  # [Q, C, H, W] float32: the nearest training image itself

    @property
    def ratio(self) -> torch.Tensor:
        return self.distance / self.second

    def summary(self) -> dict:
        d = self.distance
        return {"mean": float(d.mean()), "median": float(d.median()), "min": float(d.min()),
                "max": float(d.max()), "mean_ratio_to_second": float(self.ratio.mean())}


def nearest_training_distances(queries, data, *, chunk: int = DEFAULT_CHUNK, query_chunk: int = 1024,
                               device: str | torch.device = "cpu", progress: bool = False) -> NearestImages:
    """Distance of each image in ``queries`` [Q, C, H, W] to its nearest image in ``data`` (an ImageDataset).

    Streams over the training set in chunks of ``chunk`` images (and the queries in chunks of
    ``query_chunk``), so at most ``query_chunk x chunk`` squared distances exist at once. The
    candidates are found with ``||q||^2 + ||y||^2 - 2 q.y`` (float64); the two winners' distances are
    then recomputed directly as ``||q - y||``, so an exact copy has distance 0 (a float32 copy of a
    uint8 image: about 1e-7, the float32 rounding of its values). ``data`` may be a rank's shard: every
    rank then finds its two nearest images per query and the ranks' winners are merged (exact distances,
    ties to the lower index), so every rank gets the answer for the whole set.
    """
    q_all = _flat(queries)  # [Q, n]
    if q_all.shape[1] != data.dim:
        raise ConfigError(f"queries have {q_all.shape[1]} values per image, the training set {data.dim}")
    if chunk < 1 or query_chunk < 1:
        raise ConfigError("chunk and query_chunk must be positive")
    device = torch.device(device)
    Q = q_all.shape[0]
    best_d = torch.full((Q, 2), float("inf"), dtype=torch.float64)
    best_i = torch.full((Q, 2), -1, dtype=torch.long)
    total = (len(data) + chunk - 1) // chunk
    shard = shard_of(data)
    offset = start = shard.start if shard is not None else 0  # global index of this process's first image
    for y in tqdm(data.chunks(chunk, device=device, dtype=torch.float64, flat=True), total=total,
                  desc="nearest training image", unit="chunk", disable=not progress, leave=False):
        y_sq = (y * y).sum(dim=1)  # [k]
        k = y.shape[0]
        for q0 in range(0, Q, query_chunk):
            q = q_all[q0:q0 + query_chunk].to(device)  # [q, n]
            d2 = (q * q).sum(dim=1, keepdim=True) + y_sq[None, :] - 2.0 * (q @ y.T)  # [q, k]
            kk = min(2, k)
            v, i = torch.topk(d2, kk, dim=1, largest=False)  # [q, kk]
            cand_d = torch.cat([best_d[q0:q0 + query_chunk], v.cpu()], dim=1)
            cand_i = torch.cat([best_i[q0:q0 + query_chunk], (i + start).cpu()], dim=1)
            order = torch.argsort(cand_d, dim=1, stable=True)[:, :2]
            best_d[q0:q0 + query_chunk] = torch.gather(cand_d, 1, order)
            best_i[q0:q0 + query_chunk] = torch.gather(cand_i, 1, order)
        start += k
    # exact distances of the two winners (the expanded form loses digits for near-copies)
    exact = torch.full((Q, 2), float("inf"), dtype=torch.float64)
    for j in range(2):
        valid = best_i[:, j] >= 0
        if valid.any():
            y = to_float(data.raw[best_i[valid, j].numpy() - offset], dtype=torch.float64)
            exact[valid, j] = (q_all[valid] - y.reshape(int(valid.sum()), -1)).norm(dim=1)
    # re-rank after the exact recomputation (ties of the expanded form may swap)
    swap = exact[:, 1] < exact[:, 0]
    exact[swap] = exact[swap].flip(1)
    best_i[swap] = best_i[swap].flip(1)
    image = to_float(data.raw[best_i[:, 0].clamp_min(offset).numpy() - offset])  # [Q, C, H, W]
    if shard is not None:  # every rank's two winners, in rank (= index) order: the two nearest of all
        parts = gather((exact, best_i, image))
        exact, best_i = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)  # [Q, 2P]
        order = torch.argsort(exact, dim=1, stable=True)[:, :2]
        image = torch.stack([p[2] for p in parts], 1)[torch.arange(Q), order[:, 0] // 2]  # the winner's rank
        exact, best_i = torch.gather(exact, 1, order), torch.gather(best_i, 1, order)
    return NearestImages(distance=exact[:, 0], index=best_i[:, 0], second=exact[:, 1], image=image)


__all__ = ["MODES", "r2_score", "mse", "StepComparison", "compare_steps", "own_trajectory_comparison",
           "reference_on_trajectory", "single_step_comparison", "NearestImages", "nearest_training_distances"]
