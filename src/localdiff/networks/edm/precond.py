"""EDM's four preconditionings (Karras et al. 2022, Table 1) around a U-Net F: the denoiser
``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))``, with x = y + sigma n.

=======  ==========================  =========================  ====================  ==================================
name     c_skip                      c_out                      c_in                  c_noise
=======  ==========================  =========================  ====================  ==================================
vp       1                           -sigma                     1/sqrt(sigma^2+1)     (M-1) sigma_vp^-1(sigma)
ve       1                           sigma                      1                     log(sigma/2)
iddpm    1                           -sigma                     1/sqrt(sigma^2+1)     M-1-argmin_j |u_j - sigma|
edm      sd^2/(sigma^2+sd^2)         sigma sd/sqrt(sigma^2+sd^2)  1/sqrt(sd^2+sigma^2)  log(sigma)/4
=======  ==========================  =========================  ====================  ==================================

VP: ``sigma_vp(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``, trained on t in [epsilon_t, 1]. iDDPM:
the discrete table ``u_M = 0``, ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1)`` with
``abar(j) = sin^2(pi j / (2 M (C_2 + 1)))``; its network predicts 2C channels (noise and variance), the
first C are used. The coefficients are computed in float32 in EDM's order of operations, so a loaded
network returns what EDM's code returns, bit for bit on a CPU.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from .dhariwal_unet import DhariwalUNet
from .song_unet import SongUNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
CLASS_NAMES = {"vp": "VPPrecond", "ve": "VEPrecond", "iddpm": "iDDPMPrecond", "edm": "EDMPrecond"}
PRECONDS = {cls: name for name, cls in CLASS_NAMES.items()}
COMMON_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "model_type")
DEFAULTS: dict[str, dict] = {  # each preconditioning's own keyword arguments and their defaults
    "vp": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet"),
    "ve": dict(sigma_min=0.02, sigma_max=100.0, model_type="SongUNet"),
    "iddpm": dict(C_1=0.001, C_2=0.008, M=1000, model_type="DhariwalUNet"),
    "edm": dict(sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5, model_type="DhariwalUNet"),
}


def precond_name(class_name: str) -> str:
    """``"VPPrecond"`` or ``"training.networks.VPPrecond"`` (or ``"vp"``) -> ``"vp"``; ConfigError otherwise."""
    short = str(class_name).rsplit(".", 1)[-1]
    if short in PRECONDS:
        return PRECONDS[short]
    if short.lower() in CLASS_NAMES:
        return short.lower()
    raise ConfigError(f"unknown EDM preconditioning class {class_name!r}; localdiff implements "
                      f"{', '.join(CLASS_NAMES.values())} (NVlabs/edm training/networks.py)")


# -- the closed forms (float32 tensors, EDM's order of operations) ---------------------------------------


def vp_sigma(t, beta_d: float, beta_min: float) -> Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of the VP SDE."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """t(sigma), the inverse of :func:`vp_sigma`: (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def iddpm_alpha_bar(j, M: int, C_2: float) -> Tensor:
    """The cosine schedule abar(j) = sin^2(pi j / (2 M (C_2 + 1))) at integer step j (float32)."""
    j = torch.as_tensor(j)
    return (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_sigma_table(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> Tensor:
    """The iDDPM noise levels u_0 > u_1 > ... > u_M = 0 as EDM computes them: [M + 1] float32."""
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        ratio = (iddpm_alpha_bar(j - 1, M, C_2) / iddpm_alpha_bar(j, M, C_2)).clip(min=C_1)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
    return u


def nearest_index(sigma: Tensor, u: Tensor) -> Tensor:
    """argmin_j |u_j - sigma| for each sigma, ties to the lower j (EDM's rounding, through torch.cdist)."""
    d = torch.cdist(sigma.to(u.device).to(torch.float32).reshape(1, -1, 1), u.reshape(1, -1, 1))  # [1, N, M+1]
    return d.argmin(2).reshape(sigma.shape)


# -- the network ---------------------------------------------------------------------------------------


class EDMNetwork(nn.Module):
    """A preconditioned EDM denoiser D(x; sigma) (EDM's ``VPPrecond`` / ``VEPrecond`` / ``iDDPMPrecond`` /
    ``EDMPrecond``), built from the keyword arguments EDM records for it (``init_kwargs``).

    Its state_dict keys are EDM's (``model.enc.16x16_conv.weight`` ..., ``u`` for iDDPM), so an EDM
    state_dict loads with ``strict=True``. ``forward(x, sigma, class_labels)``: x [B, C, R, R] in EDM's
    variance-exploding scaling x = y + sigma n; sigma [B], [B, 1, 1, 1] or a scalar; class_labels
    [B, label_dim] (one-hot) or None (zeros) -> D(x; sigma) [B, C, R, R] float32.
    """

    def __init__(self, precond: str, init_kwargs: Mapping):
        super().__init__()
        self.precond = precond_name(precond)
        kwargs = copy.deepcopy(dict(init_kwargs))
        self.init_kwargs = copy.deepcopy(dict(init_kwargs))  # as recorded (defaults not filled in), JSON-able
        own = DEFAULTS[self.precond]
        for key in ("img_resolution", "img_channels"):
            if key not in kwargs:
                raise ConfigError(f"the {CLASS_NAMES[self.precond]} keyword arguments lack {key!r}: {sorted(kwargs)}")
        self.img_resolution = int(kwargs.pop("img_resolution"))
        self.img_channels = int(kwargs.pop("img_channels"))
        self.label_dim = int(kwargs.pop("label_dim", 0))
        self.use_fp16 = bool(kwargs.pop("use_fp16", False))
        self.architecture = str(kwargs.pop("model_type", own["model_type"]))
        params = {k: kwargs.pop(k, v) for k, v in own.items() if k != "model_type"}
        self.hyper = params  # the preconditioning's own constants (beta_d, M, sigma_data ...)
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown EDM model_type {self.architecture!r}; localdiff implements "
                              f"{', '.join(ARCHITECTURES)}")
        model_cls = ARCHITECTURES[self.architecture]
        allowed = set(inspect.signature(model_cls.__init__).parameters) - {"self", "img_resolution", "in_channels",
                                                                           "out_channels", "label_dim"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(f"{CLASS_NAMES[self.precond]}({self.architecture}) does not take {unknown}; "
                              f"its model takes {sorted(allowed)}")
        out_channels = self.img_channels * (2 if self.precond == "iddpm" else 1)
        try:
            self.model = model_cls(img_resolution=self.img_resolution, in_channels=self.img_channels,
                                   out_channels=out_channels, label_dim=self.label_dim, **kwargs)
        except (TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise ConfigError(f"cannot build {self.architecture} from {kwargs}: {exc}") from exc
        if self.precond == "iddpm":
            self.register_buffer("u", iddpm_sigma_table(int(params["M"]), float(params["C_1"]), float(params["C_2"])))
        if self.precond == "vp":
            self._vp_range = (float(vp_sigma(params["epsilon_t"], params["beta_d"], params["beta_min"])),
                              float(vp_sigma(1, params["beta_d"], params["beta_min"])))

    # -- the noise levels it supports --------------------------------------------------------------------
    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.precond]

    @property
    def sigma_min(self) -> float:
        """The lowest noise level it was trained on (EDM's ``net.sigma_min``; 0 for EDM, u_{M-1} for iDDPM)."""
        if self.precond == "vp":
            return self._vp_range[0]
        if self.precond == "iddpm":
            return float(self.u[int(self.hyper["M"]) - 1])
        return float(self.hyper["sigma_min"])

    @property
    def sigma_max(self) -> float:
        """The highest noise level it was trained on (EDM's ``net.sigma_max``; inf for EDM, u_0 for iDDPM)."""
        if self.precond == "vp":
            return self._vp_range[1]
        if self.precond == "iddpm":
            return float(self.u[0])
        return float(self.hyper["sigma_max"])

    @property
    def sigma_data(self) -> float | None:
        return self.hyper.get("sigma_data")

    @property
    def discrete_sigmas(self) -> Tensor | None:
        """iDDPM: the M noise levels it was trained on, u_{M-1} < ... < u_0, float64 [M]; otherwise None.
        (:meth:`round_sigma` rounds to the M + 1 entries of u, 0 included, as EDM does.)"""
        if self.precond != "iddpm":
            return None
        return self.u[: int(self.hyper["M"])].to(torch.float64).flip(0)

    def round_sigma(self, sigma, return_index: bool = False) -> Tensor:
        """The nearest noise level the network knows (iDDPM: an entry of u, in sigma's dtype); else sigma."""
        sigma = torch.as_tensor(sigma)
        if self.precond != "iddpm":
            return sigma
        index = nearest_index(sigma, self.u)
        if return_index:
            return index.to(sigma.device)
        return self.u[index.flatten()].to(sigma.dtype).reshape(sigma.shape).to(sigma.device)

    # -- Table 1 -----------------------------------------------------------------------------------------
    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 at ``sigma`` (float32, sigma's shape)."""
        sigma = torch.as_tensor(sigma).to(torch.float32)
        one = torch.ones_like(sigma)
        h = self.hyper
        if self.precond == "vp":
            c_noise = (int(h["M"]) - 1) * vp_sigma_inv(sigma, h["beta_d"], h["beta_min"])
            return one, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise
        if self.precond == "ve":
            return one, sigma, one, (0.5 * sigma).log()
        if self.precond == "iddpm":
            index = self.round_sigma(sigma, return_index=True).to(torch.float32)
            return one, -sigma, 1 / (sigma ** 2 + 1).sqrt(), int(h["M"]) - 1 - index
        sd = float(h["sigma_data"])
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        return c_skip, c_out, 1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None, *, force_fp32: bool = False) -> Tensor:
        """D(x; sigma): x [B, C, R, R], sigma [B] / scalar, class_labels [B, label_dim] or None -> [B, C, R, R] float32.

        On CUDA with ``use_fp16`` the U-Net runs in float16 (unless ``force_fp32``), as in EDM."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ConfigError(f"{sigma.shape[0]} noise levels for a batch of {x.shape[0]} images; "
                              f"give one or one per image")
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        elif class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim:
            raise ConfigError(f"class labels of shape {tuple(class_labels.shape)}; this network takes one-hot labels "
                              f"[B, {self.label_dim}] (or None)")
        else:
            class_labels = class_labels.to(device=x.device, dtype=torch.float32)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)  # each [B or 1, 1, 1, 1]
        f = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels)
        return c_skip * x + c_out * f[:, : self.img_channels].to(torch.float32)

    def extra_repr(self) -> str:
        return (f"precond={self.precond}, architecture={self.architecture}, resolution={self.img_resolution}, "
                f"channels={self.img_channels}, label_dim={self.label_dim}")
