"""Every command of the README runs as written (issue 23, item 4): the short ones (seconds to about a minute on
two cores) are marked in README.md by a comment on the line before their ```bash block,

    <!-- readme-test: run "localdiff study --quick" "localdiff sample --dataset mnist --model optimal" -->

each quoted text the start of exactly one command of that block; they run here, in README order, in one
temporary directory (so a command may use a file an earlier one wrote, such as ``noise.npy``), and must exit
with status 0. Every other command of a ```bash block must be named in ``NOT_RUN`` with the reason it is not
run here, so a command added to the README is either run or explained. Also ``localdiff noise``, which the
README uses to write the initial noise that ``--init-noise`` reads."""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 900

# Commands the test does not run (a regular expression matched at the start of the command, comments and
# repeated spaces removed), with the reason.
NOT_RUN = {
    r"make (demo|test)": "installs everything; `make test` is what CI runs, `make demo` runs the 2-minute study",
    r"localdiff study$": "2.2 minutes on two cores (README time table)",
    r"localdiff study --dataset fashion-mnist": "2.3 minutes on two cores",
    r"localdiff study .*--device cuda": "needs a GPU",
    r"localdiff study --data my_images/": "needs your own images (my_images/) and a U-Net trained on them",
    r"localdiff sample --data my_images/": "needs your own images (my_images/)",
    r"localdiff sample --dataset mnist --model unet --unet ckpt_epoch_200.pt": "needs the paper's checkpoint "
                                                                              "(downloaded on a machine with internet)",
    r"localdiff sample --data cifar-10-batches-py/ --model unet --unet edm-": "needs CIFAR-10 and an EDM network",
    r"localdiff calibrate-masked ": "2.6 minutes on two cores",
    r"localdiff evaluate --dataset mnist --models masked,masked-soft,masked-equivariant": "needs calibrate-masked's "
                                                                                          "masked-mnist.json",
    r"localdiff evaluate --dataset mnist --models wiener,optimal,unet": "1.5 minutes on two cores",
    r"localdiff train-unet ": "GPU, 20-minute, 100,000-step or resumed runs",
    r"localdiff sample --dataset mnist --model unet --opt path=runs/unet-mnist": "needs the GPU run's network",
    r"localdiff experiment locality-follows-data --out": "trains four U-Nets (CPU defaults)",
    r"localdiff experiment locality-follows-data --config paper": "needs a GPU",
    r"localdiff calibrate-patches ": "15 minutes on two cores",
    r"localdiff sample --dataset mnist --model els --opt patch_schedule=els.json": "needs calibrate-patches' els.json",
    r"torchrun --nnodes 4 ": "needs four machines with GPUs",
    r"localdiff study --num 32 --sampler heun": "32 samples with Heun (35 evaluations each): tens of minutes on two "
                                               "cores",
    r"localdiff convert-network ": "needs an EDM network file (downloaded on a machine with internet)",
    r"localdiff probe mnist fashion-mnist mnist-permuted": "about a minute on two cores (README time table)",
    r"localdiff probe my_images/": "needs your own images (my_images/)",
    r"localdiff probe mnist --unet shipped": "about a minute on two cores",
    r"localdiff probe natural-patches": "3-5 minutes on two cores",
    r"localdiff pack imagenet64/": "needs Downsampled ImageNet 64x64 (imagenet64/)",
    r"torchrun --standalone --nproc-per-node 2 --no-python -- localdiff evaluate --data imagenet64.ldstore": "needs "
        "the ImageNet-64 store",
    r"torchrun --standalone --nproc-per-node 8 ": "needs eight GPUs",
}

MARKER = re.compile(r"<!-- readme-test: run((?:\s+\"[^\"]+\")+)\s*-->\n```bash\n(.*?)```", re.S)


def commands(block: str) -> list[str]:
    """The commands of a bash block, one string each (backslash continuations joined, comment lines dropped)."""
    out, current = [], ""
    for raw in block.splitlines():
        current = f"{current} {raw.strip()}" if current else raw.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current and not current.startswith("#"):
            out.append(current)
        current = ""
    return out


def normal(command: str) -> str:
    """A command without its trailing comment and with single spaces: what NOT_RUN and the markers match."""
    return re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", command)).strip()


def readme_commands(text: str) -> list[str]:
    return [c for block in re.findall(r"```bash\n(.*?)```", text, re.S) for c in commands(block)]


