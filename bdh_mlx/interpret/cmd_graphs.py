"""``bdh-mlx graphs``: the neuron graphs G_x, G_y of a checkpoint: degrees, power-law fit, modularity.

    bdh-mlx graphs --checkpoint CKPT [--kind x] [--top-k 16 | --threshold T] --plot degrees.png --json graphs.json
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

from .graphs import graph_summary
from .plots import plot_degrees, save_png

PROG = "bdh-mlx graphs"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Neuron graphs G = D E per head: degrees and modularity.")
    add_checkpoint_argument(parser)
    parser.add_argument("--kind", choices=["x", "y"], default="x", help="G_x (encoder) or G_y (encoder_v)")
    parser.add_argument("--top-k", type=positive_int, help="keep the largest positive entries per row (default 16)")
    parser.add_argument("--threshold", type=non_negative_float, help="keep the entries above this")
    parser.add_argument("--head", type=non_negative_int, action="append", help="a head to analyse (default: all)")
    parser.add_argument("--plot", metavar="PNG", help="draw the degree distributions (log-log)")
    parser.add_argument("--json", metavar="PATH", help="write the summaries here")
    return parser


def run(args):
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    top_k = args.top_k if args.top_k or args.threshold is not None else 16
    summaries = graph_summary(model, args.kind, top_k, args.threshold, args.head)
    for s in summaries:
        fit = s["power_law"]
        alpha = f"alpha {fit['alpha']:.2f} (d >= {fit['d_min']})" if fit else "no power-law fit"
        q = "n/a" if s["modularity"] is None else f"{s['modularity']:.3f}"
        print(f"G_{s['kind']} head {s['head']}: {s['edges']:,} edges, mean degree {s['mean_degree']:.1f}, "
              f"max {s['max_degree']}, {alpha}, modularity {q} ({s['n_communities']} communities)")
    if args.plot:
        save_png(plot_degrees(summaries), args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps([{**s, "degrees": s["degrees"].tolist()} for s in summaries], indent=1))
        print(f"wrote {args.json}")
    return summaries


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
