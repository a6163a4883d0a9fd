"""One self-contained HTML report: the text coloured by neuron activity, sparsity, synapses, graph degrees.

No network and no server: images are inline PNGs, the data and the script are in the page. Click a byte to see
the neurons that fire most there (and, given an atlas, where else they fire most).
"""

import html
import json

import numpy as np

from bdh_mlx.storage.files import atomic_write_text

from .common import CHUNK_SIZE, KINDS, as_bytes, stream_activations
from .graphs import graph_summary
from .plots import plot_degrees, plot_sparsity, plot_synapse_series, png_data_uri
from .stats import activation_stats
from .synapses import strongest_synapses, synapse_series, synapse_state


def byte_activity(model, text, top: int = 8, chunk_size: int = CHUNK_SIZE, progress: bool = True) -> dict:
    """Per byte: the fraction of x active in each layer (L, T) and the ``top`` strongest neurons of x and y,
    each ``[kind, layer, head, neuron, value]``."""
    data = as_bytes(text)
    fractions, per_byte = [], [[] for _ in range(len(data))]
    for start, acts in stream_activations(model, data, chunk_size, progress, desc="report"):
        fractions.append(np.stack([(a["x"] > 0).mean(axis=(0, 2)) for a in acts]))
        for kind in KINDS:
            values = np.stack([a[kind] for a in acts])  # (L, nh, T, N)
            L, nh, T, N = values.shape
            flat = values.transpose(2, 0, 1, 3).reshape(T, -1)
            best = np.argpartition(-flat, min(top, flat.shape[1] - 1), axis=1)[:, :top]
            for t, index in zip(*np.nonzero(np.take_along_axis(flat, best, 1) > 0), strict=False):
                layer, head, neuron = np.unravel_index(best[t, index], (L, nh, N))
                per_byte[start + t].append([kind, int(layer), int(head), int(neuron),
                                            round(float(flat[t, best[t, index]]), 4)])
    for entries in per_byte:
        entries.sort(key=lambda e: -e[4])
        del entries[top:]
    return {"x_fraction": np.concatenate(fractions, axis=1), "top": per_byte}


def text_spans(data: np.ndarray, level: np.ndarray) -> str:
    """The text as one <span> per character, keyed by its first byte, shaded by ``level`` (0..1) of that byte."""
    text = bytes(data).decode("utf-8", errors="replace")
    spans, offset = [], 0
    for char in text:
        width = max(1, len(char.encode("utf-8"))) if char != "\ufffd" else 1
        shown = "↵<br>" if char == "\n" else html.escape(char)
        alpha = float(level[min(offset, len(level) - 1)])
        spans.append(f'<span data-i="{offset}" style="background:rgba(255,120,0,{alpha:.2f})">{shown}</span>')
        offset += width
    return "".join(spans)


def atlas_notes(atlas, activity: dict) -> dict:
    """For each neuron shown at some byte, its two strongest contexts in the atlas's corpus."""
    if atlas is None:
        return {}
    notes = {}
    for entries in activity["top"]:
        for kind, layer, head, neuron, _ in entries:
            key = f"{kind}:{layer}:{head}:{neuron}"
            if key not in notes:
                notes[key] = [c["snippet"] for c in atlas.top_contexts(layer, head, neuron, kind)[:2]]
    return notes


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
#text {{ font-family: monospace; font-size: 14px; line-height: 1.6; white-space: pre-wrap; border: 1px solid #ccc;
  padding: 0.6em; max-height: 22em; overflow-y: auto; }}
