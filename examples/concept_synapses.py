"""The monosemantic-synapse experiment: synapses that grow on a concept (here: currencies), scored on held-out texts.

    python examples/concept_synapses.py --checkpoint checkpoints_mlx/small-pydoc/best.npz --out /tmp/bdh_synapses

Prints the top synapses with their held-out selectivity (AUC: 1 = always stronger on the concept, with its 95%
bootstrap interval: 3 against 3 held-out sentences here, far too few, and it says so) and the bytes that make them
grow; plots the best one along a held-out concept text. examples/looking_inside.py does this on 40 against 40.
"""

import argparse
from pathlib import Path

import bdh_mlx
from bdh_mlx.interpret import concept_synapses, synapse_series
from bdh_mlx.interpret.cmd_synapses import describe_concept_synapse
from bdh_mlx.interpret.plots import plot_synapse_series, save_png

CONCEPT = ["The price is 20 dollars or 18 euros.", "She paid in yen, then changed the rest to pounds.",
           "A euro buys a little more than a dollar.", "The bank exchanged francs for dollars.",
           "Prices in the shop were listed in euros and pounds.", "He saved a hundred dollars a month.",
           "The loan was repaid in yen.", "Tourists carried dollars, euros and pounds."]
OTHER = ["The cat slept on the warm windowsill.", "Rain fell all afternoon over the hills.",
         "The function returns a list of names.", "She opened the door and walked in.",
         "The river runs north to the sea.", "A loop reads the file line by line.",
         "Birds sang in the old oak tree.", "The train left the station at noon."]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_synapses"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = bdh_mlx.load(args.checkpoint)
    found = concept_synapses(model, CONCEPT[:5], OTHER[:5], CONCEPT[5:], OTHER[5:], top=args.top, progress=False)
    for s in found:
        print(describe_concept_synapse(s))
    text = CONCEPT[5] + " " + OTHER[5]
    series = synapse_series(model, text, [tuple(s[k] for k in ("layer", "head", "i", "j")) for s in found[:3]],
                            progress=False)
    labels = [f"layer {s['layer']} head {s['head']}: y{s['i']} -> x{s['j']}" for s in found[:3]]
    save_png(plot_synapse_series(series, labels, text.encode()), args.out / "concept_synapses.png")
    print(f"wrote {args.out}/concept_synapses.png")


if __name__ == "__main__":
    main()
