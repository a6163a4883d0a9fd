"""Look at BDH's sparse neurons: which fraction of x and y fire, per layer and per byte of a text.

    python examples/sparsity_map.py --checkpoint checkpoints_mlx/quickstart/best.npz --text "The cat sat on the mat."

Writes a PNG (needs matplotlib): for each layer, the fraction of active x and y neurons at every byte,
and prints the mean fractions (the paper reports about 5% for x in trained models, y sparser still).
"""

import argparse
import tempfile
from pathlib import Path

import bdh_mlx  # first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx

OUT = Path(tempfile.gettempdir()) / "bdh-mlx-examples"  # never the repository


def activity(model, text: str):
    """Fractions of non-zero x and y neurons, each an array (n_layer, T)."""
    model.eval()
    idx = mx.array([list(text.encode("utf-8"))])
    acts = []
    model(idx, activations=acts)
    frac_x = mx.stack([(a["x"] > 0).mean(axis=(0, 1, 3)) for a in acts])
    frac_y = mx.stack([(a["y"] > 0).mean(axis=(0, 1, 3)) for a in acts])
    return frac_x, frac_y


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", default="The Dragon Hatchling learns from bytes, one at a time.")
    parser.add_argument("--out", default=str(OUT / "sparsity_map.png"),
                        help="PNG to write (default: a folder under the temporary directory)")
    args = parser.parse_args()

    model = bdh_mlx.load(args.checkpoint)
    frac_x, frac_y = activity(model, args.text)
    for layer in range(frac_x.shape[0]):
        print(f"layer {layer}: x active {frac_x[layer].mean().item():.2%}, y active {frac_y[layer].mean().item():.2%}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [chr(b) if 32 <= b < 127 else "·" for b in args.text.encode("utf-8")]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(labels) * 0.18), 5), sharex=True)
    for ax, frac, name in ((axes[0], frac_x, "x"), (axes[1], frac_y, "y")):
        image = ax.imshow(frac, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_ylabel(f"layer ({name})")
        ax.set_yticks(range(frac.shape[0]))
        fig.colorbar(image, ax=ax, label=f"fraction of {name} active")
    axes[1].set_xticks(range(len(labels)), labels, fontsize=7)
    fig.suptitle("BDH neuron activity per byte")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
