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
from .stats import ALWAYS_ON, Moments, activation_stats, silent_meaning
from .synapses import changing_synapses, synapse_series


def byte_activity(model, text, moments: Moments, top: int = 8, chunk_size: int = CHUNK_SIZE,
                  progress: bool = True) -> dict:
    """Per byte: the fraction of x active in each layer (L, T) and the ``top`` neurons of x and y that fire most
    above their usual, each ``[kind, layer, head, neuron, value, z, rate]``.

    z = (value - the neuron's mean) / its standard deviation, both over the bytes ``moments`` read; only neurons
    firing at the byte and not always on (firing rate < ``ALWAYS_ON``) are ranked.
    """
    data = as_bytes(text)
    fractions, per_byte = [], [[] for _ in range(len(data))]
    reference = {k: (moments.mean(k), moments.std(k), moments.rate(k)) for k in KINDS}
    for start, acts in stream_activations(model, data, chunk_size, progress, desc="report"):
        fractions.append(np.stack([(a["x"] > 0).mean(axis=(0, 2)) for a in acts]))
        for kind in KINDS:
            mean, std, rate = reference[kind]
            values = np.stack([a[kind] for a in acts])  # (L, nh, T, N)
            L, nh, T, N = values.shape
            z = (values - mean[:, :, None]) / np.where(std > 0, std, np.inf)[:, :, None]
            ranked = (values > 0) & (rate < ALWAYS_ON)[:, :, None]
            flat = np.where(ranked, z, -np.inf).transpose(2, 0, 1, 3).reshape(T, -1)
            best = np.argpartition(-flat, min(top, flat.shape[1] - 1), axis=1)[:, :top]
            for t, index in zip(*np.nonzero(np.isfinite(np.take_along_axis(flat, best, 1))), strict=False):
                at = np.unravel_index(best[t, index], (L, nh, N))
                per_byte[start + t].append([kind, *map(int, at), round(float(values[at[0], at[1], t, at[2]]), 4),
                                            round(float(flat[t, best[t, index]]), 2), round(float(rate[at]), 4)])
    for entries in per_byte:
        entries.sort(key=lambda e: -e[5])
        del entries[top:]
    return {"x_fraction": np.concatenate(fractions, axis=1), "top": per_byte}


