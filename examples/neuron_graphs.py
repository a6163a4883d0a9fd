"""The neuron graphs G_x = D_x E of a checkpoint beside the model at initialization and a degree-preserving shuffle:
degree distribution (log-log, power-law fit and its alternatives) and modularity.

    python examples/neuron_graphs.py --checkpoint checkpoints_mlx/small-pydoc/best.npz --out /tmp/bdh_graphs
"""

import argparse
from pathlib import Path

import bdh_mlx
from bdh_mlx.interpret import graph_summary
from bdh_mlx.interpret.cmd_graphs import describe
from bdh_mlx.interpret.graphs import initial_model
from bdh_mlx.interpret.plots import plot_degrees, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--kind", choices=["x", "y"], default="x")
    parser.add_argument("--edges", type=int, default=16, help="edges kept per neuron on average (a global cut)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_graphs"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = bdh_mlx.load(args.checkpoint)
    summaries = graph_summary(model, args.kind, edges=args.edges * model.config.n_neurons,
                              init_model=initial_model(model.config))
    print(f"kept: {summaries[0]['sparsified']}")
    for s in summaries:
        print(f"G_{s['kind']} head {s['head']}:")
        for name in ("trained", "init", "shuffle"):
            print(describe(name, s if name == "trained" else s[name]))
    save_png(plot_degrees(summaries), args.out / "degrees.png")
    print(f"wrote {args.out}/degrees.png")


if __name__ == "__main__":
    main()
