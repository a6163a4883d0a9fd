"""The README's "Looking inside" pictures and numbers, re-made from the committed model with one command.

    python examples/looking_inside.py            # writes docs/images/*.png, report.html and looking-inside.json

Uses examples/models/concepts-small.npz (8-bit; the `small` preset trained on examples/concept_corpus.py's corpus), its
metrics.jsonl and held_out.json. Makes: the fraction of x and y non-zero per layer against training steps; G_x's
degrees and modularity beside the model at initialization and a degree-preserving shuffle; the currency synapses
with their held-out selectivity (AUC, 95% bootstrap interval); the HTML report of held-out text and, where Chromium
is installed, its screenshot.
"""

import argparse
import json
import random
from pathlib import Path

import concept_corpus  # beside this script
import numpy as np

import bdh_mlx  # noqa: F401  (first: the fast BLAS before mlx.core)
from bdh_mlx.interpret import concept_synapses, graph_summary, synapse_series, write_report
from bdh_mlx.interpret.browser import chromium, screenshot
from bdh_mlx.interpret.graphs import initial_model
from bdh_mlx.interpret.plots import plot_degrees, plot_sparsity_over_training, plot_synapse_series, save_png
from bdh_mlx.interpret.synapses import held_out_scores
from bdh_mlx.storage.checkpoint import load_float
from bdh_mlx.training.evaluate import activation_sparsity

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"


def training_texts(topic: str, n: int, seed: int) -> list:
    """``n`` sentences of ``topic`` from the training templates (what the synapses are ranked on)."""
    rng = random.Random(seed)
    return [concept_corpus.sentence(rng.choice(concept_corpus.TEMPLATES[topic]), rng) for _ in range(n)]


def sparsity_curve(model, corpus: bytes, metrics: Path, out: Path) -> dict:
    """x and y non-zero per layer at each evaluation of the run, with step 0 measured on the initial model."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tail = np.frombuffer(corpus[int(0.9 * len(corpus)) :], np.uint8)
    starts = np.linspace(0, len(tail) - 258, 8).astype(int)
    batch = np.stack([tail[s : s + 257] for s in starts])
    x, y = activation_sparsity(initial_model(model.config), batch)
    save_png(plot_sparsity_over_training(records, {"sparsity_x": x, "sparsity_y": y}), out / "sparsity-training.png")
    evals = [r for r in records if "sparsity_x" in r]
    return {"init": {"x": x, "y": y}, "final": {"step": evals[-1]["step"], "x": evals[-1]["sparsity_x"],
                                                "y": evals[-1]["sparsity_y"], "val_bpb": evals[-1]["val_bpb"]}}


def graphs(model, out: Path) -> list:
    summaries = graph_summary(model, "x", init_model=initial_model(model.config))
    save_png(plot_degrees(summaries), out / "degrees.png")
    strip = lambda s: {k: v for k, v in s.items() if k != "degrees"}  # noqa: E731
    return [{**strip(s), "init": strip(s["init"]), "shuffle": strip(s["shuffle"])} for s in summaries]


def currency_synapses(model, held_out: dict, out: Path, top: int) -> list:
    """Rank on training-template sentences, score on held-out ones (new templates; and new currency names)."""
    others = ["country", "weather", "animal"]
    concept = training_texts("currency", 30, 1)
    other = [t for i, topic in enumerate(others) for t in training_texts(topic, 10, 2 + i)]
    held_other = [t for topic in others for t in held_out[topic][:14]][:40]
    found = concept_synapses(model, concept, other, held_out["currency"], held_other, top=top, progress=False)
    synapses = [tuple(s[k] for k in ("layer", "head", "i", "j")) for s in found]
    for s, renamed in zip(found, held_out_scores(model, synapses, held_out["currency_new_names"], held_other),
                          strict=True):
        s["new_names"] = {k: renamed[k] for k in ("selectivity", "selectivity_ci", "n_held_out_concept")}
    text = " ".join(held_out["weather"][:2] + held_out["currency"][:2] + held_out["animal"][:2]
                    + held_out["currency"][2:4])
    best = synapses[:3]
    labels = [f"layer {s['layer']} head {s['head']}: y{s['i']} -> x{s['j']} (AUC {s['selectivity']:.2f})"
              for s in found[:3]]
    save_png(plot_synapse_series(synapse_series(model, text, best, progress=False), labels, text.encode()),
             out / "concept-synapses.png")
    return found


def report(model, checkpoint: Path, held_out: dict, out: Path):
    topics = ("currency", "country", "weather", "animal")
    text = "\n\n".join(" ".join(held_out[topic][i] for i in range(start, start + 3)) for start in range(0, 12, 3)
                       for topic in topics)
    write_report(out / "report.html", model, text, title=f"BDH: looking inside {checkpoint.name}", progress=False,
                 init_model=initial_model(model.config))
    if chromium() is not None:
        screenshot(out / "report.html", out / "looking-inside.png", size="1150,1500")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=MODELS / "concepts-small.npz")
    parser.add_argument("--metrics", type=Path, default=MODELS / "concepts-small.metrics.jsonl")
    parser.add_argument("--held-out", type=Path, default=MODELS / "held_out.json")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "images")
    parser.add_argument("--top", type=int, default=5, help="currency synapses to report")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_float(args.checkpoint)  # the committed model is 8-bit: its weights dequantized
    held_out = json.loads(args.held_out.read_text())
    corpus = concept_corpus.make_corpus()[0].encode()  # the training text: its last 10% is the validation split
    results = {"checkpoint": args.checkpoint.name, "sparsity": sparsity_curve(model, corpus, args.metrics, args.out),
               "graphs": graphs(model, args.out), "currency_synapses": currency_synapses(model, held_out, args.out,
                                                                                         args.top)}
    (args.out / "looking-inside.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    report(model, args.checkpoint, held_out, args.out)
    print(f"wrote {args.out}/: sparsity-training.png, degrees.png, concept-synapses.png, report.html, "
          f"looking-inside.json" + (", looking-inside.png" if chromium() else " (no chromium: no screenshot)"))


if __name__ == "__main__":
    main()
