"""train-unet's plan before training (issue 23, item 1): the default configuration follows the device and
the budget, the plan line (steps, epochs, images/s, peak memory) is printed and recorded, a plan under a
quarter of an epoch is refused without --force, and the CPU memory model agrees with a measured peak."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from localdiff.cli import main
from localdiff.unet import SMALL, unet_config
from localdiff.unet import planning
from localdiff.unet.planning import MIN_STEPS, REFERENCE_BUDGET_S, Probe, TrainPlan, choose_config

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(tmp_path, num, size, name="data.npz"):
    path = tmp_path / name
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (num, size, size)).astype(np.uint8))
    return path


def fake_probe(step_s: float, batch: int = 128):
    def probe(cfg, shape, device, *, batches, **kw):
        return Probe(tuple(batches), (step_s,), 0.0, step_s / batch, 1000, 10**6, None, None)
    return probe


# -- the rule -----------------------------------------------------------------------------------------

def test_default_is_paper_exactly_where_it_makes_min_steps_in_the_budget(monkeypatch):
    budget = 120.0
    edge = planning.STEP_SHARE * budget / MIN_STEPS  # seconds per step at which paper makes exactly MIN_STEPS
    monkeypatch.setattr(planning, "probe", fake_probe(0.99 * edge))
    assert choose_config((1, 28, 28), CPU, budget_s=budget)[0] == "paper"
    monkeypatch.setattr(planning, "probe", fake_probe(1.02 * edge))
    name, reason = choose_config((1, 28, 28), CPU, budget_s=budget)
    assert name == "small" and f"fewer than {MIN_STEPS}" in reason and "in the budget" in reason
    # without --minutes the same test runs against ten minutes
    slow_for_two_minutes = planning.STEP_SHARE * REFERENCE_BUDGET_S / MIN_STEPS * 0.99
    monkeypatch.setattr(planning, "probe", fake_probe(slow_for_two_minutes))
    assert choose_config((1, 28, 28), CPU, budget_s=budget)[0] == "small"
    assert choose_config((1, 28, 28), CPU, budget_s=None)[0] == "paper"
    # images whose size paper's three levels do not divide take small, without timing anything
    monkeypatch.setattr(planning, "probe", None)
    name, reason = choose_config((1, 30, 30), CPU, budget_s=None)
    assert name == "small" and "30x30" in reason


def test_default_config_on_this_cpu_is_not_paper_for_28px_images():
    name, reason = choose_config((1, 28, 28), CPU, budget_s=120.0)
    assert name == "small", reason
    assert choose_config((1, 28, 28), CPU, budget_s=None)[0] == "small"


def test_plan_arithmetic_warnings_and_refusal():
    def plan(steps, **kw):
        base = dict(config="small", reason="--config", steps=steps, batch_size=64, world_size=1, num_images=6400,
                    images_per_s=64.0, peak_bytes=int(1.2e9), memory="process RSS; estimated", budget_s=None,
                    minutes=None, device="cpu")
        return TrainPlan(**{**base, **kw})

    p = plan(100)
    assert p.epochs == 1.0 and p.seconds == 100.0 and p.refusal() is None
    assert len(p.warnings()) == 1 and "100 optimisation steps" in p.warnings()[0]  # under MIN_STEPS only
    assert plan(25).refusal() is None and "0.25 epochs" in plan(25).warnings()[0]  # a quarter: warned, allowed
    refused = plan(24).refusal()
    assert refused and "0.24 epochs" in refused and "--force" in refused and "--steps 100 (one epoch)" in refused
    assert "--subset 1536" in refused  # 24 steps of 64 images
    assert plan(12, world_size=2).epochs == pytest.approx(0.24)  # the global batch counts
    budget = plan(24, budget_s=24.0, minutes=1.0)  # 24 s of training at 64 images/s: 0.24 epochs
    assert "--minutes 3 (about one epoch" in budget.refusal()  # 1 + 1.05 x (6400 / (64 x 0.95) - 24) / 60 -> 3
    line = plan(100).line()
    assert line == ("plan: config small (--config); 100 steps of 64 images taking about 100 s = 1.00 epochs of 6,400 "
                    "images, at about 64 images/s (measured on cpu); peak memory about 1.2 GB (process RSS; estimated)")
    assert "of 64 images x 2 processes in the budget = 2.00 epochs" in plan(100, world_size=2, budget_s=60.0).line()
    assert TrainPlan.from_dict(plan(200).to_dict()) == plan(200)


# -- the command ----------------------------------------------------------------------------------------

def test_plan_line_is_printed_before_training_and_recorded(tmp_path, capsys):
    npz = images(tmp_path, 12, 8)
    out = tmp_path / "run"
    assert main(["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--steps", "3",
                 "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith("plan: config small (--config); 3 steps of 4 images taking about ")
    assert "= 1.00 epochs of 12 images, at about" in stdout[0] and "peak memory about" in stdout[0]
    assert stdout[-1].startswith("trained 3 steps (1.00 epochs")
    plan = json.loads((out / "localdiff_unet.json").read_text())["plan_before_training"]
    assert plan["config"] == "small" and plan["steps"] == 3 and plan["epochs"] == 1.0 and plan["images_per_s"] > 0


def test_a_tiny_budget_is_refused_without_force_and_runs_with_it(tmp_path, capsys):
    npz = images(tmp_path, 40, 8)
    out = tmp_path / "run"
    cmd = ["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--steps", "2", "--batch-size", "4",
           "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(cmd) == 2  # 2 steps of 4 of 40 images: 0.2 epochs
    captured = capsys.readouterr()
    assert captured.out.startswith("plan: config small")
    assert "error: the plan covers 0.20 epochs of the 40 training images" in captured.err
    assert "--steps 10 (one epoch)" in captured.err and "--force" in captured.err
    assert not out.exists()  # refused before anything was written
    assert main([*cmd, "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: the plan covers 0.20 epochs: 80% of the 40 training images will never be seen" in captured.err
    assert json.loads((out / "localdiff_unet.json").read_text())["steps"] == 2


def test_a_tiny_minutes_budget_is_refused_without_force_and_runs_with_it(tmp_path, capsys):
    npz = images(tmp_path, 20000, 28)  # 15 s for 20,000 images: a few hundred seen, far under a quarter epoch
    out = tmp_path / "run"
    cmd = ["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--minutes", "0.25",
           "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(cmd) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("plan: config small (--config); ") and " steps of 8 images in the budget = 0.0" in \
        captured.out
    assert "error: the plan covers 0.0" in captured.err and "(about one epoch at this speed)" in captured.err
    assert "--force to train anyway" in captured.err and not out.exists()
    assert main([*cmd, "--force"]) == 0
    manifest = json.loads((out / "localdiff_unet.json").read_text())
    assert 0 < manifest["epochs"] < 0.25 and manifest["plan_before_training"]["minutes"] == 0.25


def test_default_config_on_a_cpu_trains_small(tmp_path, capsys):
    npz = images(tmp_path, 16, 28)
    out = tmp_path / "run"
    assert main(["train-unet", "--data", str(npz), "--split", "all", "--steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("plan: config small (the default on cpu: paper would make about ")
    manifest = json.loads((out / "localdiff_unet.json").read_text())
    assert manifest["model_config"] == SMALL.to_dict() != unet_config("paper", (1, 28, 28)).to_dict()


MEASURE = """
import json, resource, sys
from localdiff.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_cpu_peak_memory_and_speed_estimates_agree_with_a_measured_run(tmp_path):
    """The plan's CPU memory model (RSS + 5 parameter copies + 1.5 x autograd's saved bytes) against the
    peak resident memory of the same run, measured by the kernel; its speed against the trainer's."""
    npz = images(tmp_path, 256, 28)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, "train-unet", "--data", str(npz), "--split", "all", "--config",
                           "small", "--steps", "4", "--device", "cpu", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    manifest = json.loads((out / "localdiff_unet.json").read_text())
    plan = manifest["plan_before_training"]
    assert 0.8 < plan["peak_bytes"] / measured["maxrss"] < 1.3, (plan["peak_bytes"], measured["maxrss"])
    assert 1 / 3 < plan["images_per_s"] / manifest["images_per_s"] < 3, (plan, manifest["images_per_s"])
