"""``bdh-mlx train``: parse the options, build the model, data and optimizer, and call ``trainer.train``.

The options and their checks are in ``options.py`` (shared with ``bdh-mlx finetune``), the training in
``trainer.py``.
"""

from bdh_mlx.arguments import ArgumentParser, add_batch_arguments, run_command
from bdh_mlx.training import options as opts
from bdh_mlx.training import trainer
from bdh_mlx.training.data import (
    BatchSampler,
    add_data_arguments,
    corpus_options,
    default_cache_dir,
    eval_batches,
    load_corpus,
)
from bdh_mlx.training.evaluate import next_byte_loss
from bdh_mlx.training.trainer import make_optimizer

PROG = trainer.PROG
loss_fn = next_byte_loss  # the objective of ``bdh-mlx train``


def build_parser():
    p = ArgumentParser(prog=PROG, description="Train a BDH model on raw bytes (or resume a run).")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of option values; flags override it")
    opts.add_model_arguments(p)
    add_data_arguments(p)
    add_batch_arguments(p)
    opts.add_optimizer_arguments(p)
    opts.add_run_arguments(p)
    return p


def parse_args(argv=None):
    return opts.parse_options(build_parser, argv)


def run(options) -> dict:
    """Run (or resume) training as the options describe; returns the last metrics record."""
    options, run_folder, _, model = opts.prepare_run(options)
    corpus = load_corpus(options.cache_dir or default_cache_dir(run_folder.path), **corpus_options(options))
    corpus.check_block_size(options.block_size)
    sampler = BatchSampler(corpus.train, options.batch_size, options.block_size, options.seed)
    val_batches = eval_batches(corpus.val, options.batch_size, options.block_size, options.eval_batches)
    optimizer = make_optimizer(opts.build_schedule(options), options.weight_decay)
    return trainer.train(model, optimizer, sampler, val_batches, opts.training_args(options, run_folder), loss_fn,
                         record=opts.saved_options(options), source=corpus.source)


def main(argv=None) -> int:
    return run_command(PROG, parse_args, run, argv)
