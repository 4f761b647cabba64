"""``localdiff experiment locality-follows-data``: controlled-statistics test of the paper's causal claim."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from ..errors import ConfigError
from .common import command_line, name_list, new_run_dir, timestep_list, versions

EXPERIMENTS = ("locality-follows-data",)
QUICK = dict(sets=("grf", "grf-aniso"), train_steps=40, subset=2000, timesteps=(300,), draws=2, linear_steps=150)


def register(subparsers) -> None:
    from ..experiment import DEFAULT_SETS, ExperimentConfig

    d = ExperimentConfig()
    p = subparsers.add_parser(
        "experiment", help="controlled-statistics experiments (locality-follows-data)",
        description="locality-follows-data: train a U-Net on each dataset with controlled pixel correlations and "
                    "compare its sensitivity fields with the data's Wiener fields and with an isotropic local "
                    "field of matched radius.")
    p.add_argument("name", choices=EXPERIMENTS, help="the experiment to run")
    p.add_argument("--sets", default=",".join(DEFAULT_SETS),
                   help=f"comma-separated datasets (default {','.join(DEFAULT_SETS)})")
    p.add_argument("--config", choices=("small", "paper"), default=d.unet_config,
                   help="U-Net architecture and recipe: small (CPU, default) or paper (GPU)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help=f"U-Net optimisation steps per set (default {d.train_steps})")
    p.add_argument("--subset", type=int, default=None, help="training images per set (default: all)")
    p.add_argument("--timesteps", default=",".join(map(str, d.timesteps)),
                   help=f"timesteps of the fields (default {','.join(map(str, d.timesteps))})")
    p.add_argument("--pixels", default=d.pixels, help="'center', 'all' or 'r,c;r,c' (default center)")
    p.add_argument("--draws", type=int, default=d.draws, help=f"noisy held-out images per timestep (default {d.draws})")
    p.add_argument("--no-linear", action="store_true", help="skip the trained linear denoiser")
    p.add_argument("--linear-steps", type=int, default=None, help="linear model's steps per timestep")
    p.add_argument("--unet", action="append", metavar="SET=DIR",
                   help="use an already trained U-Net for SET instead of training one (repeatable)")
    p.add_argument("--allow-foreign-unet", action="store_true",
                   help="accept a --unet SET=DIR whose manifest names other training data than the set's")
    p.add_argument("--quick", action="store_true",
                   help="grf and grf-aniso, 2,000 images, 40 training steps, one timestep: a smoke run of a minute")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.set_defaults(func=run)


def _unet_dirs(pairs) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--unet expects SET=DIR, got '{pair}'")
        out[name.strip()] = path.strip()
    return out


def config_from_args(args):
    from ..experiment import ExperimentConfig

    timesteps = tuple(timestep_list(args.timesteps, "--timesteps"))
    cfg = ExperimentConfig(
        sets=tuple(name_list(args.sets, "--sets")), unet_config=args.config,
        train_steps=args.train_steps, subset=args.subset, timesteps=timesteps, pixels=args.pixels,
        draws=args.draws, linear=not args.no_linear, linear_steps=args.linear_steps, seed=args.seed,
        device=args.device, allow_foreign_unet=args.allow_foreign_unet)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    cfg.validate()
    return cfg


def plot_summary(results):
    """Bars per set: cosine of the U-Net field with the data's Wiener field and with the matched blob."""
    from ..report.figures import plt

    names = [r.name for r in results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.0, 3.2))
    keys = [("cos_wiener", "U-Net vs Wiener of its data"), ("cos_blob", "U-Net vs isotropic blob (same r50)")]
    if any("cos_linear_wiener" in r.summary for r in results):
        keys.append(("cos_linear_wiener", "trained linear vs Wiener"))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        ax.bar(x + (k - (len(keys) - 1) / 2) * width, [r.summary.get(key, np.nan) for r in results], width,
               label=label)
    ax.set_xticks(x, names)
    ax.set_ylim(-0.1, 1.05)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("cosine similarity of fields")
    ax.set_title("Does the U-Net's field follow its data? (mean over timesteps and pixels)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def run(args) -> int:
    from ..experiment import per_timestep_table, run_experiment, summary_table, verdict
    from ..fileio import write_bytes, write_json, write_npz
    from ..report.figures import plot_fields, save_figure
    from ..report.html import experiment_report
    from ..sensitivity import locality_measures

    cfg = config_from_args(args)
    unet_dirs = _unet_dirs(args.unet)
    t0 = time.perf_counter()
    with new_run_dir(args.out) as tmp:
        results = run_experiment(cfg, tmp / "unets", unet_dirs=unet_dirs, label=command_line())
        tables = summary_table(results) + "\n\n" + per_timestep_table(results) + "\n"
        write_bytes(tmp / "summary.md", tables.encode())
        arrays = {}
        for r in results:
            for model, f in {**r.fields, "covariance": r.covariance}.items():
                arrays[f"{r.name}/{model}"] = f.mean.numpy().astype(np.float32)
            panels = {"data covariance": r.covariance, **r.fields}
            save_figure(plot_fields(panels, 0, title=f"{r.name}: fields of pixel {r.fields['unet'].pixels[0]}"),
                        tmp / f"fields_{r.name}.png")
        write_npz(tmp / "fields.npz", timesteps=np.asarray(cfg.timesteps, np.int64), **arrays)
        save_figure(plot_summary(results), tmp / "summary.png")
        record = {
            "experiment": args.name, "command": command_line(), "config": dataclasses.asdict(cfg),
            "sets": {r.name: {"summary": r.summary, "per_timestep": r.comparison, "verdict": verdict(r.comparison),
                              "locality": {m: locality_measures(f) for m, f in r.fields.items()},
                              "unet": {k: v for k, v in r.unet_info.items() if k != "path"},
                              "unet_dir": str(r.unet_dir) if r.name in unet_dirs else f"unets/{r.name}",
                              "linear_history": r.linear_history}
                     for r in results},
            "seconds": time.perf_counter() - t0, "versions": versions(),
        }
        write_json(tmp / "experiment.json", record)
        page = experiment_report(json.loads((tmp / "experiment.json").read_text()), (tmp / "summary.png").read_bytes(),
                                 {r.name: (tmp / f"fields_{r.name}.png").read_bytes() for r in results})
        write_bytes(tmp / "report.html", page.encode())
    print(tables)
    verdicts = {r.name: verdict(r.comparison)["text"] for r in results}
    print(f"U-Net fields closer to (paired, 95% intervals): {'; '.join(f'{k}: {v}' for k, v in verdicts.items())}; "
          f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0
