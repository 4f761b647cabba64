"""More than one process (docs/DESIGN.md §9): torchrun starts 2 gloo processes on the CPU, each holding half
of the training set, and every result is compared with one process holding all of it.

The torchrun jobs run ``tests/distributed_worker.py`` (statistics, every variant of every model in
``tests/model_table.py``, the toy model a test registers included, fields, sampling, nearest images, a
subset; a 20-step DDP training and its resume; a rank that fails) and the CLI itself
(``torchrun ... --no-python -- localdiff sample``). A model that merges its ranks' states must give the
one-process result; one that does not is built on the whole set gathered from the shards, and must give
it too. Tolerances: 1e-10 for float64 arithmetic, 1e-5 for float32 (a variant's ``dtype``), 1e-4 for
CLI samples after 10 DDIM steps. That a lost or doubled shard would break these comparisons by far more
is checked too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed_worker as worker
import model_table
from conftest import save_tiny_unet
from localdiff import distributed, make_denoiser
from localdiff.cli import main
from localdiff.data.dataset import ImageDataset
from localdiff.data.shards import shard_bounds, shard_dataset
from localdiff.denoisers import REGISTRY
from localdiff.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LAUNCH_TIMEOUT_S = 300
LABELS = model_table.labels("torchrun")  # every variant of every model that runs under torchrun

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this PyTorch has no gloo backend")


def _env(tmp: Path) -> dict:
    (tmp / "scratch").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(WORKER.parent), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", LOCALDIFF_DIST_TIMEOUT="120",
               LOCALDIFF_CACHE=str(tmp / "cache"), TMPDIR=str(tmp / "scratch"))
    return env


def torchrun(args: list[str], tmp: Path, *, nproc: int = 2, no_python: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc [--no-python --] args`` with a bounded wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["--no-python", "--", *args] if no_python else args
    return subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def run_worker(job: str, tmp: Path) -> subprocess.CompletedProcess:
    return torchrun([str(WORKER), job, str(tmp)], tmp)


# -- the models, statistics and fields ---------------------------------------------------------------

@pytest.fixture(scope="module")
def added_models():
    with model_table.added_models():  # the toy model, as the worker registers it
        yield


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The worker's output directory, holding the tiny network of the ``unet`` entry (``unet/``)."""
    tmp = tmp_path_factory.mktemp("models")
    save_tiny_unet(tmp / "unet", 6)
    return tmp


