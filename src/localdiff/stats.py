"""Second-order statistics of a dataset: streaming mean/covariance, eigendecomposition, disk cache.

Every streaming reduction is a mergeable partial state (``MomentState.merge``), so shards of the data
can be reduced in separate processes and combined exactly (Chan et al.'s pairwise update).
Accumulation and eigendecomposition are float64. The covariance is the population one (divide by N):
it is the covariance of the empirical training distribution, for which the Wiener filter is exactly
the best linear denoiser.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CacheError
from .fileio import write_bytes

CACHE_VERSION = "moments-v1"


@dataclass
class MomentState:
    """Partial state of a streamed mean/covariance: count, mean [n] and centred scatter m2 [n,n], float64."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: str | torch.device = "cpu") -> "MomentState":
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(0, z, torch.zeros(n, n, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, x: torch.Tensor) -> "MomentState":
        """State of one chunk ``x`` [k, n] (promoted to float64)."""
        x = x.to(torch.float64)
        mean = x.mean(dim=0)
        xc = x - mean
        return cls(int(x.shape[0]), mean, xc.T @ xc)

    def merge(self, other: "MomentState") -> "MomentState":
        """Combine two partial states exactly (pairwise update of mean and scatter)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + torch.outer(delta, delta) * (self.count * other.count / n)
        return MomentState(n, mean, m2)

    def covariance(self) -> torch.Tensor:
        """Population covariance (divide by N), symmetrised."""
        if self.count == 0:
            raise ValueError("no data was reduced")
        cov = self.m2 / self.count
        return 0.5 * (cov + cov.T)


def moments(data, *, device: str | torch.device = "cpu", chunk: int = 4096,
            progress: bool = True) -> MomentState:
    """Stream the dataset once and return its MomentState."""
    state = MomentState.empty(data.dim, device)
    total = (len(data) + chunk - 1) // chunk
    for x in tqdm(data.chunks(chunk, device=device, dtype=torch.float64, flat=True), total=total,
                  desc="covariance", unit="chunk", disable=not progress, leave=False):
        state = state.merge(MomentState.of(x))
    return state


@dataclass
class Spectrum:
    """Mean ``mu`` [n] and covariance ``Sigma = U diag(lam) U^T`` (lam descending, >= 0), float64."""

    mean: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    count: int
    fingerprint: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self) -> torch.Tensor:
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    def to(self, device) -> "Spectrum":
        return Spectrum(self.mean.to(device), self.eigvals.to(device), self.eigvecs.to(device),
                        self.count, self.fingerprint)


def eigendecompose(mean: torch.Tensor, cov: torch.Tensor, count: int, fingerprint: str = "") -> Spectrum:
    """Symmetric eigendecomposition in float64; tiny negative eigenvalues from round-off are clamped to 0."""
    cov = cov.to(torch.float64)
    lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
    order = torch.argsort(lam, descending=True)
    lam, U = lam[order].clamp_min(0.0), U[:, order]
    return Spectrum(mean.to(torch.float64), lam.contiguous(), U.contiguous(), count, fingerprint)


def default_cache_dir() -> Path:
    env = os.environ.get("LOCALDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "localdiff"


def _cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / f"spectrum-{fingerprint[:32]}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_spectrum(spec: Spectrum, path: Path) -> None:
    """Write the spectrum atomically, with its data fingerprint and a checksum of the arrays."""
    from safetensors.torch import save

    tensors = {"mean": spec.mean.cpu().contiguous(), "eigvals": spec.eigvals.cpu().contiguous(),
               "eigvecs": spec.eigvecs.cpu().contiguous()}
    meta = {"version": CACHE_VERSION, "fingerprint": spec.fingerprint, "count": str(spec.count),
            "sha256": _digest(tensors)}
    write_bytes(path, save(tensors, metadata=meta))


def load_spectrum(path: Path, fingerprint: str) -> Spectrum:
    """Read a cached spectrum; raise CacheError if it is corrupt or belongs to other data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header or payload
        raise CacheError(f"cache file {path} is unreadable ({exc})") from exc
    if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
        raise CacheError(f"cache file {path} belongs to other data or another version")
    if set(tensors) != {"mean", "eigvals", "eigvecs"} or meta.get("sha256") != _digest(tensors):
        raise CacheError(f"cache file {path} fails its checksum")
    n = tensors["mean"].shape[0]
    if tensors["eigvals"].shape != (n,) or tensors["eigvecs"].shape != (n, n):
        raise CacheError(f"cache file {path} has inconsistent shapes")
    return Spectrum(tensors["mean"], tensors["eigvals"], tensors["eigvecs"], int(meta["count"]), fingerprint)


def data_spectrum(data, *, device: str | torch.device = "cpu", cache: bool | str | Path = True,
                  chunk: int = 4096, progress: bool = True) -> Spectrum:
    """Mean and eigendecomposed covariance of ``data``, cached on disk by the data's fingerprint.

    ``cache`` is True (default directory: $LOCALDIFF_CACHE or ~/.cache/localdiff), a directory, or
    False. A corrupt or mismatching cache file is reported with a warning, recomputed and replaced.
    """
    fingerprint = data.fingerprint
    path = None
    if cache:
        cache_dir = default_cache_dir() if cache is True else Path(cache)
        path = _cache_path(cache_dir, fingerprint)
        if path.exists():
            try:
                return load_spectrum(path, fingerprint).to(device)
            except CacheError as exc:
                warnings.warn(f"{exc}; recomputing it", RuntimeWarning, stacklevel=2)
    state = moments(data, device=device, chunk=chunk, progress=progress)
    spec = eigendecompose(state.mean, state.covariance(), state.count, fingerprint)
    if path is not None:
        try:
            save_spectrum(spec, path)
        except OSError as exc:
            warnings.warn(f"could not write the statistics cache {path}: {exc}", RuntimeWarning, stacklevel=2)
    return spec


def describe_spectrum(spec: Spectrum) -> dict:
    lam = spec.eigvals.cpu().numpy()
    total = float(lam.sum())
    frac = np.cumsum(lam) / total if total > 0 else np.zeros_like(lam)
    return {"count": spec.count, "dim": spec.dim, "total_variance": total,
            "components_for_90pct": int(np.searchsorted(frac, 0.9) + 1),
            "components_for_99pct": int(np.searchsorted(frac, 0.99) + 1)}


__all__ = ["MomentState", "Spectrum", "moments", "eigendecompose", "data_spectrum", "save_spectrum",
           "load_spectrum", "default_cache_dir", "describe_spectrum"]
