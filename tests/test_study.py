"""``localdiff study``: the quick study on MNIST end to end, its numbers recomputed independently, the
report checked in a real headless Chromium, and the error paths. A tiny randomly initialised U-Net
stands in for the trained one (the comparisons do not depend on how good the network is)."""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localdiff.cli import main
from localdiff.fileio import current_umask
from test_outputs import assert_umask_modes

from conftest import save_tiny_unet
from test_fields import brute_radius

STEPS = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
ANALYTICAL = ["wiener", "optimal", "nearest", "masked", "ls", "scfdm"]


def run_cli(argv):
    """Run ``localdiff`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["localdiff", *argv]  # what the console script sees (recorded as the exact command)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.argv = saved
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def one_thread():
    """Small models run much faster on one thread than on two busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread):
    """`localdiff study --quick` on MNIST with a tiny U-Net, run once for the tests below."""
    root = tmp_path_factory.mktemp("study")
    unet = save_tiny_unet(root / "unet", 28)
    out = root / "run"
    rc, stdout, stderr = run_cli(["study", "--quick", "--unet", str(unet), "--device", "cpu", "--no-progress",
                                  "--out", str(out)])
    assert rc == 0, stderr
    return {"out": out, "stdout": stdout, "unet": unet, "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.fixture
def toy(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, 1, 8, 8))
    x = np.clip(0.6 * base + rng.integers(0, 100, size=(40, 1, 8, 8)), 0, 255).astype(np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, images=x)
    return path


TOY = ["--held-out-split", "train", "--device", "cpu", "--no-progress", "--quick", "--steps", "4",
       "--field-timesteps", "100,500"]


# -- the quick study on MNIST ---------------------------------------------------------------------

def test_quick_study_writes_every_number_keyed_by_model_step_and_mode(quick_run):
    m, out = quick_run["metrics"], quick_run["out"]
    assert m["reference"] == "unet" and m["timesteps"] == STEPS
    assert m["dataset"]["num_images"] == 60000 and m["fitted_on"]["num_images"] == 5000
    assert m["config"]["num"] == 4 and m["command"].startswith("localdiff study --quick")
    assert m["versions"]["torch"] == torch.__version__
    assert list(m["models"]) == ["unet", *ANALYTICAL]
    for name in ANALYTICAL:
        steps = m["models"][name]["steps"]
        assert list(steps) == [str(t) for t in STEPS]
        for t in STEPS:
            for mode in ("own_trajectory", "single_step"):
                v = steps[str(t)][mode]
                assert np.isfinite(v["r2"]) and np.isfinite(v["mse"])  # values: recomputed in the next test
        final = m["models"][name]["final"]
        assert final["r2"] == pytest.approx(steps["0"]["own_trajectory"]["r2"])
        assert len(final["r2_per_sample"]) == 4 and np.mean(final["r2_per_sample"]) == pytest.approx(final["r2"])
    table = {row["model"]: row for row in m["table"]}
    best = max(ANALYTICAL, key=lambda n: table[n]["final_r2"])
    assert m["closest_to_unet"]["best_mean"] == best
    assert m["closest_to_unet"]["model"] == m["headline"]["closest"]
    line = quick_run["stdout"].strip().splitlines()[-1]
    assert line.startswith(f"study: {m['headline']['sentence']} over 4 samples") and "report.html" in line
    for f in ["metrics.json", "report.html", "samples.npz", "fields.npz", "r2_per_step.png", "mse_per_step.png",
              "final_r2.png", "samples.png", "fields.png", "nearest_distances.png", "nearest_pairs.png",
              "spectrum.png", *[f"grid_{n}.png" for n in ["unet", *ANALYTICAL]]]:
        assert (out / f).is_file(), f
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] >= 100 and im.size[1] >= 56, png.name
    assert not list(out.parent.glob(".run.*"))  # no partial directory left behind
    assert_umask_modes(out, current_umask())  # readable by colleagues under umask 022


