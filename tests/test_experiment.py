"""locality-follows-data: the measures against hand-built fields, and the command end to end (quick)."""

import json

import numpy as np
import pytest
import torch

from localdiff.experiment import axis_extent, compare, covariance_fields, gaussian_blob_fields, summarise
from localdiff.sensitivity import Fields, energy_radius


def _gauss(h, w, p, sv, sh):
    rr, cc = np.mgrid[0:h, 0:w]
    return np.exp(-((rr - p[0]) ** 2 / (2 * sv**2) + (cc - p[1]) ** 2 / (2 * sh**2)))[None]


def test_axis_extent_measures_the_stretch_and_ignores_the_self_term():
    p = (15, 15)
    f = _gauss(31, 31, p, 4.0, 1.0)
    dv, dh = axis_extent(f, p)
    # energy = f^2 is a Gaussian with sigma/sqrt(2) per axis; the ratio is the stretch
    assert dv / dh == pytest.approx(4.0, rel=0.05)
    assert dv == pytest.approx(4.0 / np.sqrt(2), rel=0.05)
    spiked = f.copy()
    spiked[0, p[0], p[1]] = 1e6  # a huge self-term changes nothing
    assert axis_extent(spiked, p) == pytest.approx((dv, dh))
    iso = axis_extent(_gauss(31, 31, p, 2.0, 2.0), p)
    assert iso[0] / iso[1] == pytest.approx(1.0, abs=1e-9)


def _fields(arr, t=(300,), pixels=((4, 5),)):
    m = torch.as_tensor(arr, dtype=torch.float32)  # [T, P, C, H, W]
    return Fields(m, m.abs(), list(t), list(pixels), 1, "test")


def test_blob_fields_match_the_reference_radius():
    p = (12, 12)
    radii = []
    for sigma in (1.5, 4.0):
        ref = _fields(_gauss(25, 25, p, sigma, sigma)[None, None], pixels=(p,))
        blob = gaussian_blob_fields(ref)
        r_ref = energy_radius(ref.mean[0, 0].numpy(), p, 0.5)
        r_blob = energy_radius(blob.mean[0, 0].numpy(), p, 0.5)
        assert abs(r_ref - r_blob) <= 1.0
        radii.append(r_blob)
    assert radii[1] > radii[0] + 2  # the blob follows the reference, it is not one fixed size


def test_compare_scores_identical_fields_as_identical_and_a_permuted_field_as_non_local():
    rng = np.random.default_rng(0)
    p = (4, 5)
    local = _gauss(9, 11, p, 1.5, 1.5)[None, None]
    scattered = rng.standard_normal((1, 1, 1, 9, 11))
    cov = _fields(local, pixels=(p,))
    # a U-Net that follows a non-local Wiener field exactly
    res = compare({"unet": _fields(scattered, pixels=(p,)), "wiener": _fields(scattered, pixels=(p,))}, cov)
    rec = res["300"]["4,5"]
    assert rec["cos_wiener"] == pytest.approx(1.0)
    assert abs(rec["cos_blob"]) < 0.5
    # a U-Net that stays local although its data's Wiener field is scattered
    res = compare({"unet": _fields(local, pixels=(p,)), "wiener": _fields(scattered, pixels=(p,))}, cov)
    rec = res["300"]["4,5"]
    assert rec["cos_blob"] > 0.95 > 0.5 > abs(rec["cos_wiener"])
    s = summarise(res)
    assert s["cos_blob"] == pytest.approx(rec["cos_blob"])


def test_covariance_fields_are_covariance_rows(tmp_cache):
    from localdiff.data.synthetic import gaussian_random_field
    from localdiff.stats import data_spectrum

    data = gaussian_random_field(3000, 8, alpha=3.0, seed=0)
    spec = data_spectrum(data, progress=False)
    ref = _fields(np.zeros((2, 1, 1, 8, 8)), t=(100, 500), pixels=((3, 4),))
    cov = covariance_fields(spec, ref)
    y = data.tensor(flat=True, dtype=torch.float64).numpy()
    emp = np.cov(y, rowvar=False, bias=True)[3 * 8 + 4].reshape(1, 8, 8)
    for ti in range(2):
        np.testing.assert_allclose(cov.mean[ti, 0].numpy(), emp, atol=1e-5 * np.abs(emp).max() + 1e-7)


@pytest.mark.slow
def test_experiment_command_quick(tmp_path, tmp_cache):
    from localdiff.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "locality-follows-data", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads((out / "experiment.json").read_text())
    assert set(rec["sets"]) == {"grf", "grf-aniso"}
    iso, aniso = rec["sets"]["grf"]["summary"], rec["sets"]["grf-aniso"]["summary"]
    # properties of the data, whatever the (briefly trained) U-Net learnt
    assert aniso["extent_ratio_data"] > 1.5 * iso["extent_ratio_data"]
    assert aniso["correlation_ratio_data"] > 2.0 > 1.1 > iso["correlation_ratio_data"]
    assert aniso["extent_ratio_wiener"] > 1.3
    assert abs(iso["extent_ratio_wiener"] - 1.0) < 0.2
    # the trained linear model's fields are the Wiener fields
    assert iso["cos_linear_wiener"] > 0.9
    for name in ("summary.md", "summary.png", "fields_grf.png", "fields_grf-aniso.png", "fields.npz"):
        assert (out / name).is_file()
    from localdiff.fileio import current_umask
    from test_outputs import assert_umask_modes

    assert_umask_modes(out, current_umask())  # the trained U-Nets under unets/ included
    assert (out / "unets" / "grf" / "config.json").is_file()
    # the report is one self-contained page whose every image is a decodable PNG
    import base64
    import io
    import re

    from PIL import Image

    page = (out / "report.html").read_text()
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 3 == page.count("<img ")  # summary + one field figure per set
    for u in uris:
        assert Image.open(io.BytesIO(base64.b64decode(u))).size[0] > 100
    assert "http://" not in page and "https://" not in page and "grf-aniso" in page
    assert "| grf-aniso |" in (out / "summary.md").read_text()
