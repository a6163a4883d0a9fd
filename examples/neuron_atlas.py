"""Build a neuron atlas of a corpus, then ask it questions.

    python examples/neuron_atlas.py --checkpoint checkpoints_mlx/small-pydoc/best.npz --out /tmp/bdh_atlas

Reads the first --max-bytes of the built-in corpus (or --data FILE), keeps each neuron's top contexts,
then prints the neurons whose top contexts mention --search, and the contexts of the first one.
"""

import argparse
from pathlib import Path

import bdh_mlx
from bdh_mlx.interpret import Atlas, build_atlas
from bdh_mlx.training.data import default_corpus_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", type=Path, help="a text file (default: the built-in corpus)")
    parser.add_argument("--max-bytes", type=int, default=50_000)
    parser.add_argument("--search", default="class")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_atlas"), help="atlas folder")
    args = parser.parse_args()

    data = (args.data.read_bytes() if args.data else default_corpus_bytes())[: args.max_bytes]
    build_atlas(bdh_mlx.load(args.checkpoint), data, source=str(args.data or "built-in corpus")).save(args.out)
    atlas = Atlas.load(args.out)
    hits = atlas.search(args.search)
    print(f"{len(hits)} neurons have {args.search!r} in their top contexts; the first few:")
    for hit in hits[:5]:
        print(f"  {hit}")
    if hits:
        h = hits[0]
        for context in atlas.top_contexts(h["layer"], h["head"], h["neuron"], h["kind"]):
            print(f"  {context['value']:.3f}  {context['snippet']!r}")
    print(f"wrote {args.out}/atlas.npz and atlas.json")


if __name__ == "__main__":
    main()