def test_quick_study_r2_recomputed_independently(quick_run):
    """Final and single-step R² from the saved arrays, with numpy and a freshly loaded U-Net."""
    from localdiff import load_dataset, make_denoiser

    m, out = quick_run["metrics"], quick_run["out"]
    arrays = np.load(out / "samples.npz")
    noise = arrays["init_noise"]
    for name in ["unet", *ANALYTICAL]:  # every model started from the same noise
        np.testing.assert_array_equal(arrays[f"{name}/xt"][0], noise)

    def r2(x, y):  # independent numpy version of the official definition, per sample then averaged
        x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        return float(np.mean(1 - ((x - y) ** 2).sum(1) / ((y - y.mean(1, keepdims=True)) ** 2).sum(1)))

    def mse(x, y):
        return float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))

    for name in ANALYTICAL:
        assert m["models"][name]["final"]["r2"] == pytest.approx(r2(arrays[f"{name}/samples"],
                                                                    arrays["unet/samples"]), rel=1e-6, abs=1e-9)
        for s, t in enumerate(STEPS):  # own trajectory: against the U-Net's own trajectory at the same step
            own = m["models"][name]["steps"][str(t)]["own_trajectory"]
            x, y = arrays[f"{name}/x0_hat"][s], arrays["unet/x0_hat"][s]
            assert own["r2"] == pytest.approx(r2(x, y), rel=1e-6, abs=1e-9)
            assert own["mse"] == pytest.approx(mse(x, y), rel=1e-6, abs=1e-12)
    unet = make_denoiser("unet", load_dataset("mnist", split="test", subset=10), path=str(quick_run["unet"]),
                         device="cpu")
    for name, s in [("masked", 2), ("ls", 8)]:  # single step: the U-Net applied to the model's own x_t
        t = STEPS[s]
        with torch.no_grad():
            ref = unet(torch.from_numpy(arrays[f"{name}/xt"][s]), t).numpy()
        assert m["models"][name]["steps"][str(t)]["single_step"]["r2"] == pytest.approx(
            r2(arrays[f"{name}/x0_hat"][s], ref), rel=1e-5, abs=1e-6)


def _recomputed(arrays, metric: str, name: str) -> np.ndarray:
    """Per-sample values of a study metric from samples.npz alone (numpy, the official R² definition)."""
    def r2(x, y):
        x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        return 1 - ((x - y) ** 2).sum(1) / ((y - y.mean(1, keepdims=True)) ** 2).sum(1)

    if metric == "final_r2":
        return r2(arrays[f"{name}/samples"], arrays["unet/samples"])
    if metric == "final_mse":
        x, y = arrays[f"{name}/samples"], arrays["unet/samples"]
        return ((x.astype(np.float64) - y.astype(np.float64)) ** 2).reshape(len(x), -1).mean(1)
    steps = arrays[f"{name}/x0_hat"]  # [S, N, ...] against the U-Net on the model's own x_t
    return np.mean([r2(steps[s], arrays[f"{name}/unet_single_step"][s]) for s in range(len(steps))], axis=0)


