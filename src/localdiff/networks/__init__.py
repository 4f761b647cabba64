"""Networks from elsewhere, read safely, as references for the analytical models (docs/DESIGN.md §10):
diffusers ``UNet2DModel`` directories, the paper's U-Net checkpoints (:mod:`.paper_unet`), EDM's networks
and snapshots (:mod:`.edm`), each wrapped as ``x0_hat(x_t, level)`` (:mod:`.reference`) by
:func:`load_network`; :func:`convert_network` writes any of them as safetensors + JSON."""

from .load import convert_network, load_network, read_converted
from .reference import ReferenceNetwork, SigmaNetwork, TimestepNetwork

__all__ = ["load_network", "convert_network", "read_converted", "ReferenceNetwork", "SigmaNetwork", "TimestepNetwork"]
