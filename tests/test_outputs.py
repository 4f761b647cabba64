"""Outputs (issue 16): files and directories follow the umask, SIGTERM cleans up like Ctrl-C, what a
killed run left is removed by the next one, and an --out that appears mid-run never loses results."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from localdiff.cli import main
from localdiff.commands.common import new_run_dir
from localdiff.errors import ConfigError
from localdiff.fileio import _host, current_umask, owner_tag, write_json

SRC = str(Path(__file__).resolve().parents[1] / "src")


def modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_umask_modes(root: Path, mask: int) -> None:
    for name, mode in modes(root).items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)} under umask {mask:03o}"


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (30, 1, 6, 6)).astype(np.uint8))
    return path


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask


def test_every_command_writes_with_the_umask(toy, tmp_path, tmp_cache, umask, capsys):
    runs = {
        "sample": ["sample", "--data", str(toy), "--model", "wiener", "--num", "2", "--steps", "2", "--trajectory"],
        "fields": ["fields", "--data", str(toy), "--held-out-split", "train", "--models", "wiener", "--timesteps",
                   "100,500", "--draws", "2"],
        "evaluate": ["evaluate", "--data", str(toy), "--held-out-split", "train", "--models", "wiener",
                     "--timesteps", "100", "--num", "4"],
    }
    for name, argv in runs.items():
        out = tmp_path / "runs" / name
        assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
        assert len(modes(out)) > 2
        assert_umask_modes(out, umask)
    out = tmp_path / "els.json"
    assert main(["calibrate-patches", "--data", str(toy), "--held-out-split", "train", "--model", "ls", "--target",
                 "optimal", "--sizes", "3,5", "--timesteps", "500", "--num", "2", "--device", "cpu",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert_umask_modes(tmp_cache, umask)  # the statistics cache too
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".localdiff-cache"]  # no temporary left


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    write_json(tmp_path / "new" / "a.json", {"x": 1})
    assert_umask_modes(tmp_path / "new", umask)


# ------------------------------------------------------------------------------------------------
# signals and leftovers
# ------------------------------------------------------------------------------------------------

_BLOCKING_SAMPLE = textwrap.dedent("""
    import sys, time
    import localdiff.diffusion as D

    def stuck(*args, **kwargs):
        print("sampling", flush=True)
        time.sleep(120)

    D.sample_loop = stuck
    from localdiff.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_stuck_run(toy, out, tmp_cache):
    env = {**os.environ, "PYTHONPATH": SRC, "LOCALDIFF_CACHE": str(tmp_cache), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_SAMPLE, "sample", "--data", str(toy), "--model", "wiener",
                             "--num", "2", "--device", "cpu", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "sampling"  # the partial directory exists now
    assert len(list(out.parent.glob(f".{out.name}.*.partial"))) == 1
    return proc


@pytest.mark.parametrize("sig,rc,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_cleans_up_like_sigint(toy, tmp_path, tmp_cache, sig, rc, word):
    out = tmp_path / "run"
    proc = _start_stuck_run(toy, out, tmp_cache)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == rc and f"localdiff sample: {word}" in err
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(toy, tmp_path, tmp_cache, capsys):
    out = tmp_path / "run"
    proc = _start_stuck_run(toy, out, tmp_cache)
    proc.kill()
    proc.wait(timeout=60)
    (left,) = tmp_path.glob(".run.*.partial")
    assert f"p{proc.pid}s" in left.name
    with new_run_dir(tmp_path / "next") as tmp:
        (tmp / "a").write_text("x")
    assert not left.exists() and (tmp_path / "next" / "a").exists()
    assert f"removed {left}, the unfinished output of a run that is no longer running" in capsys.readouterr().err


def test_partials_that_cannot_be_judged_are_reported_not_removed(tmp_path, capsys):
    live = tmp_path / f".a.{owner_tag()}.xyz.partial"  # this process: alive
    other_host = tmp_path / f".b.h{(int(_host(), 16) ^ 1):08x}p1s1.xyz.partial"
    older = tmp_path / ".c.k3j2h1_x.partial"  # written by an earlier version, without an owner tag
    foreign = tmp_path / ".some-other-tool.partial"  # not ours: not even mentioned
    reused = tmp_path / f".d.h{_host()}p{os.getpid()}s1.xyz.partial"  # our pid, another start time: dead
    for p in (live, other_host, older, reused, foreign):
        p.mkdir()
    with new_run_dir(tmp_path / "next"):
        pass
    err = capsys.readouterr().err
    assert live.exists() and other_host.exists() and older.exists() and foreign.exists() and not reused.exists()
    assert f"{other_host} is the unfinished output of a run on another machine" in err
    assert f"{older} is the unfinished output of an older localdiff" in err
    assert str(live) not in err and str(foreign) not in err


def test_stale_temporary_files_of_a_dead_writer_are_removed(tmp_path):
    dead = tmp_path / f".a.json.h{_host()}p{os.getpid()}s1.abcd1234.tmp"
    live = tmp_path / f".a.json.{owner_tag()}.abcd1234.tmp"
    other = tmp_path / f".b.json.h{_host()}p{os.getpid()}s1.abcd1234.tmp"  # another file's: left for its writer
    for p in (dead, live, other):
        p.write_text("half")
    write_json(tmp_path / "a.json", {"x": 1})
    assert not dead.exists() and live.exists() and other.exists()


def test_an_out_that_appears_mid_run_keeps_the_results_under_a_named_path(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        with new_run_dir(out) as tmp:
            (tmp / "result.txt").write_text("finished")
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
    kept = tmp_path / "run-1"
    assert str(e.value) == (f"output directory {out} appeared while this run was working; its results are in {kept} "
                            "(move them where you want them)")
    assert (kept / "result.txt").read_text() == "finished" and sorted(os.listdir(out)) == ["theirs.txt"]
    assert not list(tmp_path.glob(".run.*"))


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with new_run_dir(tmp_path / "run") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
