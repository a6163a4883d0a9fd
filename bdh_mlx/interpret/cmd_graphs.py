"""``bdh-mlx graphs``: the neuron graphs G_x, G_y of a checkpoint beside their baselines (the same configuration at
initialization, a degree-preserving shuffle): degrees, power-law fit and its alternatives, modularity.

    bdh-mlx graphs --checkpoint CKPT [--kind x] [--edges 16 | --top-k 16 | --threshold T] --plot degrees.png
"""

import json

from bdh_mlx.arguments import (
    ArgumentParser,
    add_checkpoint_argument,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
)
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_write_text

from .common import require

PROG = "bdh-mlx graphs"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Neuron graphs G = D E per head: degrees and modularity, with "
                            "baselines.")
    add_checkpoint_argument(parser)
    parser.add_argument("--kind", choices=["x", "y"], default="x", help="G_x (encoder) or G_y (encoder_v)")
    sparsify = parser.add_mutually_exclusive_group()
    sparsify.add_argument("--edges", type=positive_int, metavar="K",
                          help="keep the K x N largest entries of each head's G: mean out-degree K, no bound on any "
                               "neuron's degree (default: 16)")
    sparsify.add_argument("--top-k", type=positive_int, help="keep the largest K per row: every degree >= K")
    sparsify.add_argument("--threshold", type=non_negative_float, help="keep the entries above this")
    parser.add_argument("--head", type=non_negative_int, action="append", help="a head to analyse (default: all)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the model at initialization and the degree-preserving shuffle")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial model and the shuffle")
    parser.add_argument("--plot", metavar="PNG", help="draw the degree distributions (log-log)")
    parser.add_argument("--json", metavar="PATH", help="write the summaries here")
    return parser


def describe(name: str, s: dict) -> str:
    fit = s["power_law"]
    if fit["alpha"] is None:
        tail = f"power law: {fit['note']}"
    else:
        compare = ", ".join(f"vs {alt} R {c['R']:+.2f} p {c['p']:.3g}" for alt, c in fit["compare"].items())
        tail = f"alpha {fit['alpha']:.2f} (d >= {fit['d_min']}, {fit['n_tail']} of {fit['n']} neurons; {compare})"
    q = "n/a" if s["modularity"] is None else f"{s['modularity']:.3f}"
    return (f"  {name:<26} {s['edges']:>8,} edges, mean degree {s['mean_degree']:.1f}, max {s['max_degree']}, "
            f"modularity {q} ({s['n_communities']} communities), {tail}")


def as_json(s: dict) -> dict:
    return {k: (as_json(v) if isinstance(v, dict) and "degrees" in v else
                v.tolist() if k == "degrees" else v) for k, v in s.items()}


def run(args):
    require("scipy", "networkx", "powerlaw", *(["matplotlib"] if args.plot else []))
    from .graphs import graph_summary, initial_model

    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    init = None if args.no_baselines else initial_model(model.config, args.seed)
    edges = args.edges * model.config.n_neurons if args.edges else None
    summaries = graph_summary(model, args.kind, args.top_k, args.threshold, edges, args.head, init, args.seed)
    print(f"kept: {summaries[0]['sparsified']}; modularity: Louvain, unweighted; power law: the powerlaw package "
          "(R > 0 favours the power law)")
    for s in summaries:
        print(f"G_{s['kind']} head {s['head']}:")
        for name, entry in (("trained", s), ("at initialization", s.get("init")),
                            ("degree-preserving shuffle", s.get("shuffle"))):
            if entry is not None:
                print(describe(name, entry))
    if args.plot:
        from .plots import plot_degrees, save_png

        save_png(plot_degrees(summaries), args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps([as_json(s) for s in summaries], indent=1))
        print(f"wrote {args.json}")
    return summaries


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
