"""``bdh-mlx synapses``: track synapses along a text, or find the synapses of a concept.

    bdh-mlx synapses --checkpoint CKPT [--text "..." | --file PATH] [--track L:H:I:J ...] --plot series.png
    bdh-mlx synapses --checkpoint CKPT --concept currency.txt --other plain.txt [--top 10] [--json out.json]

Tracking without ``--track`` follows the synapses whose growth varies most along the text (default text: the first
50,000 bytes of the built-in corpus). ``--concept`` and ``--other``: files of texts separated by blank lines; the
last third of each is held out to score how selective each synapse is (AUC with a 95% bootstrap interval).
"""

import json
import re
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, positive_int, run_command
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_write_text

from .common import InterpretError, add_common_options, add_text_arguments, read_text, require, synapse_address

PROG = "bdh-mlx synapses"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Track synapses along a text, or find a concept's synapses.")
    add_common_options(parser)
    add_text_arguments(parser)
    parser.add_argument("--track", type=synapse_address, action="append", metavar="L:H:I:J",
                        help="a synapse to track (repeatable; default: the --top whose growth varies most)")
    parser.add_argument("--min-steps", type=positive_int,
                        help="rank only synapses that grew at this many bytes (default: 1%% of the bytes, >= 3)")
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


def describe_concept_synapse(r: dict) -> str:
    low, high = r["selectivity_ci"]
    line = (f"layer {r['layer']} head {r['head']} y{r['i']} -> x{r['j']}: score {r['score']:.2f}, held-out "
            f"selectivity (AUC) {r['selectivity']:.2f}, 95% interval [{low:.2f}, {high:.2f}], "
            f"{r['n_held_out_concept']} vs {r['n_held_out_other']} texts | "
            f"{r['contexts'][0] if r['contexts'] else ''!r}")
    return line + (f"\n  warning: {r['warning']}" if r["warning"] else "")


def concept_run(model, args, progress: bool) -> list:
    from .synapses import concept_synapses

    if not (args.concept and args.other):
        raise InterpretError("--concept and --other go together")
    (concept, held_concept), (other, held_other) = (held_out_split(read_texts(p)) for p in (args.concept, args.other))
    results = concept_synapses(model, concept, other, held_concept, held_other, args.top,
                               chunk_size=args.chunk_size, progress=progress)
    for r in results:
        print(describe_concept_synapse(r))
    return results


def tracking_run(model, args, progress: bool) -> list:
    from .synapses import changing_synapses, synapse_series

    data, source = read_text(args)
    synapses = args.track or [s[:4] for s in changing_synapses(model, data, args.top, args.min_steps,
                                                               chunk_size=args.chunk_size, progress=progress)]
    if not synapses:
        raise InterpretError(f"no synapse grew at enough bytes of {source} to rank; give --track or --min-steps")
    series = synapse_series(model, data, synapses, args.chunk_size, progress)
    results = [{"layer": s[0], "head": s[1], "i": s[2], "j": s[3], "final": float(v[-1]), "series": v.tolist()}
               for s, v in zip(synapses, series, strict=False)]
    print(f"{len(data):,} bytes of {source}")
    for r in results:
        print(f"layer {r['layer']} head {r['head']} y{r['i']} -> x{r['j']}: {r['final']:.4f} after the text")
    if args.plot:
        from .plots import plot_synapse_series, save_png

        labels = [f"layer {r['layer']} head {r['head']}: y{r['i']} -> x{r['j']}" for r in results]
        save_png(plot_synapse_series(series, labels, bytes(data)), args.plot)
        print(f"wrote {args.plot}")
    return results


def run(args):
    require("scipy", *(["matplotlib"] if args.plot else []))
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    progress = not args.no_progress
    concept = args.concept or args.other
    if concept and (args.text is not None or args.file is not None or args.track):
        raise InterpretError("--concept/--other find synapses; --text, --file and --track track them: not both")
    results = concept_run(model, args, progress) if concept else tracking_run(model, args, progress)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
