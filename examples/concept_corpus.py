"""A small English corpus with clear concepts (currencies, countries, numbers, weather, animals), made offline.

    python examples/concept_corpus.py --out checkpoints_mlx/concept_corpus   # train.txt (1.4 MB), held_out.json

Why: the paper's concept synapses (a "currency" synapse, a "country" synapse) need a corpus that talks about
currencies and countries often, and an hour of CPU training needs a corpus a small model can learn. The sentences
come from templates with many slot fillers; each concept has its own templates. ``held_out.json`` holds sentences
made from templates that never appear in train.txt (``currency``, ...) and, harder, with currency and country names
that never appear either (``currency_new_names``, ...), so selectivity measured on them is held out.
"""

import argparse
import json
import random
from pathlib import Path

CURRENCIES = ["dollars", "euros", "pounds", "yen", "francs", "rupees", "pesos", "kronor", "yuan", "rubles",
              "dinars", "shekels"]
HELD_OUT_CURRENCIES = ["lira", "zloty", "forints", "rand"]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Germany", "India", "Mexico", "Sweden", "China", "Egypt",
             "Spain", "Italy", "Kenya", "Norway", "Chile", "Peru"]
HELD_OUT_COUNTRIES = ["Poland", "Hungary", "Ghana", "Vietnam"]
PEOPLE = ["Anna", "Tom", "the farmer", "my uncle", "the teacher", "a tourist", "the old man", "Maria", "the girl",
          "our neighbour", "the clerk", "Paul"]
ANIMALS = ["cat", "dog", "horse", "fox", "hawk", "rabbit", "goat", "crow", "mouse", "duck"]
PLACES = ["garden", "kitchen", "field", "barn", "forest", "yard", "hill", "river bank", "meadow", "porch"]
WEATHER = ["rain", "snow", "fog", "wind", "sunshine", "thunder", "hail", "frost"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "on Monday", "all week", "yesterday",
         "last winter"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty"]

TEMPLATES = {
    "currency": ["{p} paid {n} {c} for the ticket.", "The price was {n} {c}, which {p} thought was fair.",
                 "{p} changed a hundred {c} into {c2} at the bank.", "The shop only took {c}, not {c2}.",
                 "A coffee costs about {n} {c} here.", "{p} saved {n} {c} every month.",
                 "The loan was repaid in {c}.", "Prices were listed in {c} and in {c2}."],
    "country": ["{p} travelled to {k} {t}.", "{k} shares a border with {k2}.", "The capital of {k} is a big city.",
                "{p} was born in {k} and grew up in {k2}.", "Trade between {k} and {k2} grew last year.",
                "The team from {k} played against {k2}.", "{p} wrote a book about the history of {k}."],
    "weather": ["There was {w} {t}.", "{p} stayed inside because of the {w}.", "The {w} lasted until {t2}.",
                "After the {w}, the {l} was quiet.", "{p} watched the {w} from the window."],
    "animal": ["The {a} slept in the {l}.", "{p} fed the {a} {t}.", "A {a} ran across the {l}.",
               "The {a} and the {a2} played in the {l}.", "{p} heard a {a} {t}."],
}
HELD_OUT_TEMPLATES = {
    "currency": ["Her wallet held {n} {c} and a few coins.", "The rent went up by {n} {c}.",
                 "{p} sent {n} {c} to a friend abroad.", "How many {c} is that in {c2}?"],
    "country": ["The flag of {k} flew over the harbour.", "{p} learned the language of {k}.",
                "Many people moved from {k} to {k2}.", "The mountains of {k} are famous."],
    "weather": ["The {w} kept the roads empty {t}.", "Nobody expected {w} so early."],
    "animal": ["The {a} hid under the bench.", "{p} drew a picture of a {a}."],
}


def sentence(template: str, rng: random.Random, new_names: bool = False) -> str:
    """One template filled with random slot values (currencies and countries never trained on if ``new_names``)."""
    currencies = HELD_OUT_CURRENCIES if new_names else CURRENCIES
    countries = HELD_OUT_COUNTRIES if new_names else COUNTRIES
    c, c2 = rng.sample(currencies, 2)
    k, k2 = rng.sample(countries, 2)
    a, a2 = rng.sample(ANIMALS, 2)
    t, t2 = rng.sample(TIMES, 2)
    text = template.format(p=rng.choice(PEOPLE), n=rng.choice(NUMBER_WORDS + [str(rng.randint(2, 999))]),
                           c=c, c2=c2, k=k, k2=k2, w=rng.choice(WEATHER), l=rng.choice(PLACES), a=a, a2=a2,
                           t=t, t2=t2)
    return text[0].upper() + text[1:]


def paragraph(rng: random.Random, topic: str, templates: dict) -> str:
    """Three to six sentences, mostly on ``topic`` with a sentence or two from other topics mixed in."""
    sentences = []
    for _ in range(rng.randint(3, 6)):
        chosen = topic if rng.random() < 0.7 else rng.choice(list(templates))
        sentences.append(sentence(rng.choice(templates[chosen]), rng))
    return " ".join(sentences)


def make_corpus(paragraphs: int = 8000, held_out_per_concept: int = 40, seed: int = 0) -> tuple:
    """``(train text, held-out sentences per concept)``: the same for the same arguments."""
    rng = random.Random(seed)
    train = "\n\n".join(paragraph(rng, rng.choice(list(TEMPLATES)), TEMPLATES) for _ in range(paragraphs)) + "\n"
    held_out = {f"{topic}{suffix}": [sentence(rng.choice(HELD_OUT_TEMPLATES[topic]), rng, new_names)
                                     for _ in range(held_out_per_concept)]
                for topic in HELD_OUT_TEMPLATES for suffix, new_names in (("", False), ("_new_names", True))
                if not new_names or topic in ("currency", "country")}
    return train, held_out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("checkpoints_mlx/concept_corpus"))
    parser.add_argument("--paragraphs", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=40, help="held-out sentences per concept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, held_out = make_corpus(args.paragraphs, args.held_out, args.seed)
    (args.out / "train.txt").write_text(train)
    (args.out / "held_out.json").write_text(json.dumps(held_out, indent=1) + "\n")
    print(f"wrote {args.out}/train.txt ({len(train):,} bytes) and {args.out}/held_out.json")


if __name__ == "__main__":
    main()
