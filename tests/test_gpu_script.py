"""``scripts/gpu_baselines.sh --smoke``: the prepared GPU run's whole code path on the CPU, with budgets of
seconds and a 256-image subset, so that the one command waiting for a GPU cannot rot."""

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_baselines.sh"
SETS = ("mnist", "fashion-mnist", "mnist-permuted")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    out = tmp / "out"
    total = 170
    env = {**os.environ, "TMPDIR": str(tmp), "LOCALDIFF_GPU_TOTAL_S": str(total)}
    start = time.perf_counter()
    r = subprocess.run(["bash", str(SCRIPT), "--smoke", str(out)], env=env, capture_output=True, text=True,
                       timeout=total + 90)
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with tarfile.open(out / "meta.tar.gz") as tar:
        tar.extractall(tmp / "meta", filter="data")
    return out, tmp / "meta", wall, total, r.stdout


def test_smoke_run_ends_in_budget_and_packs_compactly(smoke_run):
    out, meta, wall, total, stdout = smoke_run
    assert wall < total + 20, f"the run took {wall:.0f} s for a budget of {total} s"
    files = sorted(out.iterdir())
    assert {f.name for f in files} == {f"{s}.safetensors" for s in SETS} | {"meta.tar.gz"}
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert not list(Path(out).parent.glob("localdiff-gpu.*")), "the work directory was left behind"
    summary = json.loads((meta / "summary.json").read_text())
    status = {(s["kind"], s["name"]): s["status"] for s in summary["status"]}
    assert status == {**{("net", s): "0" for s in SETS},
                      **{("bench", b): "0" for b in ("fields", "masked", "unet_training")}}, stdout[-3000:]


@pytest.mark.parametrize("name", SETS)
def test_smoke_networks_are_paper_config_v_prediction_budget_runs(smoke_run, name):
    out, meta, *_ = smoke_run
    m = json.loads((meta / "nets" / name / "localdiff_unet.json").read_text())
    assert m["data"]["name"] == name and m["data"]["num"] == 256
    assert m["model_config"]["base_channels"] == 64 and m["num_parameters"] > 5_000_000  # the paper's network
    assert m["prediction"] == "v" and m["schedule"]["prediction_type"] == "v_prediction"
    assert m["plan"]["budget_s"] > 0 and m["steps"] >= 1 and m["images_per_s"] > 0 and m["device"] == "cpu"
    assert m["weights"]["dtype"] == "fp16"


def test_smoke_benchmarks_wrote_their_measurements(smoke_run):
    _, meta, *_ = smoke_run
    bench = {p.stem: json.loads(p.read_text()) for p in (meta / "bench").glob("*.json")}
    assert bench["fields"]["rows"] == 4 and bench["fields"]["unet_full_jacobian_s"] > 0
    assert bench["fields"]["unet_params"] > 5_000_000  # timed on the trained mnist network
    assert bench["masked"]["summary"]["ours_total_s"] > 0 and "max_diff_vs_ref_global" in bench["masked"]["summary"]
    # float32 on 1,000 images and two steps: agreement with the exact reference to round-off of peaked softmaxes
    assert bench["masked"]["summary"]["max_diff_vs_ref_global"] < 1e-2
    assert {"plain", "ours-fp32"} <= set(bench["unet_training"]["rows"])


def test_install_unpacks_networks_that_load_as_the_unet_denoiser(smoke_run, tmp_path):
    import torch

    from localdiff import load_dataset, make_denoiser

    out, *_ = smoke_run
    dest = tmp_path / "weights"
    r = subprocess.run(["bash", str(SCRIPT), "--install", str(out), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(SETS)
    den = make_denoiser("unet", load_dataset("mnist", split="test", subset=2), path=str(dest / "mnist"), device="cpu")
    assert den.prediction_type == "v_prediction"
    x = den(torch.zeros(1, 1, 28, 28), 500)
    assert x.shape == (1, 1, 28, 28) and torch.isfinite(x).all()
    (out / "mnist.safetensors").write_bytes(b"corrupt")  # weights that do not match their manifest
    r = subprocess.run(["bash", str(SCRIPT), "--install", str(out), str(tmp_path / "w2")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "do not match" in r.stderr