def test_paired_comparisons_are_recomputable_from_samples_npz(quick_run):
    """Every recorded paired difference, interval and win count, from samples.npz and scipy's paired t-test;
    and the headline rule: a closest model only when every interval of the best excludes 0."""
    from scipy import stats

    m = quick_run["metrics"]
    arrays = np.load(quick_run["out"] / "samples.npz")
    lower = {"final_r2": False, "single_step_r2": False, "final_mse": True}
    assert set(m["comparisons"]) == set(lower)
    for metric, records in m["comparisons"].items():
        values = {n: _recomputed(arrays, metric, n) for n in ANALYTICAL}
        means = {n: v.mean() for n, v in values.items()}
        best = (min if lower[metric] else max)(means, key=means.get)
        assert {r["b"] for r in records} == set(ANALYTICAL) - {best} and all(r["a"] == best for r in records)
        for r in records:
            d = values[r["a"]] - values[r["b"]]
            assert r["n"] == 4 and r["mean_diff"] == pytest.approx(d.mean(), rel=1e-6, abs=1e-9)
            assert r["wins_a"] == int((d < 0).sum() if lower[metric] else (d > 0).sum())
            ci = stats.ttest_rel(values[r["a"]], values[r["b"]]).confidence_interval(0.95)
            assert r["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-5, abs=1e-9)
    # the rule, applied to the recomputed values: a closest model only when every interval excludes 0
    from localdiff.paired import best_against_rest

    recs = m["comparisons"]["final_r2"]
    _, rule = best_against_rest({n: _recomputed(arrays, "final_r2", n) for n in ANALYTICAL}, "final_r2",
                                lower_is_better=False)
    separable = all(r["ci95"][0] > 0 for r in recs)
    if separable:
        assert rule["closest"] == recs[0]["a"] and rule["tied"] == []
    else:
        assert rule["closest"] is None
        assert rule["tied"] == [recs[0]["a"]] + [r["b"] for r in recs if not r["ci95"][0] > 0]
    # a --quick run is a smoke run, and a reference worse than Wiener is too weak: neither names a model
    head = m["headline"]
    assert head["closest"] is None and head["tied"] == [] and head["withheld"] in ("smoke run", "reference too weak")
    assert "no model" in head["sentence"] or "names no model" in head["sentence"]
    html = (quick_run["out"] / "report.html").read_text()
    assert "Paired comparisons" in html and "95% interval" in html


def test_reference_quality_is_shown_with_paired_differences(quick_run):
    """The U-Net's held-out MSE beside wiener's and optimal's at every studied timestep; the tiny random
    U-Net is far worse than Wiener, and the report and the CLI say so."""
    m = quick_run["metrics"]
    q = m["reference_quality"]
    assert q["num_images"] == 16 and q["timesteps"] == STEPS
    for t in map(str, STEPS):
        for other in ("wiener", "optimal"):
            c = q["unet_minus"][other][t]
            assert c["mean_diff"] == pytest.approx(q["mse"]["unet"][t]["mse"] - q["mse"][other][t]["mse"], abs=1e-9)
    assert q["worse_than_wiener"] and set(q["worse_than_wiener"]) <= set(STEPS)
    assert all(q["unet_minus"]["wiener"][str(t)]["ci95"][0] > 0 for t in q["worse_than_wiener"])
    assert any("worse than Wiener" in w for w in m["warnings"])
    html = (quick_run["out"] / "report.html").read_text()
    assert "How good is the reference?" in html and "Warning: the reference U-Net" in html


def test_quick_study_memorisation_and_fields(quick_run):
    m = quick_run["metrics"]
    # the nearest-dataset model returns training images: distance 0 up to float32 rounding
    assert max(m["models"]["nearest"]["nearest_train"]["distance"]) < 1e-4
    held = m["held_out_nearest_train"]
    assert len(held["distance"]) == 16 and held["summary"]["min"] > 1.0  # real test images are not copies
    assert m["yardstick"]["num_images"] == 16
    fields = np.load(quick_run["out"] / "fields.npz")
    assert set(fields["timesteps"].tolist()) == {100, 500, 900}
    ts = fields["timesteps"].tolist()
    for name in ["unet", "wiener", "optimal", "masked", "scfdm"]:  # the saved fields give the reported numbers
        assert fields[name].shape == (3, 1, 1, 28, 28)
        loc = m["models"][name]["fields"]["locality"]
        assert set(loc) == {"100", "500", "900"}
        for ti, t in enumerate(ts):
            fld = fields[name][ti, 0]
            assert loc[str(t)]["14,14"]["r50"] == brute_radius(fld, (14, 14), 0.5)
            assert loc[str(t)]["14,14"]["r90"] == brute_radius(fld, (14, 14), 0.9)
    for name in ["wiener", "masked"]:
        cos = m["models"][name]["fields"]["cosine_to_unet"]
        assert set(cos) == {"100", "500", "900"}
        for ti, t in enumerate(ts):
            a, b = fields[name][ti].ravel().astype(np.float64), fields["unet"][ti].ravel().astype(np.float64)
            assert cos[str(t)] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)
    assert "piecewise constant" in m["models"]["nearest"]["fields"]["skipped"]
    assert "--field-models" in m["models"]["ls"]["fields"]["skipped"]


