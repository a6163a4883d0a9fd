"""``bdh-mlx synapses``: track synapses along a text, or find the synapses of a concept.

    bdh-mlx synapses --checkpoint CKPT --text "..." [--track L:H:I:J ...] --plot series.png [--json out.json]
    bdh-mlx synapses --checkpoint CKPT --concept currency.txt --other plain.txt [--top 10] [--json out.json]

``--concept`` and ``--other``: files of texts separated by blank lines; the last third of each is held out to
score how selective each synapse is.
"""

import json
import re
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, positive_int, run_command
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_write_text

from .common import InterpretError, add_common_options, add_text_arguments, read_text, synapse_address
from .plots import plot_synapse_series, save_png
from .synapses import concept_synapses, strongest_synapses, synapse_series, synapse_state

PROG = "bdh-mlx synapses"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Track synapses along a text, or find a concept's synapses.")
    add_common_options(parser)
    add_text_arguments(parser, required=False)
    parser.add_argument("--track", type=synapse_address, action="append", metavar="L:H:I:J",
                        help="a synapse to track (repeatable; default: the --top strongest after the text)")
    parser.add_argument("--plot", metavar="PNG", help="draw the tracked synapses' strength along the text")
    parser.add_argument("--concept", type=Path, metavar="FILE", help="texts about a concept, blank-line separated")
    parser.add_argument("--other", type=Path, metavar="FILE", help="texts without it, blank-line separated")
    parser.add_argument("--top", type=positive_int, default=5, help="synapses to report")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    return parser


def read_texts(path: Path) -> list:
    """Blank-line separated texts of a file; at least two (one to rank with, one held out)."""
    texts = [t.strip() for t in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if t.strip()]
    if len(texts) < 2:
        raise InterpretError(f"{path}: needs at least two blank-line separated texts, found {len(texts)}")
    return texts


def held_out_split(texts: list) -> tuple:
    n_held = max(1, len(texts) // 3)
    return texts[:-n_held], texts[-n_held:]


def run(args):
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    progress = not args.no_progress
    if args.concept or args.other:
        if not (args.concept and args.other):
            raise InterpretError("--concept and --other go together")
        (concept, held_concept), (other, held_other) = (held_out_split(read_texts(p)) for p in (args.concept,
                                                                                                 args.other))
        results = concept_synapses(model, concept, other, held_concept, held_other, args.top,
                                   chunk_size=args.chunk_size, progress=progress)
        for r in results:
            print(f"layer {r['layer']} head {r['head']} y{r['i']} -> x{r['j']}: score {r['score']:.2f}, "
                  f"held-out selectivity {r['selectivity']:.2f} | {r['contexts'][0] if r['contexts'] else ''!r}")
    else:
        if args.text is None and args.file is None:
            raise InterpretError("give --text or --file (tracking), or --concept and --other")
        data = read_text(args)
        synapses = args.track or [s[:4] for s in strongest_synapses(
            synapse_state(model, data, chunk_size=args.chunk_size, progress=progress), args.top)]
        series = synapse_series(model, data, synapses, args.chunk_size, progress)
        results = [{"layer": s[0], "head": s[1], "i": s[2], "j": s[3], "final": float(v[-1]), "series": v.tolist()}
                   for s, v in zip(synapses, series, strict=False)]
        for r in results:
            print(f"layer {r['layer']} head {r['head']} y{r['i']} -> x{r['j']}: {r['final']:.4f} after the text")
        if args.plot:
            labels = [f"layer {r['layer']} head {r['head']}: y{r['i']} -> x{r['j']}" for r in results]
            save_png(plot_synapse_series(series, labels, bytes(data)), args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
