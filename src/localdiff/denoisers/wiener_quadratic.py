"""``wiener-quadratic``: statistics beyond pairs of pixels inside each pixel's neighbourhood
(docs/DESIGN.md §2.9; the paper's outlook).

The Wiener filter is the best map that is linear in ``x_t``; it reads only the data's mean and
covariance. This model adds, per output pixel i, the best *quadratic* correction in the k pixels of its
neighbourhood ``N_i`` (the k pixels most correlated with i, i first):

    x0_hat[i] = wiener_i(x_t) + beta_i . phi(z_i),   z_i = x_t[N_i] - a mu[N_i],
    phi(z) = [1, z_p, z_p z_q]  (p <= q in N_i),

with ``beta_i`` the least-squares fit of the Wiener residual ``r_i = y_i - wiener_i(x_t)`` over the
training set and the forward noise: ``E[phi phi^T] beta = E[phi r]``. Both expectations are exact in
closed form: over the noise by Isserlis' theorem (``z = u + s e``, ``u = a (y - mu)[N_i]``, ``s = sqrt(b2)``,
e standard normal), over the data by its moments up to order four inside ``N_i`` (computed once; they
do not depend on t) and by ``E[u_p u_q w]``, ``w = (y - mu)_i - a J_i (y - mu)``, per timestep:

    E[z z^T] = M2 + s^2 I,    E[z_p z_q z_r] = M3,
    E[z_p z_q z_r z_w] = M4 + s^2 (d_pq M2_rw + 5 more pairings) + s^4 (d_pq d_rw + d_pr d_qw + d_pw d_qr),
    E[r] = 0,   E[z_p r] = a E[u'_p w] - s^2 J_ip,   E[z_p z_q r] = a^2 E[u'_p u'_q w] + s^2 d_pq E[w]

(M_k: moments of ``u``, which is centred, so odd terms with one ``u`` vanish; ``u' = (y - mu)[N_i]``;
J the Wiener Jacobian). ``beta = 0`` is Wiener, so on the training distribution it is never worse than
Wiener. A small ridge (each feature's, relative to its own Gram diagonal entry, so that rescaling the
features changes nothing) keeps the solve well posed on constant pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..schedules import NoiseLevel
from ..stats import Spectrum, data_spectrum
from .base import Capabilities, DenoiserConfig
from .stream import StreamConfig, StreamedDenoiser, TrainingSet
from .wiener import wiener_apply, wiener_jacobian


@dataclass
class WienerQuadraticConfig(DenoiserConfig):
    k: int = 6  # neighbourhood size: the k pixels most correlated with the output pixel (itself first)
    ridge: float = 1e-8  # Tikhonov term, relative to each feature's diagonal entry of the pixel's Gram matrix
    pixel_block: int = 32  # output pixels per step when computing moments (memory: block x images x k^2)
    cache: bool = True  # reuse the on-disk statistics cache


def correlation_neighbourhoods(spec: Spectrum, k: int) -> torch.Tensor:
    """``N`` [n, k] (long): per pixel i, i itself then the k - 1 pixels m of largest ``|corr(m, i)|``."""
    C = spec.covariance()
    d = C.diagonal().clamp(min=0).sqrt()
    d = torch.where(d > 1e-12, d, torch.ones_like(d))
    corr = (C / d[:, None] / d[None, :]).abs()
    corr.fill_diagonal_(float("inf"))  # the pixel itself first
    return torch.topk(corr, k, dim=0).indices.T.contiguous()  # [n, k]


def data_moments(train: TrainingSet, mu: torch.Tensor, nbhd: torch.Tensor, block: int):
    """Moments of the centred data inside each neighbourhood, float64: M2 [n, k, k], M3 [n, k, k*k],
    M4 [n, k*k, k*k] (``E[v_p v_q v_r v_w]`` with v = (y - mu)[N_i], pairs flattened)."""
    n, k = nbhd.shape
    K = len(train)
    M2 = torch.zeros(n, k, k, dtype=torch.float64)
    M3 = torch.zeros(n, k, k * k, dtype=torch.float64)
    M4 = torch.zeros(n, k * k, k * k, dtype=torch.float64)
    for _, y, _ in train:
        yc = y.to(torch.float64) - mu  # [b, n]
        for p0 in range(0, n, block):
            v = yc[:, nbhd[p0:p0 + block]].transpose(0, 1)  # [P, b, k]
            vv = (v[..., :, None] * v[..., None, :]).reshape(v.shape[0], v.shape[1], k * k)  # [P, b, k^2]
            M2[p0:p0 + block] += v.transpose(1, 2) @ v
            M3[p0:p0 + block] += v.transpose(1, 2) @ vv
            M4[p0:p0 + block] += vv.transpose(1, 2) @ vv
    return M2 / K, M3 / K, M4 / K


def isserlis_fourth(M2: torch.Tensor, s2: float) -> torch.Tensor:
    """``E[z_p z_q z_r z_w] - M4`` for ``z = u + s e``: the s^2 and s^4 pairings [n, k*k, k*k] ((p,q), (r,w))."""
    n, k, _ = M2.shape
    eye = torch.eye(k, dtype=M2.dtype)
    terms = (torch.einsum("pq,nrw->npqrw", eye, M2) + torch.einsum("pr,nqw->npqrw", eye, M2)
             + torch.einsum("pw,nqr->npqrw", eye, M2) + torch.einsum("qr,npw->npqrw", eye, M2)
             + torch.einsum("qw,npr->npqrw", eye, M2) + torch.einsum("rw,npq->npqrw", eye, M2))
    consts = (torch.einsum("pq,rw->pqrw", eye, eye) + torch.einsum("pr,qw->pqrw", eye, eye)
              + torch.einsum("pw,qr->pqrw", eye, eye))
    return (s2 * terms + s2 * s2 * consts[None]).reshape(n, k * k, k * k)


class WienerQuadraticDenoiser(StreamedDenoiser):
    """Wiener plus, per pixel, the exact least-squares quadratic correction in its k most correlated
    pixels (module docstring): third- and fourth-order statistics inside the neighbourhood."""

    name = "wiener-quadratic"
    Config = WienerQuadraticConfig
    capabilities = Capabilities(closed_form_jacobian=True, single_image_exact=True)
    uses_statistics = True

    def __init__(self, data, config: WienerQuadraticConfig, schedule=None, *, spectrum: Spectrum | None = None):
        super().__init__(data, config, schedule)
        c = self.config
        if not 1 <= c.k <= self.dim:
            raise ConfigError(f"{self.name}: k must be between 1 and {self.dim}, got {c.k}")
        if not c.ridge >= 0 or c.pixel_block < 1:
            raise ConfigError(f"{self.name}: ridge must be >= 0 and pixel_block positive")
        spec = spectrum if spectrum is not None else data_spectrum(data, device="cpu", cache=c.cache)
        self.spectrum = spec.to("cpu")
        self.nbhd = correlation_neighbourhoods(self.spectrum, c.k)  # [n, k]
        self.M2, self.M3, self.M4 = data_moments(self.train_set, self.spectrum.mean, self.nbhd, c.pixel_block)
        k = c.k
        self.pairs = torch.tensor([p * k + q for p in range(k) for q in range(p, k)])  # (p, q), p <= q, flat
        self._beta: dict[tuple, torch.Tensor] = {}  # per level (a, b2)

    def stream_options(self) -> StreamConfig:
        return StreamConfig(dtype=torch.float64, resident=False)  # moments in float64, streamed once per t

    def training_set(self, data) -> TrainingSet:
        c = self.stream_config  # on the CPU whatever the device: the moments are small, the set streamed
        return TrainingSet(data, device=torch.device("cpu"), dtype=c.dtype, chunk=c.chunk, resident=c.resident)

    def settings(self) -> dict:
        return {**super().settings(), "neighbourhood": "k most correlated pixels (itself first)"}

    def coefficients(self, t) -> torch.Tensor:
        """``beta`` [n, 1 + k + k(k+1)/2] at the level ``t`` (cached): intercept, linear, quadratic terms (p <= q)."""
        level = self.schedule.at(t)
        if level.key in self._beta:
            return self._beta[level.key]
        a, b2 = level.a, level.b2
        n, k = self.nbhd.shape
        J = wiener_jacobian(self.spectrum, a, b2)  # [n, n]
        mu = self.spectrum.mean
        # E[u' w] and E[u'_p u'_q w] with w = (y - mu)_i - a J_i (y - mu), per pixel
        Ew = torch.zeros(n, dtype=torch.float64)
        Euw = torch.zeros(n, k, dtype=torch.float64)
        Euuw = torch.zeros(n, k * k, dtype=torch.float64)
        for _, y, _ in self.train_set:
            yc = y.to(torch.float64) - mu  # [b, n]
            w = yc - a * yc @ J.T  # [b, n]
            Ew += w.sum(0)
            for p0 in range(0, n, self.config.pixel_block):
                v = yc[:, self.nbhd[p0:p0 + self.config.pixel_block]].transpose(0, 1)  # [P, b, k]
                wi = w[:, p0:p0 + v.shape[0]].T.unsqueeze(-1)  # [P, b, 1]
                Euw[p0:p0 + v.shape[0]] += (v * wi).sum(1)
                vv = (v[..., :, None] * v[..., None, :]).reshape(v.shape[0], v.shape[1], k * k)
                Euuw[p0:p0 + v.shape[0]] += (vv * wi).sum(1)
        K = len(self.train_set)
        Ew, Euw, Euuw = Ew / K, Euw / K, Euuw / K
        s2 = b2
        eye = torch.eye(k, dtype=torch.float64)
        pr = self.pairs
        F = 1 + k + len(pr)
        gram = torch.zeros(n, F, F, dtype=torch.float64)
        gram[:, 0, 0] = 1.0
        Ezz = a * a * self.M2 + s2 * eye  # [n, k, k]
        gram[:, 0, 1 + k:] = gram[:, 1 + k:, 0] = Ezz.reshape(n, k * k)[:, pr]
        gram[:, 1:1 + k, 1:1 + k] = Ezz
        gram[:, 1:1 + k, 1 + k:] = a ** 3 * self.M3[:, :, pr]
        gram[:, 1 + k:, 1:1 + k] = a ** 3 * self.M3[:, :, pr].transpose(1, 2)
        gram[:, 1 + k:, 1 + k:] = (a ** 4 * self.M4 + isserlis_fourth(a * a * self.M2, s2))[:, pr][:, :, pr]
        J_n = torch.gather(J, 1, self.nbhd)  # [n, k]: J[i, N_i]
        quad = a * a * Euuw + s2 * Ew[:, None] * eye.reshape(1, -1)
        rhs = torch.cat([Ew[:, None], a * Euw - s2 * J_n, quad[:, pr]], 1)
        # ridge relative to each feature's own second moment (every one has the noise's, so > 0): rescaling
        # the features (x_t = a y of another family at the same sigma) rescales it alike, so x0_hat depends on
        # sigma only
        reg = self.config.ridge * gram.diagonal(dim1=1, dim2=2).clamp(min=1e-300)  # [n, F]
        beta = torch.linalg.solve(gram + torch.diag_embed(reg), rhs.unsqueeze(-1)).squeeze(-1)
        self._beta[level.key] = beta
        return beta

    def _features(self, x: torch.Tensor, a: float) -> torch.Tensor:
        """``phi(z_i)`` [B, n, 1 + k + k(k+1)/2] for flat ``x`` [B, n]."""
        z = x[:, self.nbhd.to(x.device)] - a * self.spectrum.mean.to(x)[self.nbhd.to(x.device)]  # [B, n, k]
        zz = (z[..., :, None] * z[..., None, :]).flatten(2)[..., self.pairs.to(x.device)]
        return torch.cat([torch.ones_like(z[..., :1]), z, zz], dim=2)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        a, b2 = level.a, level.b2
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        beta = self.coefficients(level).to(x.device)
        spec = self.spectrum if x.device.type == "cpu" else self.spectrum.to(x.device)
        out = wiener_apply(spec, x, a, b2) + (self._features(x, a) * beta).sum(-1)
        return out.reshape(x_t.shape)

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` [B, Q, n]: Wiener's ``J_t`` plus, on ``N_i``,
        ``beta_p + sum_q (B + B^T)_pq z_q`` with B the quadratic coefficients on p <= q (0 below)."""
        a, b2 = level.a, level.b2
        k = self.nbhd.shape[1]
        index = index.cpu()
        x = x_t.reshape(x_t.shape[0], -1).to("cpu", torch.float64)
        beta = self.coefficients(level)[index]  # [Q, F]
        nb = self.nbhd[index]  # [Q, k]
        z = x[:, nb] - a * self.spectrum.mean[nb]  # [B, Q, k]
        quad = beta.new_zeros(len(index), k * k)
        quad[:, self.pairs] = beta[:, 1 + k:]
        quad = quad.reshape(-1, k, k)
        grad = beta[:, 1:1 + k] + torch.einsum("qpr,bqr->bqp", quad + quad.transpose(1, 2), z)  # [B, Q, k]
        rows = wiener_jacobian(self.spectrum, a, b2)[index].expand(x.shape[0], -1, -1).clone()
        rows.scatter_add_(2, nb.expand(x.shape[0], -1, -1), grad)
        return rows


__all__ = ["WienerQuadraticConfig", "WienerQuadraticDenoiser", "correlation_neighbourhoods", "data_moments",
           "isserlis_fourth"]
