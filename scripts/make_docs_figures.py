"""Regenerate the figures in docs/ from the commands that make them, so every picture the docs show is what
today's commands draw (issue 23 item 5).

    python scripts/make_docs_figures.py                       # the quick ones (fields_mnist, probe, unet samples)
    python scripts/make_docs_figures.py --only study_mnist_samples,study_mnist_r2
    python scripts/make_docs_figures.py --list

Each figure is one command (run in a fresh directory under --work) and the file of its output that is copied
into docs/ (atomically, over the old one). The slow ones (the 32-sample studies of docs/RESULTS.md §2 and §4,
the CPU-default experiment of §3) run only when ``--only`` names them. The probe page's screenshot is taken
with Debian's chromium, headless, as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# name: (command, file of its output directory, slow)
FIGURES = {
    "fields_mnist": (["fields", "--dataset", "mnist", "--models", "wiener,optimal,masked", "--pixels", "center",
                      "--timesteps", "100,300,500,700,900", "--draws", "16"], "fields.png", False),
    "unet_mnist_samples": (["sample", "--dataset", "mnist", "--model", "unet", "--num", "32", "--seed", "0"],
                           "grid.png", False),
    "probe": (["probe", "mnist", "fashion-mnist", "mnist-permuted"], "probe.html", False),
    "study_mnist_samples": (["study", "--dataset", "mnist", "--num", "32"], "samples.png", True),
    "study_mnist_r2": (["study", "--dataset", "mnist", "--num", "32"], "r2_per_step.png", True),
    "study_fashion_samples": (["study", "--dataset", "fashion-mnist", "--num", "32"], "samples.png", True),
    "study_fashion_r2": (["study", "--dataset", "fashion-mnist", "--num", "32"], "r2_per_step.png", True),
    "fields_variants_fashion": (["fields", "--dataset", "fashion-mnist", "--models",
                                 "unet,wiener,masked,masked-soft,masked-equivariant,wiener-quadratic",
                                 "--timesteps", "100,300,500,700,900", "--draws", "16"], "fields.png", True),
    "experiment_summary": (["experiment", "locality-follows-data"], "summary.png", True),
    "experiment_fields_grf-aniso": (["experiment", "locality-follows-data"], "fields_grf-aniso.png", True),
    "experiment_fields_mnist-permuted": (["experiment", "locality-follows-data"], "fields_mnist-permuted.png", True),
}


def screenshot(page: Path, out: Path, work: Path) -> None:
    """A PNG of ``page`` rendered by headless chromium (1260 px wide, the page's top 1500 px)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("make_docs_figures: the probe screenshot needs Debian's chromium (`make system-deps`)")
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={work / 'profile'}", "--hide-scrollbars",
           "--window-size=1260,1500", "--virtual-time-budget=5000", f"--screenshot={out}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)


def make(name: str, work: Path, runs: dict) -> Path:
    """Run the figure's command (once per distinct command) and copy its output into docs/."""
    command, output, _ = FIGURES[name]
    run_dir = runs.get(tuple(command))
    if run_dir is None:
        run_dir = runs[tuple(command)] = work / f"run{len(runs)}"
        cmd = [sys.executable, "-m", "localdiff.cli", *command, "--out", str(run_dir), "--no-progress"]
        print("$ localdiff " + " ".join(command), flush=True)
        subprocess.run(cmd, check=True, cwd=work)
    target = DOCS / f"{name}.png"
    source = run_dir / output
    if output.endswith(".html"):
        source = work / f"{name}-screenshot.png"
        screenshot(run_dir / output, source, work)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help="comma-separated figure names (default: the quick ones)")
    p.add_argument("--list", action="store_true", help="list the figures and their commands")
    p.add_argument("--work", default=None, help="directory for the runs (default: a temporary one)")
    args = p.parse_args()
    if args.list:
        for name, (command, output, slow) in FIGURES.items():
            print(f"{name:34s} localdiff {' '.join(command)}  -> {output}{'  (slow)' if slow else ''}")
        return 0
    names = args.only.split(",") if args.only else [n for n, f in FIGURES.items() if not f[2]]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        sys.exit(f"make_docs_figures: unknown figure(s) {', '.join(unknown)}; --list shows them")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="docs-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    for name in names:
        print(f"wrote {make(name, work, runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