def always_on_rows(stats: dict, show: int = 12) -> str:
    """Table rows: per layer and kind, how many neurons are always on, and the first ``show`` of them."""
    rows = []
    for layer, entry in enumerate(stats["layers"]):
        for kind in KINDS:
            on = entry[f"{kind}_always_on"]
            listed = ", ".join(f"h{h}:{n}" for h, n in on[:show]) + (" ..." if len(on) > show else "")
            rows.append(f"<tr><td>{layer}</td><td>{kind}</td><td>{len(on)}</td><td>{listed}</td></tr>")
    return "".join(rows)


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
        for kind, layer, head, neuron in (entry[:4] for entry in entries):
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
.note {{ color: #666; font-size: 12px; }} .warn {{ color: #a40; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">{summary}</p>
<h2>Text, coloured by the fraction of x neurons firing at each byte (mean over layers)</h2>
<div id="text">{spans}</div>
<p class="note">{scale}. Click a character to list the neurons that fire there most above their usual: ranked by
z = (activation - the neuron's mean) / its standard deviation, both over the {n_bytes:,} bytes read; always-on
neurons (firing on at least {always_on:.0%} of those bytes) are left out and listed below.</p>
<div id="neurons">(nothing selected)</div>
<h2>Sparsity per layer (over {n_bytes:,} bytes)</h2>
<table><tr><th>layer</th><th>x active</th><th>y active</th><th>x silent</th><th>y silent</th></tr>{layer_rows}</table>
<p class="note">Silent: {silent_note}.</p>
<p><img src="{sparsity_png}" alt="sparsity chart"></p>
<h2>Always-on neurons (firing on at least {always_on:.0%} of {n_bytes:,} bytes)</h2>
<table><tr><th>layer</th><th>kind</th><th>count</th><th>head:neuron</th></tr>{always_on_rows}</table>
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
  const rows = (data.top[i] || []).map(([kind, layer, head, neuron, value, z, rate]) => {{
    const key = kind + ":" + layer + ":" + head + ":" + neuron;
    const notes = (data.notes[key] || []).map(s => "<div class='note'>" + esc(s) + "</div>").join("");
    return "<tr><td>" + kind + "</td><td>" + layer + "</td><td>" + head + "</td><td>" + neuron + "</td><td>"
      + value.toFixed(3) + "</td><td>" + z.toFixed(1) + "</td><td>" + (100 * rate).toFixed(1) + "%</td>"
      + (atlas ? "<td>" + notes + "</td>" : "") + "</tr>";
  }});
  const head = "<tr><th>kind</th><th>layer</th><th>head</th><th>neuron</th><th>value</th><th>z</th>"
    + "<th>fires on</th>" + (atlas ? "<th>atlas: strongest contexts</th>" : "") + "</tr>";
  box.innerHTML = "byte " + i + " (" + esc(JSON.stringify(span.textContent)) + "): "
    + (rows.length ? "<table>" + head + rows.join("") + "</table>" : "no neuron that is not always on fires");
}}
function esc(s) {{ const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }}
document.getElementById("text").addEventListener("click", e => {{ if (e.target.dataset.i) show(e.target); }});
const first = document.querySelector("#text span"); if (first) show(first);
</script>
</body></html>
"""


def synapse_section(model, shown, synapses, n_synapses: int, chunk_size: int, progress: bool) -> str:
    """The tracked synapses along the shown text (default: ``changing_synapses``, the least steady growth)."""
    if model.config.n_layer < 2:
        return ""
    how = "chosen by hand"
    if synapses is None:
        found = changing_synapses(model, shown, n_synapses, chunk_size=chunk_size, progress=progress)
        synapses = [s[:4] for s in found]
        how = (f"the {len(found)} whose growth varies most along these {len(shown):,} bytes (coefficient of "
               "variation of the per-byte increments, among synapses that grew at 1% of the bytes or more); "
               "straight lines are always-on pairs, steps mark the characters a synapse responds to")
    if not synapses:
        return "<h2>Synapses</h2><p class='note'>No synapse grew often enough along this text to rank.</p>"
    series = synapse_series(model, shown, synapses, chunk_size, progress)
    labels = [f"layer {layer} head {h}: y{i} -> x{j}" for layer, h, i, j in synapses]
    uri = png_data_uri(plot_synapse_series(series, labels, bytes(shown)))
    return (f"<h2>Synapses sigma(i, j) = sum of y[i] (layer l - 1) x[j] (layer l) so far</h2>"
            f"<p class='note'>Synapses: {html.escape(how)}.</p><p><img src=\"{uri}\" alt=\"synapse series\"></p>")


def fit_cell(fit: dict) -> str:
    if fit["alpha"] is None:
        return f"<span class='warn'>no estimate: {html.escape(fit['note'])}</span>"
    compare = "; ".join(f"vs {alt} R {c['R']:+.1f} (p {c['p']:.2g})" for alt, c in fit["compare"].items())
    return f"{fit['alpha']:.2f} (d &ge; {fit['d_min']}, {fit['n_tail']} of {fit['n']} neurons); {compare}"


def graph_rows(summary: dict) -> str:
    rows = []
    for name, s in (("trained", summary), ("at initialization", summary.get("init")),
                    ("degree-preserving shuffle", summary.get("shuffle"))):
        if s is None:
            continue
        q = "n/a" if s["modularity"] is None else f"{s['modularity']:.3f}"
        rows.append(f"<tr><td>{summary['head']}</td><td>{name}</td><td>{s['edges']:,}</td>"
                    f"<td>{s['mean_degree']:.1f}</td><td>{s['max_degree']}</td><td>{q} ({s['n_communities']})</td>"
                    f"<td>{fit_cell(s['power_law'])}</td></tr>")
    return "".join(rows)


def graph_section(summaries: list) -> str:
    """G_x per head beside its baselines: edges, degrees, modularity, the power-law fit and its comparisons."""
    rows = "".join(graph_rows(s) for s in summaries)
    kept = html.escape(summaries[0]["sparsified"])
    return (f"<h2>Neuron graph G_x = D_x E per head</h2><p class='note'>Kept: {kept}."
            " Modularity: Louvain (networkx), edges unweighted so that the shuffle compares like with like. Power law:"
            " the powerlaw package; R &gt; 0 favours the power law over the alternative, p its significance.</p>"
            "<table><tr><th>head</th><th>graph</th><th>edges</th><th>mean degree</th><th>max degree</th>"
            f"<th>modularity (communities)</th><th>power-law alpha</th></tr>{rows}</table>"
            f"<p><img src=\"{png_data_uri(plot_degrees(summaries))}\" alt=\"degree distribution\"></p>")


def build_report(model, text, title: str = "BDH: looking inside", stats: dict | None = None,
                 moments: Moments | None = None, atlas=None,
                 synapses=None, n_synapses: int = 5, graph_edges: int | None = 16, init_model=None,
                 max_bytes: int = 2000, chunk_size: int = CHUNK_SIZE, progress: bool = True) -> str:
    """The report's HTML. Statistics (``stats`` and ``moments`` from ``activation_stats``, computed if not both
    given; the per-neuron means the z-scores use) cover the whole text; the coloured
    text, the clickable neurons and the synapses its first ``max_bytes`` bytes. ``synapses``: ``(layer, head, i,
    j)`` to track (default: ``changing_synapses``). ``graph_edges``: edges kept per neuron on average in G_x (None:
    no graph section); ``init_model``: the same configuration untrained, for the graph baselines."""
    data = as_bytes(text)
    if stats is None or moments is None:
        moments = Moments(model.config)
        stats = activation_stats(model, data, chunk_size, progress=progress, moments=moments)
    shown = data[:max_bytes]
    activity = byte_activity(model, shown, moments, chunk_size=chunk_size, progress=progress)
    fraction = activity["x_fraction"].mean(axis=0)
    low, high = fraction.min(), fraction.max()
    level = 0.05 + 0.8 * (fraction - low) / max(high - low, 1e-9)  # the text's own range, for contrast
    c = model.config
    summary = (f"{len(data):,} bytes read ({len(shown):,} shown); n_layer {c.n_layer}, n_embd {c.n_embd}, "
               f"n_head {c.n_head}, N {c.n_neurons} neurons per head.")
    layer_rows = "".join(
        f"<tr><td>{i}</td><td>{e['x_active']:.2%}</td><td>{e['y_active']:.2%}</td><td>{len(e['x_silent'])}</td>"
        f"<td>{len(e['y_silent'])}</td></tr>" for i, e in enumerate(stats["layers"]))
    graphs = "" if graph_edges is None else graph_section(
        graph_summary(model, "x", edges=graph_edges * c.n_neurons, init_model=init_model))
    payload = json.dumps({"top": activity["top"], "notes": atlas_notes(atlas, activity)}).replace("</", "<\\/")
    return PAGE.format(title=html.escape(title), summary=html.escape(summary), n_bytes=len(data),
                       always_on=stats["always_on_threshold"], spans=text_spans(shown, level),
                       scale=f"palest: {low:.1%} of x firing, darkest: {high:.1%}", layer_rows=layer_rows,
                       silent_note=html.escape(silent_meaning(len(data))),
                       sparsity_png=png_data_uri(plot_sparsity(stats)), always_on_rows=always_on_rows(stats),
                       synapse_section=synapse_section(model, shown, synapses, n_synapses, chunk_size, progress),
                       graph_section=graphs, data=payload)


def write_report(path, model, text, **options) -> str:
    """Write ``build_report``'s HTML to ``path`` atomically; returns the HTML."""
    page = build_report(model, text, **options)
    atomic_write_text(path, page)
    return page
