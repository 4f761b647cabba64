import os

# Idle OpenMP threads spin by default; on a busy 2-core machine that makes small torch ops 20-100x
# slower. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

# Tests never touch the user's cache and stay on two threads (the CI machine has two cores).
os.environ.setdefault("LOCALDIFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".localdiff-cache", "tests"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LOCALDIFF_CACHE", str(d))
    return d


def make_float_dataset(x: np.ndarray, name: str = "synthetic"):
    from localdiff.data.dataset import ImageDataset

    return ImageDataset(raw=np.ascontiguousarray(x, dtype=np.float32), name=name)


@pytest.fixture
def small_uint8_data():
    """40 random 1x6x6 uint8 images with some structure (a shared blob plus noise)."""
    from localdiff.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, 1, 6, 6))
    x = np.clip(base * 0.5 + rng.integers(0, 128, size=(40, 1, 6, 6)), 0, 255).astype(np.uint8)
    return ImageDataset(raw=x, name="small")


def save_tiny_unet(path, size):
    """A randomly initialised 1-channel diffusers UNet2DModel (8/16 channels) saved with save_pretrained."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=4)
    with torch.no_grad():  # make the output depend visibly on the input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path