#text span {{ cursor: pointer; }} #text span.sel {{ outline: 2px solid #06c; }}
#neurons {{ font-family: monospace; font-size: 13px; min-height: 6em; background: #f6f6f6; padding: 0.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ddd; padding: 2px 8px; }}
.note {{ color: #666; font-size: 12px; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">{summary}</p>
<h2>Text, coloured by the fraction of x neurons firing at each byte (mean over layers)</h2>
<div id="text">{spans}</div>
<p class="note">{scale}. Click a character to list the neurons that fire most there.</p>
<div id="neurons">(nothing selected)</div>
<h2>Sparsity per layer and head</h2>
<table><tr><th>layer</th><th>x active</th><th>y active</th><th>dead x</th><th>dead y</th></tr>{layer_rows}</table>
<p><img src="{sparsity_png}" alt="sparsity chart"></p>
{synapse_section}
{graph_section}
<script type="application/json" id="data">{data}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const box = document.getElementById("neurons");
const atlas = Object.keys(data.notes).length > 0;
function show(span) {{
  document.querySelectorAll("#text span.sel").forEach(s => s.classList.remove("sel"));
  span.classList.add("sel");
  const i = Number(span.dataset.i);
  const rows = (data.top[i] || []).map(([kind, layer, head, neuron, value]) => {{
    const key = kind + ":" + layer + ":" + head + ":" + neuron;
    const notes = (data.notes[key] || []).map(s => "<div class='note'>" + esc(s) + "</div>").join("");
    return "<tr><td>" + kind + "</td><td>" + layer + "</td><td>" + head + "</td><td>" + neuron + "</td><td>"
      + value.toFixed(3) + "</td>" + (atlas ? "<td>" + notes + "</td>" : "") + "</tr>";
  }});
  const head = "<tr><th>kind</th><th>layer</th><th>head</th><th>neuron</th><th>value</th>"
    + (atlas ? "<th>atlas: strongest contexts</th>" : "") + "</tr>";
  box.innerHTML = "byte " + i + " (" + esc(JSON.stringify(span.textContent)) + "): "
    + (rows.length ? "<table>" + head + rows.join("") + "</table>" : "no neuron fires");
}}
function esc(s) {{ const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }}
document.getElementById("text").addEventListener("click", e => {{ if (e.target.dataset.i) show(e.target); }});
const first = document.querySelector("#text span"); if (first) show(first);
</script>
</body></html>
"""


def build_report(model, text, title: str = "BDH: looking inside", stats: dict | None = None, atlas=None,
                 synapses=None, n_synapses: int = 5, graph_top_k: int | None = 16, max_bytes: int = 2000,
                 chunk_size: int = CHUNK_SIZE, progress: bool = True) -> str:
    """The report's HTML. Statistics cover the whole text; the coloured text, the clickable neurons and the
    synapses its first ``max_bytes`` bytes. ``synapses``: ``(layer, head, i, j)`` to track (default: the
    ``n_synapses`` strongest after the shown text). ``graph_top_k`` None: no graph section."""
    data = as_bytes(text)
    stats = stats if stats is not None else activation_stats(model, data, chunk_size, progress=progress)
    shown = data[:max_bytes]
    activity = byte_activity(model, shown, chunk_size=chunk_size, progress=progress)
    fraction = activity["x_fraction"].mean(axis=0)
    low, high = fraction.min(), fraction.max()
    level = 0.05 + 0.8 * (fraction - low) / max(high - low, 1e-9)  # the text's own range, for contrast

    c = model.config
    summary = (f"{len(data):,} bytes read ({len(shown):,} shown); n_layer {c.n_layer}, n_embd {c.n_embd}, "
               f"n_head {c.n_head}, N {c.n_neurons} neurons per head.")
    scale = f"palest: {low:.1%} of x firing, darkest: {high:.1%}"
    layer_rows = "".join(
        f"<tr><td>{i}</td><td>{e['x_active']:.2%}</td><td>{e['y_active']:.2%}</td><td>{len(e['x_dead'])}</td>"
        f"<td>{len(e['y_dead'])}</td></tr>" for i, e in enumerate(stats["layers"]))

    synapse_section = ""
    if c.n_layer > 1:
        if synapses is None:
            sigma = synapse_state(model, shown, chunk_size=chunk_size, progress=progress)
            synapses = [s[:4] for s in strongest_synapses(sigma, n_synapses)]
        if synapses:
            series = synapse_series(model, shown, synapses, chunk_size, progress)
            labels = [f"layer {layer} head {h}: y{i} -> x{j}" for layer, h, i, j in synapses]
            uri = png_data_uri(plot_synapse_series(series, labels, bytes(shown)))
            synapse_section = (f"<h2>Synapses sigma(i, j) = sum of y[i] (layer l - 1) x[j] (layer l) so far</h2>"
                               f"<p><img src=\"{uri}\" alt=\"synapse series\"></p>")
    graph_section = ""
    if graph_top_k is not None:
        summaries = graph_summary(model, "x", top_k=graph_top_k)
        rows = "".join(
            f"<tr><td>{s['head']}</td><td>{s['edges']:,}</td><td>{s['mean_degree']:.1f}</td><td>{s['max_degree']}</td>"
            f"<td>{s['power_law']['alpha'] if s['power_law'] else float('nan'):.2f}</td>"
            f"<td>{s['modularity'] if s['modularity'] is not None else float('nan'):.3f}</td>"
            f"<td>{s['n_communities']}</td></tr>" for s in summaries)
        graph_section = (f"<h2>Neuron graph G_x = D_x E per head (top {graph_top_k} per row)</h2><table><tr><th>head"
                         "</th><th>edges</th><th>mean degree</th><th>max degree</th><th>power-law alpha</th>"
                         f"<th>modularity</th><th>communities</th></tr>{rows}</table>"
                         f"<p><img src=\"{png_data_uri(plot_degrees(summaries))}\" alt=\"degree distribution\"></p>")
    payload = json.dumps({"top": activity["top"], "notes": atlas_notes(atlas, activity)}).replace("</", "<\\/")
    return PAGE.format(title=html.escape(title), summary=html.escape(summary), scale=scale,
                       spans=text_spans(shown, level),
                       layer_rows=layer_rows, sparsity_png=png_data_uri(plot_sparsity(stats)),
                       synapse_section=synapse_section, graph_section=graph_section, data=payload)


def write_report(path, model, text, **options) -> str:
    """Write ``build_report``'s HTML to ``path`` atomically; returns the HTML."""
    page = build_report(model, text, **options)
    atomic_write_text(path, page)
    return page
