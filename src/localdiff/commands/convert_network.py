"""``localdiff convert-network``: any network localdiff reads, written as safetensors + JSON (no pickle)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-network", help="write a network (paper .pt, EDM .pkl or studio file) as safetensors + JSON",
        description="Read a network the way every localdiff command reads it (torch.load(weights_only=True), or "
                    "EDM's pickles by a restricted unpickler that runs nothing) and write OUT.safetensors and "
                    "OUT.json, which load without any pickle. Existing files are never overwritten.")
    p.add_argument("src", metavar="IN", help="the paper's ckpt_epoch_200.pt, an EDM network-snapshot/edm-*.pkl, or "
                                             "an {init_kwargs, state_dict, meta} torch file")
    p.add_argument("out", metavar="OUT", help="output name: OUT.safetensors and OUT.json are written")
    p.add_argument("--key", default="ema", help="which network of an EDM snapshot (default ema)")
    p.add_argument("--no-progress", action="store_true", help="(no progress bars are drawn by this command)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..networks import convert_network

    weights, record = convert_network(args.src, args.out, key=args.key)
    print(f"wrote {weights} and {record}")
    return 0