def marked_commands(text: str) -> list[str]:
    """The commands the markers select, in README order; a marker that matches no command, or more than one,
    is an error naming it."""
    selected = []
    for names, block in MARKER.findall(text):
        cmds = commands(block)
        for name in re.findall(r"\"([^\"]+)\"", names):
            hits = [c for c in cmds if normal(c).startswith(name)]
            assert len(hits) == 1, f"README marker \"{name}\" matches {len(hits)} commands of its block: {cmds}"
            selected.append(hits[0])
    return sorted(set(selected), key=selected.index)


def environment(tmp: Path) -> dict:
    """This checkout's localdiff (PYTHONPATH), the running Python's scripts (a venv's localdiff, torchrun)
    first on PATH, no progress bars."""
    env = dict(os.environ)
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
               OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1", TMPDIR=str(tmp))
    return env


TEXT = README.read_text()
MARKED = marked_commands(TEXT)


def test_every_readme_command_is_run_or_has_a_reason():
    assert len(MARKED) >= 4, MARKED
    unexplained = [c for c in readme_commands(TEXT)
                   if c not in MARKED and not any(re.match(p, normal(c)) for p in NOT_RUN)]
    assert not unexplained, ("README commands neither marked to run (<!-- readme-test: run \"...\" -->) nor "
                             f"listed in NOT_RUN with a reason: {unexplained}")
    unmarked = [normal(c) for c in readme_commands(TEXT) if c not in MARKED]
    stale = [p for p in NOT_RUN if not any(re.match(p, c) for c in unmarked)]
    assert not stale, f"NOT_RUN names commands the README no longer has, or now runs: {stale}"


def test_the_command_parser_joins_continuations_and_drops_comments():
    block = "a --x 1 \\\n    --y 2   # note\n# only a comment\nb\n"
    assert commands(block) == ["a --x 1 --y 2   # note", "b"]
    assert normal(commands(block)[0]) == "a --x 1 --y 2"
    text = '<!-- readme-test: run "b" -->\n```bash\n' + block + "```\n"
    assert marked_commands(text) == ["b"]
    with pytest.raises(AssertionError, match="matches 0 commands"):
        marked_commands(text.replace('"b"', '"c"'))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("command", MARKED, ids=[normal(c)[:70] for c in MARKED])
def test_readme_command_runs_as_written(command, workdir):
    env = environment(workdir)
    program = command.split()[0]
    if shutil.which(program, path=env["PATH"]) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is not installed (make install puts it in .venv/bin)")
        pytest.skip(f"{program} is not installed")
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"`{command}` exited with {done.returncode}:\n{done.stderr[-4000:]}"


# -- localdiff noise ---------------------------------------------------------------------------------------

def test_noise_file_is_the_noise_sample_draws_itself(tmp_path):
    from localdiff.cli import main
    from localdiff.diffusion import initial_noise

    assert main(["noise", "--num", "3", "--shape", "1,6,6", "--seed", "5", "--out", str(tmp_path / "n.npy")]) == 0
    noise = np.load(tmp_path / "n.npy")
    assert noise.dtype == np.float32 and noise.shape == (3, 1, 6, 6)
    assert np.array_equal(noise, initial_noise(3, (1, 6, 6), seed=5).numpy())
    assert not np.array_equal(noise, initial_noise(3, (1, 6, 6), seed=6).numpy())
    again = ["noise", "--num", "3", "--shape", "1,6,6", "--out", str(tmp_path / "n.npy")]
    assert main([*again, "--seed", "5"]) == 0  # the same noise again: the file is left as it is
    assert main([*again, "--seed", "6"]) == 2  # other noise: never overwritten
    assert np.array_equal(np.load(tmp_path / "n.npy"), noise)
    # sample --init-noise FILE reproduces sample --num 3 --seed 5
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 6, 6)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x)
    common = ["sample", "--data", str(tmp_path / "d.npz"), "--model", "wiener", "--steps", "4", "--device", "cpu"]
    assert main([*common, "--num", "3", "--seed", "5", "--out", str(tmp_path / "seeded")]) == 0
    assert main([*common, "--init-noise", str(tmp_path / "n.npy"), "--out", str(tmp_path / "file")]) == 0
    a, b = np.load(tmp_path / "seeded" / "samples.npy"), np.load(tmp_path / "file" / "samples.npy")
    assert np.array_equal(a, b)
    assert json.loads((tmp_path / "file" / "run.json").read_text())["sampler"]["init_noise"] == str(tmp_path / "n.npy")


