"""Write examples/instructions/{train,valid}.jsonl: a small Alpaca-format instruction set made here.

Five tasks with short answers (sums, word reversal, capital cities, definitions written for this file,
capital letters), so a small model can learn the format in minutes on a CPU. Run:
``python examples/make_instructions.py``; the output is deterministic.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara", "Australia": "Canberra",
}
DEFINITIONS = {
    "river": "A large stream of water that flows across land to the sea or a lake.",
    "bridge": "A structure built to carry a road or path over water or a gap.",
    "library": "A place that keeps books for people to read or borrow.",
    "kettle": "A pot with a spout, used to boil water.",
    "island": "A piece of land with water all around it.",
    "ladder": "A set of steps between two long sides, used to climb up or down.",
    "compass": "A tool whose needle points north, used to find directions.",
    "orchard": "A piece of land where fruit trees are grown.",
    "harbor": "A sheltered area of water where ships can stay safely.",
    "candle": "A stick of wax with a wick that gives light when it burns.",
    "glacier": "A slow river of ice that moves down a mountain.",
    "violin": "A musical instrument with four strings, played with a bow.",
    "desert": "A dry area of land where very little rain falls.",
    "anchor": "A heavy metal object that holds a ship in place.",
    "lantern": "A lamp with a case that protects the flame.",
    "meadow": "A field of grass and wild flowers.",
    "volcano": "A mountain that can throw out hot rock, ash and gas.",
    "telescope": "A tool that makes far away things look nearer.",
    "umbrella": "A folding cover that keeps the rain off you.",
    "pillow": "A soft bag you rest your head on in bed.",
}
WORDS = sorted({w for d in DEFINITIONS.values() for w in d.lower().strip(".").replace(",", "").split() if len(w) > 3})


def examples(rng: random.Random):
    for _ in range(1500):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    for _ in range(600):
        word = rng.choice(WORDS + list(DEFINITIONS))
        yield {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    for _ in range(600):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        yield {"instruction": "Write this in capital letters.", "input": words, "output": words.upper()}
    for country, city in CAPITALS.items():
        for question in (f"What is the capital of {country}?", f"Name the capital city of {country}."):
            for _ in range(8):
                yield {"instruction": question, "input": "", "output": f"The capital of {country} is {city}."}
    for word, meaning in DEFINITIONS.items():
        for question in (f"Define the word: {word}", f"What does {word} mean?"):
            for _ in range(8):
                yield {"instruction": question, "input": "", "output": meaning}


def main():
    rng = random.Random(0)
    rows = list(examples(rng))
    rng.shuffle(rows)
    folder = Path(__file__).parent / "instructions"
    folder.mkdir(exist_ok=True)
    n_valid = len(rows) // 20
    for name, part in (("valid", rows[:n_valid]), ("train", rows[n_valid:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"{folder / name}.jsonl: {len(part)} examples")


if __name__ == "__main__":
    main()
