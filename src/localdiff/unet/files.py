"""The names of what a trained network's directory holds, defined once: the diffusers weights file, the
localdiff manifest and its format (written by :mod:`.export`, read by :mod:`localdiff.networks.diffusers_dir`)."""

MANIFEST_FORMAT = "localdiff-unet/1"
MANIFEST_NAME = "localdiff_unet.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LOSS_EMA_DECAY = 0.99  # smoothing of the reported loss

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "WEIGHTS_NAME", "LOSS_EMA_DECAY"]