@pytest.mark.parametrize("args, message", [
    (["--shape", "1,28"], "--shape takes the size of one image as C,H,W"),
    (["--shape", "1,0,28"], "positive integers"),
    (["--num", "0"], "--num must be a positive number"),
    (["--out", "{tmp}/noise.txt"], "give a name ending in .npy"),
    (["--out", "{tmp}/missing/noise.npy"], "does not exist"),
    (["--out", "{tmp}/there.npy"], "already exists with other contents (files are never overwritten)"),
])
def test_noise_refuses_bad_arguments_with_the_fix(tmp_path, capsys, args, message):
    from localdiff.cli import main

    (tmp_path / "there.npy").write_bytes(b"mine")
    base = {"--num": "2", "--shape": "1,4,4", "--out": str(tmp_path / "n.npy")}
    base.update({k: v.format(tmp=tmp_path) for k, v in zip(args[::2], args[1::2])})
    assert main(["noise", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "there.npy").read_bytes() == b"mine" and not (tmp_path / "n.npy").exists()


@pytest.mark.slow
def test_the_demo_ends_with_the_line_the_readme_shows(tmp_path):
    """`make demo` runs `localdiff study --dataset mnist --out ...`; its last line, up to the report's path, is
    the one the README quotes (issue 23 item 10)."""
    text = README.read_text()
    quoted = re.search(r"<!-- demo-output -->\n```\n(.*?)\n```", text, re.S).group(1).strip()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"localdiff\" study --dataset mnist --out \$\(OUT\)", make), "the demo's command changed"
    done = subprocess.run([sys.executable, "-m", "localdiff.cli", "study", "--dataset", "mnist", "--out",
                           str(tmp_path / "demo"), "--no-progress"], cwd=tmp_path, env=environment(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.split("; report: ")[0] == quoted, f"the demo now ends with:\n{last}"


# -- a failing rank's cause comes last --------------------------------------------------------------------

FAILING_RANK = """
import sys
import localdiff.commands.noise as noise
from localdiff import distributed
from localdiff.errors import ConfigError

def run(args):  # rank 1 fails on its own; rank 0 waits for it in a collective, which then fails too
    if distributed.world().rank == 1:
        raise {error}("the cause, on purpose")
    distributed.barrier("waiting for rank 1")
    return 0

noise.run = run
from localdiff.cli import main
sys.exit(main(["noise", "--num", "1", "--shape", "1,4,4", "--out", "x.npy"]))
"""


def last_lines(stderr: str) -> list[str]:
    """stderr's lines without blank lines and torchrun's rules of '=' characters."""
    return [line.strip() for line in stderr.splitlines() if line.strip() and set(line.strip()) != {"="}]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this PyTorch has no gloo backend")
@pytest.mark.parametrize("error, cause", [
    ("ConfigError", "localdiff noise: error on rank 1 of 2 ({host}): the cause, on purpose"),
    ("RuntimeError", "localdiff noise: rank 1 of 2 ({host}) failed: RuntimeError: the cause, on purpose"),
])
def test_the_failing_ranks_cause_is_the_last_thing_torchrun_prints(tmp_path, error, cause):
    """torchrun ends a failed job with its summary; its Root Cause entry is the rank that failed first, not the
    rank that only saw it leave, and its last line (above the closing rule) is that rank's one-line cause."""
    import socket

    script = tmp_path / "job.py"
    script.write_text(FAILING_RANK.format(error=error))
    env = environment(tmp_path)
    env.update(OMP_NUM_THREADS="1", LOCALDIFF_DIST_TIMEOUT="120")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    cause = cause.format(host=socket.gethostname())
    assert cause in done.stderr  # the rank printed it
    lines = last_lines(done.stderr)
    root = lines.index("Root Cause (first observed failure):")
    assert "rank      : 1 (local_rank: 1)" in lines[root:]
    assert lines[-1] == f"traceback : {cause}", done.stderr[-3000:]
    assert not (tmp_path / "x.npy").exists()


def test_readme_torchrun_command_without_its_noise_file_says_why_last(tmp_path):
    """The README's torchrun command as a new user first ran it (no noise.npy): the cause closes the output."""
    if shutil.which("localdiff", path=environment(tmp_path)["PATH"]) is None:
        pytest.skip("the localdiff console script is not installed")
    env = environment(tmp_path)
    env.update(OMP_NUM_THREADS="1", LOCALDIFF_DIST_TIMEOUT="120")
    done = subprocess.run(["bash", "-c", "torchrun --standalone --nproc-per-node 2 --no-python -- localdiff sample "
                           "--dataset mnist --model masked --init-noise noise.npy --out runs/masked-2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = last_lines(done.stderr)[-1]
    assert last.startswith("traceback : localdiff sample: error on rank ") and "noise.npy does not exist" in last