def test_report_is_self_contained(quick_run):
    html = (quick_run["out"] / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    # the eight figures, each once (the per-model sample grids are files beside the page, not shown twice)
    assert len(srcs) == 8 and len(set(srcs)) == 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all((quick_run["out"] / f"grid_{name}.png").is_file() for name in quick_run["metrics"]["models"])
    for s in srcs:  # every embedded image is a decodable PNG
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from elsewhere
    for text in ["Results", "R² against the U-Net at every sampling step", "Sensitivity fields", "Versions",
                 quick_run["metrics"]["command"], torch.__version__]:
        assert text in html, text


# -- the page in a real browser ---------------------------------------------------------------------

def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed, and CI=true: install Debian's chromium (`make system-deps`)")
    pytest.skip("chromium is not installed (Debian package chromium; `make system-deps` installs it)")


def browse(page: Path, work: Path, *extra: str):
    """Load ``page`` in headless Chromium: (attributes of <html> after load, console lines, stdout)."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    root = re.search(r"<html[^>]*>", r.stdout)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', root.group(0))) if root else {}
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return attrs, console, r


def test_report_renders_in_chromium(quick_run, tmp_path):
    page = quick_run["out"] / "report.html"
    n_img = len(re.findall(r"<img ", page.read_text()))
    attrs, console, r = browse(page, tmp_path / "dom", "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert attrs.get("data-image-check") == "ok", attrs
    assert attrs.get("data-images") == f"{n_img}/{n_img}"
    assert console == []
    shot = tmp_path / "shot.png"
    _, console, r = browse(page, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1280,2400",
                           "--hide-scrollbars")
    assert r.returncode == 0 and console == []
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2400)
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 10 and (gray < 200).mean() > 0.02  # text, tables and figures, not a blank page


def test_browser_check_catches_broken_images_and_script_errors(quick_run, tmp_path):
    """The checks above must be able to fail: one corrupted data URI, and a page with a script error."""
    html = (quick_run["out"] / "report.html").read_text()
    n_img = len(re.findall(r"<img ", html))
    first = re.search(r'<img src="data:image/png;base64,([^"]*)"', html)
    payload = first.group(1)
    broken = html[:first.start(1)] + payload[:40] + "AAAAAAAA" * 8 + payload[104:] + html[first.end(1):]
    (tmp_path / "broken.html").write_text(broken)
    attrs, console, _ = browse(tmp_path / "broken.html", tmp_path / "b1", "--dump-dom")
    assert attrs.get("data-image-check") == "broken"
    assert attrs.get("data-images") == f"{n_img - 1}/{n_img}"
    assert any("broken images" in line for line in console)
    (tmp_path / "script.html").write_text(html.replace("</body>", "<script>notAFunction();</script></body>"))
    attrs, console, _ = browse(tmp_path / "script.html", tmp_path / "b2", "--dump-dom")
    assert attrs.get("data-image-check") == "ok" and any("Uncaught" in line for line in console)


# -- other settings and errors (a small toy set) ----------------------------------------------------

def test_no_unet_skips_comparisons_and_says_so(toy, tmp_path, tmp_cache, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out goes under ./runs
    argv = ["study", "--data", str(toy), "--no-unet", "--models", "wiener,optimal,nearest",
            "--opt", "optimal.chunk=7", *TOY]
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("study-toy-")
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["reference"] is None and m["closest_to_unet"] is None and "not computed" in m["r2_note"]
    assert list(m["models"]) == ["wiener", "optimal", "nearest"]
    assert all("steps" not in e and "final" not in e for e in m["models"].values())
    assert m["models"]["optimal"]["settings"]["chunk"] == 7  # --opt reached the model
    assert m["timesteps"] == [750, 500, 250, 0]
    html = (runs[0] / "report.html").read_text()
    assert "No U-Net was used" in html and "R² and MSE against the U-Net were not computed" in html
    assert "final R² vs U-Net" not in html and "cosine with U-Net" not in html  # no empty U-Net columns
    assert "behaves like the U-Net" not in html and "How good is the reference" not in html
    assert not (runs[0] / "r2_per_step.png").exists()
    assert any("held-out images come from the training split" in w for w in m["warnings"])
    assert "held-out images come from the training split" in err and "held-out images come from" in html
    assert "no U-Net (--no-unet)" in stdout.strip().splitlines()[-1]
    rc, _, err = run_cli(argv)  # a second run never reuses the first directory
    assert rc == 0, err
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_toy_study_with_every_cpu_model(toy, tmp_path, tmp_cache, one_thread):
    """All the quick models on 8x8 images with an 8x8 U-Net (--unet), R² present for every one."""
    unet = save_tiny_unet(tmp_path / "unet8", 8)
    out = tmp_path / "run"
    rc, _, err = run_cli(["study", "--data", str(toy), "--unet", str(unet), "--num", "3", "--out", str(out), *TOY])
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["fitted_on"]["num_images"] == 36  # the npz's training split (every 10th image held out) in full
    assert [r["model"] for r in m["table"]] == ["unet", *ANALYTICAL]
    assert all(len(m["models"][n]["final"]["r2_per_sample"]) == 3 for n in ANALYTICAL)


def test_missing_unet_fails_early_with_the_fix(toy, tmp_path, tmp_cache):
    out = tmp_path / "run"
    rc, _, err = run_cli(["study", "--data", str(toy), "--out", str(out), *TOY])
    assert rc == 2
    assert "U-Net" in err and "--unet DIR" in err and "localdiff train-unet" in err and "--no-unet" in err
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_existing_output_is_never_overwritten(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, err = run_cli(["study", "--data", str(toy), "--no-unet", "--out", str(out), *TOY])
    assert rc == 2 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("argv,msg", [
    (["--models", "wiener,nope"], "unknown model 'nope'"),
    (["--models", "wiener", "--opt", "masked.tau=0.1"], "not in --models"),
    (["--no-unet", "--unet", "somewhere"], "contradict"),
    (["--models", "wiener", "--field-models", "optimal"], "not among the studied models"),
    (["--num", "0"], "num must be a positive integer"),
    (["--field-timesteps", "1,x"], "--field-timesteps"),
])
def test_bad_arguments(toy, tmp_path, argv, msg):
    rc, _, err = run_cli(["study", "--data", str(toy), "--out", str(tmp_path / "o"), *TOY, *argv])
    assert rc == 2 and msg in err, err
    assert not (tmp_path / "o").exists()


# -- guard rails --------------------------------------------------------------------------------------

def test_a_foreign_unet_is_refused_unless_allowed(tmp_path, tmp_cache, one_thread):
    """The shipped MNIST network on Fashion-MNIST: exit 2 with a message naming both datasets and the flag."""
    out = tmp_path / "run"
    mnist_net = Path(__file__).resolve().parent.parent / "src" / "localdiff" / "weights" / "mnist"
    argv = ["study", "--dataset", "fashion-mnist", "--unet", str(mnist_net), "--models", "wiener", "--num", "2",
            "--steps", "2", "--subset", "2000", "--field-models", "none", "--held-out", "4", "--reference-check", "4",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    rc, _, err = run_cli(argv)
    assert rc == 2 and "trained on other data: mnist" in err and "fashion-mnist" in err
    assert "--allow-foreign-unet" in err and not out.exists()
    rc, _, err = run_cli([*argv, "--allow-foreign-unet"])
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["models"]["unet"]["settings"]["data_match"] == "foreign"
    assert any("trained on other data" in w for w in m["warnings"]) and "trained on other data" in err


def test_a_plain_image_folder_is_split_and_studied_without_a_unet(tmp_path, tmp_cache, one_thread):
    rng = np.random.default_rng(0)
    folder = tmp_path / "my_images"
    folder.mkdir()
    base = rng.integers(0, 256, (8, 8))
    for i in range(30):
        img = np.clip(0.6 * base + rng.integers(0, 100, (8, 8)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["study", "--data", str(folder), "--no-unet", "--models", "wiener,optimal",
                               "--num", "2", "--steps", "3", "--field-timesteps", "500", "--field-draws", "2",
                               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["num_images"] == 27 and m["held_out"]["num_images"] == 3  # every 10th image held out
    assert m["held_out"]["held_out_share"] == pytest.approx(0.1) and "every 10th image" in m["held_out"]["split_rule"]
    assert not m["warnings"]  # disjoint splits: nothing to warn about
