"""Matplotlib charts (Agg) of the analyses, as PNG files or inline base64 for the HTML report."""

import base64
import io

import numpy as np

from bdh_mlx.storage.files import atomic_write

from .common import KINDS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def save_png(fig, path, dpi: int = 90):
    data = png_bytes(fig, dpi)
    atomic_write(path, lambda f: f.write(data))


def png_data_uri(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")


def plot_sparsity(stats: dict):
    """Per layer, the fraction of x and y active in each head (bars) and over all heads (line)."""
    plt = pyplot()
    layers = stats["layers"]
    n_head = len(layers[0]["x_active_per_head"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    width = 0.8 / n_head
    for ax, kind in zip(axes, KINDS, strict=False):
        at = np.arange(len(layers))
        for h in range(n_head):
            ax.bar(at + (h - (n_head - 1) / 2) * width, [entry[f"{kind}_active_per_head"][h] for entry in layers],
                   width, label=f"head {h}")
        ax.plot(at, [entry[f"{kind}_active"] for entry in layers], "k.-", label="all heads")
        ax.set_xticks(at)
        ax.set_xlabel("layer")
        ax.set_title(f"fraction of {kind} non-zero")
    axes[0].set_ylabel("fraction active")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Activation sparsity over {stats['n_bytes']:,} bytes")
    fig.tight_layout()
    return fig


def finish(fig, ax, ylabel: str, title: str):
    """The y label, title and legend of a one-axes figure, laid out."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_synapse_series(series: np.ndarray, labels: list, text: bytes | None = None):
    """Each synapse's strength after every byte; the bytes along the x axis when the text is short."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for values, label in zip(series, labels, strict=False):
        ax.plot(values, label=label)
    if text is not None and len(text) <= 120:
        ax.set_xticks(range(len(text)), [chr(b) if 32 < b < 127 else "·" for b in text], fontsize=8)
    else:
        ax.set_xlabel("byte")
    return finish(fig, ax, "sigma (i, j)", "Synapse strength along the text")


def plot_degrees(summaries: list):
    """Log-log complementary CDF of the degrees of each head's graph, with the fitted power law's tail."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        d = np.sort(s["degrees"][s["degrees"] > 0])
        ccdf = 1 - np.arange(len(d)) / len(d)
        fit = s["power_law"]
        label = f"G_{s['kind']} head {s['head']}" + (f", Q = {s['modularity']:.2f}" if s["modularity"] else "")
        line, = ax.loglog(d, ccdf, ".", markersize=3, label=label + (f", alpha = {fit['alpha']:.2f}" if fit else ""))
        if fit:
            tail = np.geomspace(fit["d_min"], d.max(), 20)
            start = (d >= fit["d_min"]).mean()
            ax.loglog(tail, start * (tail / fit["d_min"]) ** (1 - fit["alpha"]), "--", color=line.get_color())
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("degree d")
    return finish(fig, ax, "P(degree >= d)", "Neuron graph degrees (dashed: power-law fit)")
