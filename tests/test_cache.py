"""The statistics cache (issue 16): its checksum covers every byte, metadata included, so any single-bit
flip is detected, and a corrupt file is recomputed and replaced, never breaking a later run."""

import json
import random
import warnings

import numpy as np
import pytest
import torch

from localdiff.data.dataset import ImageDataset
from localdiff.errors import CacheError
from localdiff.stats import _HEAD, _cache_path, data_spectrum, load_spectrum, parse_spectrum


@pytest.fixture
def tiny(tmp_cache):
    """A 12-image, 1x2x2 set: a cache file of about 500 bytes."""
    x = np.random.default_rng(0).integers(0, 256, (12, 1, 2, 2), dtype=np.uint8)
    data = ImageDataset(raw=x, name="tiny")
    fresh = data_spectrum(data, cache=False, progress=False)
    data_spectrum(data, progress=False)
    path = _cache_path(tmp_cache, data.fingerprint)
    return data, fresh, path, path.read_bytes()


def _flipped(blob: bytes, bit: int) -> bytes:
    b = bytearray(blob)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _header_end(blob: bytes) -> int:
    """Bytes before the tensor data: magic, checksum, safetensors length and JSON header (metadata)."""
    return _HEAD + 8 + int.from_bytes(blob[_HEAD:_HEAD + 8], "little")


def test_every_single_bit_flip_of_the_header_is_detected(tiny):
    data, fresh, path, blob = tiny
    meta = json.loads(blob[_HEAD + 8:_header_end(blob)])["__metadata__"]
    assert set(meta) == {"version", "fingerprint", "count"}  # the metadata sits in the checked region
    assert load_spectrum(path, data.fingerprint).count == 12
    missed = []
    for bit in range(8 * _header_end(blob)):
        try:
            parse_spectrum(_flipped(blob, bit), data.fingerprint, path)
            missed.append(bit)
        except CacheError:
            pass
    assert not missed


def test_a_seeded_sample_of_bit_flips_across_the_file_is_detected(tiny):
    data, fresh, path, blob = tiny
    for bit in random.Random(16).sample(range(8 * len(blob)), 400):
        path.write_bytes(_flipped(blob, bit))
        with pytest.raises(CacheError):
            load_spectrum(path, data.fingerprint)


def test_a_corrupt_cache_is_recomputed_and_later_runs_are_clean(tiny):
    data, fresh, path, blob = tiny
    rng = random.Random(0)
    bits = rng.sample(range(8 * _header_end(blob)), 12) + rng.sample(range(8 * len(blob)), 8)
    for bit in bits:
        path.write_bytes(_flipped(blob, bit))
        with pytest.warns(RuntimeWarning, match="recomputing it"):
            spec = data_spectrum(data, progress=False)
        torch.testing.assert_close(spec.eigvals, fresh.eigvals, rtol=0, atol=0)
        torch.testing.assert_close(spec.mean, fresh.mean, rtol=0, atol=0)
        assert spec.count == 12
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = data_spectrum(data, progress=False)  # the replaced file is valid: no warning
        torch.testing.assert_close(again.eigvecs, fresh.eigvecs, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "empty", "old format", "directory"])
def test_other_damage_is_recomputed(tiny, damage):
    data, fresh, path, blob = tiny
    if damage == "truncated":
        path.write_bytes(blob[:len(blob) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "old format":
        path.write_bytes(blob[_HEAD:])  # a bare safetensors file, as version 1 wrote
    else:
        path.unlink()
        path.mkdir()
    with pytest.warns(RuntimeWarning):
        spec = data_spectrum(data, progress=False)
    torch.testing.assert_close(spec.eigvals, fresh.eigvals, rtol=0, atol=0)
