"""Niedoba, Zwartsenberg, Murphy & Wood 2024, "Towards a mechanistic explanation of diffusion model
generalization" (arXiv 2411.19339): the PSPC-Square denoiser ``pspc`` (docs/DESIGN.md §2.6), exact and
streamed over the training set. Every P x P patch is denoised by the posterior mean of that patch under
the training patches at the same place, and each pixel averages the estimates of all patches that cover it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Capabilities
from ..stream import SoftmaxState, merge
from .common import PatchConfig, PatchDenoiser, valid_box_sum


@dataclass
class PSPCConfig(PatchConfig):
    pass


class PSPCDenoiser(PatchDenoiser):
    """Niedoba et al.'s PSPC-Square: for every placement p of a P x P patch that fits in the image,
    the patch posterior mean ``E[Pi_p y | Pi_p x_t] = sum_k w_{k,p} Pi_p y_k``,
    ``w_{k,p} ∝ exp(-||Pi_p x_t - a Pi_p y_k||^2 / (2 b2))``, over the training patches at the same
    place p (as in the authors' code); each pixel is the plain average of the estimates of all
    patches that cover it. Patches never cross the border; a side larger than the image is cut to
    the image, so ``patch_size >= max(H, W)`` is the exact ``optimal`` denoiser. Any P >= 1 (even too).
    """

    name = "pspc"
    Config = PSPCConfig
    capabilities = Capabilities(slow_autograd=True, single_image_exact=True)
    odd_only = False
    merges_shards = True

    def max_patch_size(self) -> int:
        return max(self.shape[1:])

    def default_sizes(self) -> list[int]:
        L = self.max_patch_size()
        return sorted(set(range(1, L + 1, 2)) | {L})

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        ph, pw = min(size, H), min(size, W)
        nh, nw = H - ph + 1, W - pw + 1
        D = C * ph * pw
        state = None
        for yb in self.images(B * (C + 1) * H * W + nh * nw * D, self.config.block):
            xy = (x.unsqueeze(1) * yb.unsqueeze(0)).sum(2)  # [B, k, H, W]
            yy = (yb * yb).sum(1)  # [k, H, W]
            logits = (a * valid_box_sum(xy, ph, pw) - (0.5 * a * a) * valid_box_sum(yy, ph, pw)) / b2
            patches = F.unfold(yb, (ph, pw))  # [k, D, Np]
            # one softmax over k per query and placement; acc [B, Np, D]
            state = merge(state, SoftmaxState.from_logits(logits.flatten(2), 1,
                                                          lambda e: torch.einsum("bkp,kdp->bpd", e, patches)))
        state = self.merge_ranks(state)  # every rank's training patches
        est = state.mean().transpose(1, 2)  # [B, D, Np]: each placement's patch posterior mean
        total = F.fold(est, (H, W), (ph, pw))
        count = F.fold(torch.ones_like(est[:1]), (H, W), (ph, pw))
        return total / count


__all__ = ["PSPCConfig", "PSPCDenoiser"]
