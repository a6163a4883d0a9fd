"""Activation statistics (JSON) and the HTML report of a text, from Python.

    python examples/inspect_report.py --checkpoint checkpoints_mlx/small-pydoc/best.npz --out /tmp/bdh_inspect

Same as ``bdh-mlx inspect --checkpoint CKPT --text ... --json stats.json --out report.html``.
"""

import argparse
import json
from pathlib import Path

import bdh_mlx
from bdh_mlx.interpret import activation_stats, write_report
from bdh_mlx.interpret.plots import plot_sparsity, save_png

TEXT = ("The assert statement is a convenient way to insert debugging assertions into a program.\n"
        "def mean(values):\n    assert values, 'no values'\n    return sum(values) / len(values)\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_inspect"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = bdh_mlx.load(args.checkpoint)
    stats = activation_stats(model, args.text)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1))
    save_png(plot_sparsity(stats), args.out / "sparsity.png")
    write_report(args.out / "report.html", model, args.text, stats=stats)
    for i, layer in enumerate(stats["layers"]):
        print(f"layer {i}: x active {layer['x_active']:.2%}, y active {layer['y_active']:.2%}")
    print(f"wrote {args.out}/stats.json, sparsity.png, report.html")


if __name__ == "__main__":
    main()
