"""``localdiff probe``: what datasets' second-order statistics imply for a denoiser, before any network is
trained: Wiener fields of every pixel at every noise level, masks, receptive fields, and when memorisation
beats the linear denoiser; probe.json, probe.npz and a self-contained probe.html."""

from __future__ import annotations

import re
import time
from datetime import datetime

from ..errors import ConfigError
from .common import command_line, int_list, name_list, new_run_dir, timestep_list, versions


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="what a dataset's statistics imply (Wiener fields, masks, memorisation) before training",
        description="Probe one or more datasets side by side: covariance spectrum and principal components; every "
                    "pixel's exact Wiener field at each noise level summarised as maps (extent, anisotropy, "
                    "stationarity); the paper's masks beside U-Net receptive fields; held-out MSE of Wiener against "
                    "the exact optimal denoiser at N/8, N/4, N/2 and N training images (the memorisation horizon). "
                    "Writes probe.json, probe.npz and a self-contained probe.html with an interactive field explorer.")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="built-in dataset names (mnist, fashion-mnist, mnist-permuted, ...) or paths (IDX or CIFAR-10 "
                        "directory, image folder, .npy/.npz)")
    p.add_argument("--data-opt", action="append", metavar="DATA.KEY=VALUE",
                   help="an option of a built-in dataset, e.g. natural-patches.num=50000 (repeatable)")
    p.add_argument("--subset", type=int, default=None, help="probe a seeded subset of this many training images")
    p.add_argument("--timesteps", default=None, help="comma-separated noise levels (default: the 10 DDIM timesteps)")
    p.add_argument("--tau", type=float, default=None, help="mask threshold (default: the paper's for the image size)")
    p.add_argument("--unet-configs", default="small,paper",
                   help="U-Net configurations whose receptive field is shown: small, paper, or a diffusers "
                        "directory / config.json (comma-separated; default small,paper)")
    p.add_argument("--unet", action="append", metavar="[DATA=]DIR",
                   help="a trained network to score beside Wiener and optimal on held-out images: a diffusers "
                        "UNet2DModel directory, or 'shipped' for the weights shipped with localdiff; DATA= names the "
                        "dataset when several are probed (repeatable)")
    p.add_argument("--allow-foreign-unet", action="store_true", help="accept a network trained on other data")
    p.add_argument("--held-out", type=int, default=200, help="held-out images scored (default 200)")
    p.add_argument("--held-out-split", default="test", help="split of the held-out images (default test)")
    p.add_argument("--sizes", default="8,4,2,1", help="training-set sizes as divisors of N (default 8,4,2,1)")
    p.add_argument("--no-memorisation", action="store_true", help="skip the held-out MSE stage")
    p.add_argument("--components", type=int, default=8, help="principal components shown (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets, held-out images and noise (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when available)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--save-fields", action="store_true",
                   help="also store every display field [T, P, P] in probe.npz (float32; 25 MB per 28 px set)")
    p.add_argument("--out", default=None, help="new directory for the results (default runs/probe-<data>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def data_options(pairs: list[str] | None, names: list[str]) -> dict[str, dict]:
    """``["natural-patches.num=50000"]`` -> ``{"natural-patches": {"num": 50000}}`` for names in ``names``."""
    out: dict[str, dict] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        name, dot, field = key.rpartition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--data-opt expects DATA.KEY=VALUE, e.g. natural-patches.num=50000; got '{pair}'")
        if name not in names:
            raise ConfigError(f"--data-opt names '{name}', which is not among the datasets ({', '.join(names)})")
        out.setdefault(name, {})[field.strip()] = _value(value.strip())
    return out


def unet_paths(specs: list[str] | None, labels: list[str], data: list[str]) -> dict[str, str]:
    """``--unet`` values -> ``{label: DIR or 'shipped'}``."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if sep and name in data + labels:
            label = labels[data.index(name)] if name in data else name
        elif len(labels) == 1:
            label, path = labels[0], spec
        else:
            raise ConfigError(f"--unet '{spec}': with several datasets write DATA=DIR (DATA one of {', '.join(data)})")
        if label in out:
            raise ConfigError(f"--unet is given twice for {label}")
        out[label] = path or "shipped"
    return out


def run(args) -> int:
    from ..data import load_dataset
    from ..probing.run import default_labels, probe

    items = list(args.data)
    labels = default_labels(items)
    opts = data_options(args.data_opt, items)
    timesteps = timestep_list(args.timesteps, "--timesteps") if args.timesteps is not None else None
    divisors = int_list(args.sizes, "--sizes")
    unets = unet_paths(args.unet, labels, items)
    configs = name_list(args.unet_configs, "--unet-configs")
    if args.held_out < 2 or args.components < 1:
        raise ConfigError("--held-out must be at least 2 and --components positive")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or f"runs/probe-{re.sub(r'[^A-Za-z0-9_.-]+', '_', '-'.join(labels))[:60]}-{stamp}"
    t0 = time.perf_counter()
    data, held = [], {}
    for item, label in zip(items, labels):
        if item in opts:  # a built-in with options: load both splits here
            data.append(load_dataset(item, split="train", subset=args.subset, seed=args.seed, **opts[item]))
            held[label] = load_dataset(item, split=args.held_out_split, seed=args.seed, **opts[item])
        else:
            data.append(item)
    with new_run_dir(out) as tmp:
        result = probe(*data, labels=labels, timesteps=timesteps, tau=args.tau, unet_configs=configs, unets=unets,
                       allow_foreign_unet=args.allow_foreign_unet, held_out=held or None,
                       held_out_num=args.held_out, held_out_split=args.held_out_split, divisors=divisors,
                       memorise=not args.no_memorisation, subset=args.subset, seed=args.seed,
                       components=args.components, device=args.device, cache=not args.no_cache,
                       progress=not args.no_progress)
        result.record["command"] = command_line()
        result.record["versions"] = versions()
        result.record["seconds"]["command"] = time.perf_counter() - t0
        result.write(tmp, save_fields=args.save_fields)
    for line in result.summary_lines():
        print(line)
    print(f"wrote {out}/probe.html, probe.json and probe.npz ({time.perf_counter() - t0:.1f} s)")
    return 0