@pytest.fixture(scope="module")
def two_processes(models_dir):
    done = run_worker("models", models_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(np.load(models_dir / "results.npz")), json.loads((models_dir / "ranks.json").read_text())


@pytest.fixture(scope="module")
def one_process(models_dir, added_models):
    built: dict[str, str] = {}
    return worker.results(worker.dataset(), models_dir / "unet", built), built


def tolerance(key: str) -> float:
    label = key.split("/")[0]
    if label in LABELS:
        return 1e-10 if model_table.variant(label).dtype == "float64" else 1e-5
    return 1e-10


def assert_close(one: dict, two: dict, prefix: str) -> None:
    keys = [k for k in one if k.startswith(prefix)]
    assert keys and set(keys) <= set(two), prefix
    for k in keys:
        diff = np.abs(one[k].astype(np.float64) - two[k].astype(np.float64)).max()
        assert diff <= tolerance(k), f"{k}: one vs two processes differ by {diff:.3g}"


def test_statistics_merge_exactly(one_process, two_processes):
    assert_close(one_process[0], two_processes[0], "moments/")
    assert_close(one_process[0], two_processes[0], "spectrum/")
    assert two_processes[0]["moments/count"] == worker.N_IMAGES


@pytest.mark.parametrize("label", LABELS)
def test_every_model_equals_one_process(one_process, two_processes, label):
    """x0_hat at t = 900, 500, 100, closed-form Jacobian rows where declared, autograd rows unless piecewise
    constant, and a 10-step DDIM trajectory where the table asks for one."""
    one, two = one_process[0], two_processes[0]
    assert_close(one, two, f"{label}/")
    assert {k for k in one if k.startswith(f"{label}/")} == {k for k in two if k.startswith(f"{label}/")}
    v = model_table.variant(label)
    if v.autograd and not model_table.model_class(v.model).capabilities.piecewise_constant:
        assert f"{label}/grad" in two  # autograd through the merge of the ranks, compared too


@pytest.mark.parametrize("label", LABELS)
def test_a_model_that_does_not_merge_is_built_on_the_gathered_set(one_process, two_processes, label):
    """Under torchrun, a model whose class does not declare ``merges_shards`` is given the whole training set
    (with a warning) and one that does is given its shard; in one process, nobody gathers anything."""
    merges = model_table.model_class(model_table.variant(label).model).takes_shards()
    assert two_processes[1]["built"][label] == ("own data" if merges else "gathered")
    assert one_process[1][label] == "own data"


def test_every_model_is_compared_and_a_one_process_variant_refuses_a_shard(two_processes):
    """Every registered model (and the toy) is among those compared; a variant that runs in one process by
    design (the masked model's chunk-normalised softmax) refuses a shard with a ConfigError saying why."""
    compared = {model_table.variant(label).model for label in LABELS}
    assert compared == set(REGISTRY) | {cls.name for cls in model_table.ADDED}
    results, built = two_processes
    assert all(any(k.startswith(f"{label}/x0/") for k in results) for label in LABELS)
    alone = [v.label for v in model_table.variants() if not v.torchrun]
    assert alone and all(built["built"][label].startswith("refused: ") for label in alone)
    assert "runs in one process" in built["built"]["masked.chunk_average"]


def test_nearest_images_subsets_and_fingerprints_agree(one_process, two_processes):
    one, two = one_process[0], two_processes[0]
    for key in ("nearest_images/index", "nearest_images/image", "subset/fingerprint", "dataset/fingerprint"):
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    assert_close(one, two, "nearest_images/")
    assert_close(one, two, "subset/")


def test_every_rank_holds_the_same_result_and_only_rank0_draws_bars(two_processes):
    ranks = two_processes[1]
    assert ranks["spread"] == [0.0, 0.0]  # every rank folds the same gathered states in the same order
    assert ranks["bar_disabled"] == [0, 1]


def test_a_lost_or_doubled_shard_would_fail_these_comparisons():
    """The tolerances above are far below what merging a shard twice, or not at all, changes."""
    whole = worker.dataset()
    (a0, a1), (b0, b1) = shard_bounds(len(whole), 2)
    lost = ImageDataset(raw=whole.raw[b0:b1], name="lost")
    doubled = ImageDataset(raw=np.concatenate([whole.raw[a0:a1], whole.raw]), name="doubled")
    x = worker.queries(whole.shape)
    spec = dataclasses.replace(make_denoiser("wiener", whole, cache=False).spectrum, fingerprint="")
    for model in ("optimal", "masked"):
        ref = make_denoiser(model, whole, spectrum=spec)(x, 900)
        for wrong in (lost, doubled):
            assert (make_denoiser(model, wrong, spectrum=spec)(x, 900) - ref).abs().max() > 1e-3
    for wrong in (lost, doubled):
        assert (make_denoiser("wiener", wrong, cache=False).spectrum.mean - spec.mean).abs().max() > 1e-3


# -- U-Net training with DistributedDataParallel --------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    done = run_worker("train", tmp)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(tmp / "train.pt"), tmp


def test_ddp_training_equals_one_process_with_the_global_batch(ddp_run):
    """20 steps on 2 processes x 4 images = 20 steps of 8 images in one process (AdamW amplifies float32
    round-off to ~1e-5 here); a batch of 4 (a wrong recipe) is 100x farther."""
    from localdiff.unet import UNetTrainer

    got = ddp_run[0]
    data, mc = worker.training_images(), worker.tiny_unet_config()
    one = UNetTrainer(data, mc, worker.train_config(8)).fit(20, progress=False, handle_signals=False)
    diff = (worker.parameters(one) - got["straight"]).abs().max().item()
    assert diff < 2e-4
    assert abs(one.loss_ema - got["loss"]) < 1e-6
    small = UNetTrainer(data, mc, worker.train_config(4)).fit(20, progress=False, handle_signals=False)
    assert (worker.parameters(small) - got["straight"]).abs().max().item() > 100 * max(diff, 1e-6)


def test_ddp_resume_is_exact_and_rank0_writes_the_one_checkpoint(ddp_run):
    got, tmp = ddp_run
    assert torch.equal(got["resumed"], got["straight"])
    assert not torch.equal(got["first"], got["straight"])
    assert got["listing"] == ["step-0000010"]  # no second writer, no partial directory
    state = json.loads((tmp / "ckpt" / "step-0000010" / "state.json").read_text())
    assert state["world_size"] == 2 and state["train_config"]["batch_size"] == 4
    from localdiff.unet import UNetTrainer

    with pytest.raises(ConfigError, match="trained by 2 process"):
        UNetTrainer.from_checkpoint(tmp / "ckpt" / "step-0000010", worker.training_images())


# -- the command line ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-data")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 1, 8, 8)).astype(np.uint8)
    x[:20, :, 2:6, 2:6] = 240
    np.savez(tmp / "train.npz", x)
    np.save(tmp / "noise.npy", rng.standard_normal((3, 1, 8, 8)).astype(np.float32))
    return tmp


@pytest.mark.parametrize("model", ["wiener", "optimal", "masked"])
def test_cli_sample_under_torchrun_equals_a_plain_run(cli_data, tmp_path, monkeypatch, model, capsys):
    """What the issue's check does: the same --init-noise, plainly and on 2 processes."""
    localdiff = shutil.which("localdiff")
    if localdiff is None:
        pytest.skip("the localdiff console script is not installed")
    args = ["sample", "--data", str(cli_data / "train.npz"), "--model", model, "--init-noise",
            str(cli_data / "noise.npy"), "--steps", "10"]
    monkeypatch.setenv("LOCALDIFF_CACHE", str(tmp_path / "plain-cache"))
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    done = torchrun([localdiff, *args, "--out", str(tmp_path / "two")], tmp_path, no_python=True)
    assert done.returncode == 0, done.stderr[-4000:]
    plain, two = np.load(tmp_path / "plain" / "samples.npy"), np.load(tmp_path / "two" / "samples.npy")
    assert np.abs(plain - two).max() <= 1e-4
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    # 40 images in a bare .npz: every 10th is held out, so the training split has 36, halved
    assert run["world_size"] == 2 and run["distributed"]["shards"] == [[0, 18], [18, 36]]
    assert run["dataset"]["fingerprint"] == json.loads((tmp_path / "plain" / "run.json").read_text())[
        "dataset"]["fingerprint"]
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["world_size"] == 1
    assert not list((tmp_path / "scratch").glob("localdiff-rank*"))  # the other rank's scratch directory is gone
    assert done.stdout.count("wrote 3 samples") == 1  # rank 0 reports


def test_a_failing_rank_stops_the_job_and_names_itself(tmp_path):
    np.savez(tmp_path / "data.npz", worker.dataset().raw)
    start = time.perf_counter()
    done = run_worker("fail", tmp_path)
    assert done.returncode != 0
    assert time.perf_counter() - start < 200  # no hang: the other rank's collective fails at once
    assert "rank 1 of 2" in done.stderr and "injected failure on purpose" in done.stderr
    assert "error on rank 0 of 2" in done.stderr or "terminated on rank 0 of 2" in done.stderr
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_more_processes_than_images_is_a_clear_error(tmp_path):
    localdiff = shutil.which("localdiff")
    if localdiff is None:
        pytest.skip("the localdiff console script is not installed")
    np.savez(tmp_path / "one.npz", np.zeros((1, 1, 4, 4), np.uint8))
    done = torchrun([localdiff, "sample", "--data", str(tmp_path / "one.npz"), "--model", "optimal", "--out",
                     str(tmp_path / "run")], tmp_path, no_python=True)
    assert done.returncode != 0
    assert "has 2 processes but the training set 'one' holds 1 image" in done.stderr
    assert not (tmp_path / "run").exists()


# -- one process: nothing changes -------------------------------------------------------------------------

def test_shards_are_contiguous_and_balanced():
    for total in (1, 2, 7, 61, 1000):
        for size in range(1, min(total, 9) + 1):
            bounds = shard_bounds(total, size)
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1 and min(e - s for s, e in bounds)


def test_a_plain_run_is_one_process_and_untouched():
    data = worker.dataset()
    assert distributed.world().size == 1 and not distributed.world().active
    assert shard_dataset(data) is data
    assert distributed.gather({"a": torch.ones(2)})[0]["a"].tolist() == [1.0, 1.0]
    assert distributed.merge_ranks("state", None) == "state"
    assert distributed.main_decides(lambda: 3) == 3


def test_experiment_refuses_to_run_under_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(0, 2, 0, "gloo", 60.0))
    assert main(["experiment", "locality-follows-data", "--quick", "--out", str(tmp_path / "x")]) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert distributed.world().size == 1  # left as it was found: the CLI leaves the job it joined


def test_which_models_take_shards_is_declared_per_class():
    """A model merges over the ranks only where its own class says so; a subclass (say, a new masked
    variant) is given the whole training set until it declares that it merges too."""
    from localdiff.denoisers import REGISTRY
    from localdiff.denoisers.masked import MaskedDenoiser

    taking = {n for n, cls in REGISTRY.items() if cls.takes_shards()}
    assert taking >= {"wiener", "optimal", "nearest", "masked", "ls", "els", "els-boundary", "pspc", "scfdm", "unet"}
    assert "linear" not in taking

    class Variant(MaskedDenoiser):
        pass

    assert MaskedDenoiser.takes_shards() and not Variant.takes_shards()
