"""``bdh-mlx inspect``: activation statistics (JSON) and an HTML report of a text read by a checkpoint.

    bdh-mlx inspect --checkpoint CKPT --text "..." [--file PATH] --json stats.json --out report.html
"""

import json

from bdh_mlx.arguments import ArgumentParser, non_negative_int, positive_int, run_command
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_write_text

from .atlas import Atlas
from .common import add_common_options, add_text_arguments, read_text, synapse_address
from .report import write_report
from .stats import activation_stats
from .synapses import check_synapses

PROG = "bdh-mlx inspect"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Activation statistics and an HTML report of a text.")
    add_common_options(parser)
    add_text_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="write the activation statistics here")
    parser.add_argument("--out", metavar="PATH", help="write the HTML report here")
    parser.add_argument("--atlas", metavar="DIR", help="a neuron atlas (bdh-mlx neurons) to annotate the report")
    parser.add_argument("--synapse", type=synapse_address, action="append", metavar="L:H:I:J",
                        help="a synapse to track in the report (repeatable; default: the strongest ones)")
    parser.add_argument("--graph-top-k", type=non_negative_int, default=16,
                        help="edges kept per neuron in the report's graphs; 0: no graph section")
    parser.add_argument("--max-report-bytes", type=positive_int, default=2000,
                        help="bytes of the text shown in the report (statistics cover all of it)")
    return parser


def run(args):
    data = read_text(args)
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    if args.synapse:
        check_synapses(model.config, args.synapse)
    atlas = Atlas.load(args.atlas) if args.atlas else None
    progress = not args.no_progress
    stats = activation_stats(model, data, args.chunk_size, progress=progress)
    for i, layer in enumerate(stats["layers"]):
        print(f"layer {i}: x active {layer['x_active']:.2%}, y active {layer['y_active']:.2%}, "
              f"dead x {len(layer['x_dead'])}, dead y {len(layer['y_dead'])}")
    if args.json:
        atomic_write_text(args.json, json.dumps(stats, indent=1))
        print(f"wrote {args.json}")
    if args.out:
        write_report(args.out, model, data, stats=stats, atlas=atlas, synapses=args.synapse,
                     graph_top_k=args.graph_top_k or None, max_bytes=args.max_report_bytes,
                     chunk_size=args.chunk_size, progress=progress, title=f"BDH: looking inside {args.checkpoint}")
        print(f"wrote {args.out}")
    return stats


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
