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


def step_ticks(series: np.ndarray, text: bytes, per_series: int = 6, spacing: int | None = None) -> list:
    """The bytes where the synapses grew most (the largest steps of each), at least ``spacing`` bytes apart."""
    spacing = spacing or max(1, len(text) // 40)
    steps = np.diff(series, axis=1, prepend=0)
    candidates = sorted({int(t) for row in steps for t in np.argsort(-row)[:per_series] if row[t] > 0},
                        key=lambda t: -steps[:, t].max())
    chosen = []
    for t in candidates:
        if all(abs(t - c) >= spacing for c in chosen):
            chosen.append(t)
    return sorted(chosen)


def printable(b: int) -> str:
    return chr(b) if 32 < b < 127 else "·"


def plot_synapse_series(series: np.ndarray, labels: list, text: bytes | None = None):
    """Each synapse's strength after every byte, against the text's own characters: every character when the text
    is short (120 bytes or fewer), otherwise the few words where the synapses grew most (the character in [ ])."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for values, label in zip(series, labels, strict=False):
        ax.plot(values, label=label)
    if text is not None and len(text) <= 120:
        ax.set_xticks(range(len(text)), [printable(b) for b in text], fontsize=8)
        ax.set_xlabel("byte of the text")
    elif text is not None:
        ticks = step_ticks(series, text)
        words = ["".join(printable(b) for b in text[max(0, t - 6) : t]) + f"[{printable(text[t])}]"
                 + "".join(printable(b) for b in text[t + 1 : t + 4]) for t in ticks]
        ax.set_xticks(ticks, words, rotation=90, fontsize=8, family="monospace")
        ax.set_xlabel(f"where the synapses grew most, in {len(text):,} bytes of text")
    else:
        ax.set_xlabel("byte")
    return finish(fig, ax, "sigma (i, j)", "Synapse strength along the text")


def readable_log_axes(ax):
    """Log ticks at 1, 2, 5 x 10^k with plain numbers: labelled whatever the span (a tiny graph has no decade)."""
    from matplotlib import ticker

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def ccdf(degrees: np.ndarray) -> tuple:
    d = np.sort(degrees[degrees > 0])
    return d, 1 - np.arange(len(d)) / len(d)


def plot_degrees(summaries: list):
    """Log-log complementary CDF of each head's degrees (dashed: the fitted power law's tail, when there is an
    estimate); grey crosses: the same configuration at initialization, when the summaries have that baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        d, p = ccdf(s["degrees"])
        fit = s["power_law"]
        q = f", Q = {s['modularity']:.2f}" if s["modularity"] is not None else ""
        alpha = f", alpha = {fit['alpha']:.2f}" if fit["alpha"] is not None else ", no power-law estimate"
        line, = ax.loglog(d, p, ".", markersize=3, label=f"G_{s['kind']} head {s['head']}{q}{alpha}")
        if fit["alpha"] is not None:
            tail = np.geomspace(fit["d_min"], d.max(), 20)
            start = (d >= fit["d_min"]).mean()
            ax.loglog(tail, start * (tail / fit["d_min"]) ** (1 - fit["alpha"]), "--", color=line.get_color())
        if "init" in s:
            d0, p0 = ccdf(s["init"]["degrees"])
            ax.loglog(d0, p0, "x", color="0.6", markersize=3,
                      label="at initialization" if s is summaries[0] else None)
    readable_log_axes(ax)
    ax.set_xlabel("degree d")
    return finish(fig, ax, "P(degree >= d)", f"Neuron graph degrees ({summaries[0]['edges']:,} edges per head)")


def plot_sparsity_over_training(records: list, init: dict | None = None):
    """The fraction of x and of y non-zero per layer at each evaluation of a run (``metrics.jsonl`` records with
    ``sparsity_x``, ``sparsity_y``); ``init``: the same at step 0 (the untrained model)."""
    plt = pyplot()
    records = ([{"step": 0, **init}] if init else []) + [r for r in records if "sparsity_x" in r]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        values = np.array([r[f"sparsity_{kind}"] for r in records])  # (evals, layers)
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], ".-", label=f"layer {layer}")
        ax.axhline(0.05, color="0.5", ls=":", label="paper: ~5% (x)" if kind == "x" else None)
        ax.set_xlabel("training step")
        ax.set_title(f"fraction of {kind} non-zero")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction non-zero")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
