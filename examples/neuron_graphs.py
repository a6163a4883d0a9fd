"""The neuron graphs G_x = D_x E of a checkpoint: degree distribution (log-log, power-law fit) and modularity.

    python examples/neuron_graphs.py --checkpoint checkpoints_mlx/small-pydoc/best.npz --out /tmp/bdh_graphs
"""

import argparse
from pathlib import Path

import bdh_mlx
from bdh_mlx.interpret import graph_summary
from bdh_mlx.interpret.plots import plot_degrees, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--kind", choices=["x", "y"], default="x")
    parser.add_argument("--top-k", type=int, default=16, help="edges kept per row")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_graphs"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    summaries = graph_summary(bdh_mlx.load(args.checkpoint), args.kind, top_k=args.top_k)
    for s in summaries:
        fit = s["power_law"]
        tail = f"alpha {fit['alpha']:.2f} (d >= {fit['d_min']}, {fit['n_tail']} neurons)" if fit else "no power-law fit"
        print(f"G_{s['kind']} head {s['head']}: {s['edges']} edges, max degree {s['max_degree']}, {tail}, "
              f"modularity {s['modularity']:.3f} in {s['n_communities']} communities")
    save_png(plot_degrees(summaries), args.out / "degrees.png")
    print(f"wrote {args.out}/degrees.png")


if __name__ == "__main__":
    main()
