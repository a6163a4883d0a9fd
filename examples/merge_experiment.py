"""Merge two BDH models fine-tuned from one base on different corpora (paper, section 7.1).

    python examples/merge_experiment.py --out /tmp/bdh_merge_experiment

1. writes two corpora: English prose (the built-in pydoc text) and Python code (the standard library's .py files);
2. trains a base on both, then fine-tunes copy A on prose and copy B on code (``bdh-mlx train --init-from``);
3. merges A and B (``bdh_mlx.tools.merge``) and fine-tunes AB briefly on both corpora;
4. prints the validation bits per byte of base, A, B, AB and the fine-tuned AB on each corpus (a Markdown table).
"""

import argparse
import sysconfig
from pathlib import Path

import numpy as np

import bdh_mlx
from bdh_mlx.training import train
from bdh_mlx.training.data import default_corpus_bytes, eval_batches, split_corpus
from bdh_mlx.training.evaluate import evaluate_loss


def write_corpora(out: Path, code_bytes: int) -> dict:
    """prose.txt, code.txt (the same kind of size) and mix.txt (both, in 64 KB pieces, alternating)."""
    prose = default_corpus_bytes()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    code = b"".join(f.read_bytes() for f in files)[:code_bytes]
    piece = 1 << 16
    mix = b"".join(prose[i : i + piece] + code[i : i + piece] for i in range(0, max(len(prose), len(code)), piece))
    paths = {}
    for name, data in (("prose", prose), ("code", code), ("mix", mix)):
        paths[name] = out / f"{name}.txt"
        paths[name].write_bytes(data)
    return paths


def run_training(out: Path, data: Path, steps: int, lr: float, model_args: list) -> Path:
    argv = ["--data", str(data), "--out", str(out), "--steps", str(steps), "--lr", str(lr), "--block-size", "128",
            "--batch-size", "16", "--eval-every", "0", "--save-every", "0", "--sample-tokens", "0",
            "--eval-batches", "4", "--log-every", "50", "--dropout", "0", *model_args]
    if train.main(argv) != 0:
        raise SystemExit(f"training failed: {out}")
    return out / "last.npz"


def val_bpb(path: Path, corpus: Path, batches: int = 16) -> float:
    val = split_corpus(np.fromfile(corpus, dtype=np.uint8), str(corpus)).val
    return evaluate_loss(bdh_mlx.load(path), eval_batches(val, 16, 256, batches))[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bdh_merge_experiment"), help="working folder")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--tune-steps", type=int, default=300)
    parser.add_argument("--merged-steps", type=int, default=100)
    parser.add_argument("--code-bytes", type=int, default=3_000_000)
    parser.add_argument("--model", default="--preset tiny --n-embd 64 --mlp-multiplier 16",
                        help="model options of the base")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpora = write_corpora(args.out, args.code_bytes)

    base = run_training(args.out / "base", corpora["mix"], args.base_steps, 3e-3, args.model.split())
    a = run_training(args.out / "a_prose", corpora["prose"], args.tune_steps, 1e-3, ["--init-from", str(base)])
    b = run_training(args.out / "b_code", corpora["code"], args.tune_steps, 1e-3, ["--init-from", str(base)])
    ab = args.out / "ab.npz"
    bdh_mlx.save(bdh_mlx.merge(bdh_mlx.load(a), bdh_mlx.load(b)), ab)
    ab_tuned = run_training(args.out / "ab_tuned", corpora["mix"], args.merged_steps, 1e-3, ["--init-from", str(ab)])

    models = {"base": base, "A (prose)": a, "B (code)": b, "AB (merged)": ab, "AB + fine-tune": ab_tuned}
    print("\n| model | params | val bpb prose | val bpb code |\n|---|---|---|---|")
    for name, path in models.items():
        params = bdh_mlx.load(path).config.num_parameters
        print(f"| {name} | {params:,} | {val_bpb(path, corpora['prose']):.3f} | {val_bpb(path, corpora['code']):.3f} |")


if __name__ == "__main__":
    main()
