"""Validation loss, bits per byte and activation sparsity; ``bdh-mlx eval`` for a checkpoint.

The same functions run inside ``bdh-mlx train`` at every evaluation.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from bdh_mlx.arguments import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCK_SIZE,
    ArgumentParser,
    add_batch_arguments,
    add_checkpoint_argument,
    positive_int,
    run_command,
)
from bdh_mlx.model import BDH
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import COMPUTE_DTYPES, eval_mode
from bdh_mlx.storage.hub import resolve_checkpoint
from bdh_mlx.training.data import add_data_arguments, corpus_options, default_cache_dir, eval_batches, load_corpus


def next_byte_loss(model: BDH, batch, share=None) -> mx.array:
    """Mean next-byte cross-entropy of a (B, T + 1) batch of bytes (``share``: see ``BDH.__call__``)."""
    batch = batch.astype(mx.int32)
    return model(batch[:, :-1], batch[:, 1:], share=share)[1]


def next_byte_inputs(batch: np.ndarray) -> np.ndarray:
    """The model's input bytes of a (B, T + 1) batch: all but the last."""
    return batch[:, :-1]


def _rows(batch: np.ndarray, group):
    """This process's equal share of the rows of ``batch`` (all of them without a group)."""
    if group is None:
        return batch
    n = batch.shape[0] // group.size()
    return batch[group.rank() * n : (group.rank() + 1) * n]


def _mean_over(value: mx.array, group) -> mx.array:
    return value if group is None else mx.distributed.all_sum(value, group=group) / group.size()


def evaluate_loss(model: BDH, batches: np.ndarray, loss=next_byte_loss, group=None) -> tuple:
    """Mean ``loss`` over ``batches`` (n, B, T + 1) with dropout off, and bits per byte (= loss / ln 2).

    With a distributed ``group``, each process takes its share of every batch's rows.
    """
    total = mx.array(0.0)
    with eval_mode(model):
        for batch in batches:
            total = total + loss(model, mx.array(_rows(batch, group)))
            mx.eval(total)
    mean = _mean_over(total, group).item() / len(batches)
    return mean, mean / math.log(2)


def activation_sparsity(model: BDH, batch: np.ndarray, group=None, inputs=next_byte_inputs) -> tuple:
    """Per layer, the fraction of non-zero entries of x and of y on one batch, dropout off.

    ``inputs(batch)`` gives the (B, T) token ids of a batch (default: a (B, T + 1) batch of bytes).
    """
    activations = []
    with eval_mode(model):
        model(mx.array(inputs(_rows(batch, group)), dtype=mx.int32), activations=activations)
    x = _mean_over(mx.stack([mx.mean(a["x"] > 0) for a in activations]), group)
    y = _mean_over(mx.stack([mx.mean(a["y"] > 0) for a in activations]), group)
    return x.tolist(), y.tolist()


def evaluate(model: BDH, batches: np.ndarray, group=None, loss=next_byte_loss, inputs=next_byte_inputs) -> dict:
    """Validation loss, bits per byte and per-layer sparsity of x and y (``inputs``: see ``activation_sparsity``)."""
    val_loss, bpb = evaluate_loss(model, batches, loss, group)
    sparsity_x, sparsity_y = activation_sparsity(model, batches[0], group, inputs)
    return {"val_loss": val_loss, "val_bpb": bpb, "sparsity_x": sparsity_x, "sparsity_y": sparsity_y}


def add_eval_arguments(parser):
    """The size of the fixed validation set, shared by ``train`` and ``eval``."""
    parser.add_argument("--eval-batches", type=positive_int, default=20,
                        help="validation batches, fixed evenly spaced crops")


def build_parser():
    parser = ArgumentParser(prog="bdh-mlx eval", description="Validation loss and bits per byte of a checkpoint.")
    add_checkpoint_argument(parser)
    group = add_batch_arguments(parser, block_size=None, batch_size=None)
    group.description = (f"--block-size and --batch-size default to those the checkpoint's run trained with "
                         f"(else {DEFAULT_BLOCK_SIZE} and {DEFAULT_BATCH_SIZE})")
    add_eval_arguments(parser)
    add_data_arguments(parser)
    return parser


def recorded_batch_shape(path: Path) -> dict:
    """``block_size`` and ``batch_size`` the checkpoint's run trained with, from the run folder it sits in."""
    for name in ("last.json", "run.json"):
        try:
            recorded = json.loads((path.parent / name).read_text())["args"]
            return {k: int(recorded[k]) for k in ("block_size", "batch_size")}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {}


def run(args):
    path = resolve_checkpoint(args.checkpoint)
    model = checkpoint.load(path, compute_dtype=COMPUTE_DTYPES[args.dtype])
    recorded = recorded_batch_shape(path)
    shape = {"block_size": DEFAULT_BLOCK_SIZE, "batch_size": DEFAULT_BATCH_SIZE, **recorded}
    unset = [name for name in shape if getattr(args, name) is None]
    block_size, batch_size = (shape[name] if name in unset else getattr(args, name)
                              for name in ("block_size", "batch_size"))
    origin = ("as given" if not unset else "as its run trained" if recorded else
              "the default shape: no run folder beside the checkpoint; compare checkpoints at one --block-size "
              "and --batch-size")
    corpus = load_corpus(args.cache_dir or default_cache_dir(path.resolve().parent), **corpus_options(args))
    corpus.check_block_size(block_size)
    batches = eval_batches(corpus.val, batch_size, block_size, args.eval_batches)
    metrics = evaluate(model, batches)
    x = " ".join(f"{s:.3f}" for s in metrics["sparsity_x"])
    y = " ".join(f"{s:.3f}" for s in metrics["sparsity_y"])
    shape = " x ".join(map(str, batches[..., 1:].shape))
    print(f"{args.checkpoint}: validation on {corpus.source} ({shape} bytes, {origin})")
    print(f"val loss {metrics['val_loss']:.4f} | bits per byte {metrics['val_bpb']:.4f}")
    print(f"non-zero x per layer: {x} | non-zero y per layer: {y}")
    return metrics


def main(argv=None) -> int:
    return run_command("bdh-mlx eval", build_parser().parse_args, run, argv)
