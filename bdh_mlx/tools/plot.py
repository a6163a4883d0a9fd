"""``bdh-mlx plot RUN_DIR``: PNG charts of a run's ``metrics.jsonl`` (needs matplotlib)."""

import sys
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, run_command
from bdh_mlx.errors import ConfigError, DataError
from bdh_mlx.storage.files import atomic_write, make_dirs
from bdh_mlx.training.run_folder import RunFolder


def read_metrics(run_dir) -> list:
    """The run's records (a torn last line, from a run killed while logging, is left out)."""
    run = RunFolder(run_dir)
    if not run.metrics_path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is it a bdh-mlx run folder?)")
    records = run.read_metrics()
    if not records:
        raise DataError(f"{run.metrics_path}: no metrics yet")
    return records


def series(records, key):
    """(steps, values) of the records that hold ``key``."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_run(run_dir, out=None) -> list:
    """Write loss.png, lr.png and, once the run has evaluated, bpb.png and sparsity.png; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'bdh-mlx[plot]'") from None
    records = read_metrics(run_dir)
    out = Path(out or run_dir)
    make_dirs(out)
    name = Path(run_dir).resolve().name

    def chart(filename, title, ylabel, lines, log_y=False):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for label, (x, y), style in lines:
            if x:
                ax.plot(x, y, style, label=label, markersize=4)
        ax.set(title=f"{name}: {title}", xlabel="step", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        try:
            atomic_write(path, lambda f: fig.savefig(f, format="png"))
        finally:
            plt.close(fig)
        return path

    paths = [
        chart("loss.png", "loss", "cross-entropy (nats)",
              [("train", series(records, "train_loss"), "-"), ("validation", series(records, "val_loss"), "o-")]),
        chart("lr.png", "learning rate", "learning rate", [("lr", series(records, "lr"), "-")]),
    ]
    evals = [r for r in records if "sparsity_x" in r]
    if not evals:
        print(f"bdh-mlx plot: {run_dir} has no evaluation yet (up to step {records[-1]['step']}): bpb.png and "
              f"sparsity.png are drawn after the first one", file=sys.stderr)
    else:
        paths.insert(1, chart("bpb.png", "validation bits per byte", "bits per byte",
                              [("validation", series(records, "val_bpb"), "o-")]))
        steps = [r["step"] for r in evals]
        lines = []
        for layer in range(len(evals[-1]["sparsity_x"])):
            lines.append((f"x, layer {layer}", (steps, [r["sparsity_x"][layer] for r in evals]), f"C{layer}o-"))
            lines.append((f"y, layer {layer}", (steps, [r["sparsity_y"][layer] for r in evals]), f"C{layer}s--"))
        paths.append(chart("sparsity.png", "fraction of non-zero activations", "non-zero fraction", lines))
    return paths


def build_parser():
    parser = ArgumentParser(prog="bdh-mlx plot", description="Draw PNG charts of a run's metrics.jsonl.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")
    return parser


def run(args):
    for path in plot_run(args.run_dir, args.out):
        print(path)


def main(argv=None) -> int:
    return run_command("bdh-mlx plot", build_parser().parse_args, run, argv)
