"""The options of ``bdh-mlx train`` and ``bdh-mlx finetune``, and how they become the library's inputs.

The flags (over a ``--config`` file, over the defaults; or a run's own options when resuming) are checked
before anything is written, then turned into a model, an optimizer and ``TrainingArgs`` for ``trainer.train``.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from bdh_mlx.arguments import non_negative_float, non_negative_int, positive_float, positive_int, seed_int
from bdh_mlx.errors import ConfigError
from bdh_mlx.model import ATTENTION_FORMS, BDH, PRESETS, BDHConfig
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import COMPUTE_DTYPES
from bdh_mlx.training import trainer
from bdh_mlx.training.evaluate import add_eval_arguments
from bdh_mlx.training.run_folder import RunFolder
from bdh_mlx.training.trainer import TrainingArgs, estimate_step_memory, make_schedule

DEFAULT_PRESET = "25m"
MODEL_FLAGS = {  # argument name -> BDHConfig field
    "n_layer": "n_layer",
    "n_embd": "n_embd",
    "n_head": "n_head",
    "mlp_multiplier": "mlp_internal_dim_multiplier",
    "dropout": "dropout",
    "attention": "attention",
    "chunk_size": "chunk_size",
}
# Options that do not change what is computed: the only ones a resumed run may set.
RESUMABLE = {"steps", "eval_every", "save_every", "log_every", "sample_tokens", "sample_prompt", "wandb",
             "no_progress", "force"}
NOT_SAVED = {"explicit", "resume", "config", "force"}  # options that are not part of a run's record
UNSET = object()  # the default of every option while finding those written on the command line


# --- Arguments -----------------------------------------------------------------------


def add_model_arguments(parser):
    model = parser.add_argument_group("model (default: the preset's values)")
    model.add_argument("--preset", choices=list(PRESETS), help=f"model size (default: {DEFAULT_PRESET})")
    model.add_argument("--n-layer", type=positive_int, help="times the shared layer is applied")
    model.add_argument("--n-embd", type=positive_int, help="width D of the residual stream")
    model.add_argument("--n-head", type=positive_int, help="heads; they split the neurons")
    model.add_argument("--mlp-multiplier", type=positive_int, help="mlp_internal_dim_multiplier: N = m * D / heads")
    model.add_argument("--dropout", type=non_negative_float, help="dropout on x * y (default: 0.1)")
    model.add_argument("--attention", choices=ATTENTION_FORMS, help="auto: parallel for short blocks, chunked beyond "
                       "4 chunks (default: auto)")
    model.add_argument("--chunk-size", type=positive_int, help="tokens per chunk of the chunked form (default: 256)")
    model.add_argument("--init-from", "--model", dest="init_from", metavar="CKPT",
                       help="start from the weights (and config) of a checkpoint, mlx-lm folder or Hub repo id")


def add_optimizer_arguments(parser):
    opt = parser.add_argument_group("optimisation (defaults: the official recipe)")
    opt.add_argument("--steps", type=positive_int, default=3000, help="total optimizer steps")
    opt.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    opt.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW decoupled weight decay")
    opt.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="constant",
                     help="learning-rate decay after the warm-up")
    opt.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up from 0")
    opt.add_argument("--decay-steps", type=positive_int, help="steps until --min-lr (default: --steps)")
    opt.add_argument("--min-lr", type=non_negative_float, default=0.0, help="learning rate at the end of the decay")
    opt.add_argument("--grad-clip", type=positive_float, help="clip the global gradient norm to this (default: off)")
    opt.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--seed", type=seed_int, default=0, help="seed of the weights, data order and dropout")


def add_run_arguments(parser, default_eval_every=250, default_save_every=1000,
                      sample_prompt_help="prompt of the evaluation sample (default: a newline)"):
    ev = parser.add_argument_group("evaluation")
    add_eval_arguments(ev)
    ev.add_argument("--eval-every", type=non_negative_int, default=default_eval_every,
                    help="steps between evaluations; 0: only at the end")
    ev.add_argument("--sample-tokens", type=non_negative_int, default=200, help="bytes sampled at each evaluation")
    ev.add_argument("--sample-prompt", default="\n", help=sample_prompt_help)
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="run folder (default: checkpoints_mlx/<run-name>/)")
    out.add_argument("--run-name", help="name of the run folder (default: the start time)")
    out.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last resume point; --steps sets "
                     "the new total")
    out.add_argument("--save-every", type=non_negative_int, default=default_save_every,
                     help="steps between kept checkpoints; 0: only last.npz")
    out.add_argument("--log-every", type=positive_int, default=10, help="steps between loss reads")
    out.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (needs wandb installed)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--force", action="store_true", help="start even if the memory estimate says it will not fit")


def read_values(path: Path) -> dict:
    """The mapping a YAML or TOML file holds."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML config files need pyyaml (pip install pyyaml)") from None
            values = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: unreadable config ({type(e).__name__}: {e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option names to values")
    return values


def read_config_file(build, path) -> dict:
    """Option values from a YAML or TOML file, checked by the parser ``build()`` makes, as flags would be."""
    path = Path(path)
    values = read_values(path)
    parser = build()
    known = vars(parser.parse_args([]))  # every option, with its default
    tokens = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "resume"):
            raise ConfigError(f"{path}: unknown option {key!r}")
        flag = "--" + dest.replace("_", "-")
        if known[dest] is False:  # a switch
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key}: must be true or false, got {value!r}")
            tokens += [flag] if value else []
        else:
            tokens.append(f"{flag}={value}")
    parser.exit_on_error = False  # argparse raises ArgumentError instead of exiting
    try:
        parsed = vars(parser.parse_args(tokens))
    except argparse.ArgumentError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {str(key).replace("-", "_"): parsed[str(key).replace("-", "_")] for key in values}


def explicit_options(build, argv) -> set:
    """The options written on the command line, however spelled (``--flag value``, ``--flag=value``)."""
    parser = build()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), UNSET))
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not UNSET}


def parse_options(build, argv=None) -> argparse.Namespace:
    """The options: the flags, over a ``--config`` file, over the defaults; ``explicit`` names the flags given."""
    parser = build()
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parser.parse_args(argv)
    if options.config is not None:
        if options.resume is not None:
            parser.error("--config cannot be combined with --resume (a run resumes with its own options)")
        parser.set_defaults(**read_config_file(build, options.config))
        options = parser.parse_args(argv)
    return argparse.Namespace(**vars(options), explicit=sorted(explicit_options(build, argv)))


def build_schedule(options):
    return make_schedule(options.lr, options.steps, options.schedule, options.warmup_steps, options.decay_steps,
                         options.min_lr)


def check_args(options):
    """Refuse, before anything is written, options that can never work."""
    build_schedule(options)  # warm-up against the decay
    if options.sample_tokens and options.sample_prompt == "":  # None: the command picks one (finetune)
        raise ConfigError("--sample-prompt is empty; give at least one character (or --sample-tokens 0)")


def resume_options(options, state: dict) -> argparse.Namespace:
    """The run's own options, with those that do not change the computation taken from the command line."""
    changed = sorted(set(options.explicit) - RESUMABLE - {"resume"})
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        allowed = ", ".join("--" + name.replace("_", "-") for name in sorted(RESUMABLE))
        raise ConfigError(f"{flags} cannot change when resuming (allowed: {allowed}); "
                          f"start a new run with --init-from to change them")
    given = {k: getattr(options, k) for k in options.explicit}
    merged = argparse.Namespace(**{**state["args"], **given, "resume": options.resume, "explicit": options.explicit,
                                   "force": options.force})
    if merged.steps <= state["step"]:
        raise ConfigError(
            f"{options.resume} is at step {state['step']} of {merged.steps}; pass --steps TOTAL above {state['step']}"
        )
    return merged


# --- Memory, told before the run starts ------------------------------------------------------


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, options, world: int):
    need = estimate_step_memory(model, options.batch_size // world, options.block_size, COMPUTE_DTYPES[options.dtype])
    have = machine_memory()
    if need > 0.9 * have and not options.force:
        raise ConfigError(f"a training step needs about {need / 2**30:.1f} GiB but this machine has "
                          f"{have / 2**30:.1f} GiB; use a smaller --batch-size (with --grad-accum), --block-size or "
                          f"preset, or --force to try anyway")
    return need


# --- From options to the library's inputs ------------------------------------------------------


def model_config(options) -> BDHConfig:
    overrides = {f: getattr(options, a) for a, f in MODEL_FLAGS.items() if getattr(options, a) is not None}
    return BDHConfig.from_preset(options.preset or DEFAULT_PRESET, **overrides)


def load_trainable(path, compute_dtype=mx.float32, **overrides) -> BDH:
    """A checkpoint to train further; a quantized one is refused (its weights are rounded, for inference only)."""
    model = checkpoint.load(path, compute_dtype=compute_dtype, **overrides)
    quantization = model.config.quantization
    if quantization is not None:
        raise ConfigError(f"{path} holds a quantized model ({quantization['bits']}-bit weights, for generating "
                          f"only); train or fine-tune the float checkpoint it was quantized from")
    return model


def build_model(options, resume_state, run: RunFolder) -> BDH:
    """The model to train: the resume point's, ``--init-from``'s, or a new one of the options' config."""
    dtype = COMPUTE_DTYPES[options.dtype]
    if resume_state is not None:
        model = checkpoint.load(run.path / resume_state["model"], compute_dtype=dtype)
    elif options.init_from is not None:
        if options.preset is not None:
            raise ConfigError("--preset and --init-from exclude each other: the checkpoint holds its config")
        overrides = {f: getattr(options, a) for a, f in MODEL_FLAGS.items() if getattr(options, a) is not None}
        model = load_trainable(options.init_from, compute_dtype=dtype, **overrides)
    else:
        mx.random.seed(options.seed)
        model = BDH(model_config(options), compute_dtype=dtype)
        mx.eval(model.parameters())
    return model.train()


def training_args(options, run: RunFolder) -> TrainingArgs:
    """The library's arguments from the command's options."""
    return TrainingArgs(out=str(run.path), steps=options.steps, grad_accum=options.grad_accum,
                        grad_clip=options.grad_clip, seed=options.seed, eval_every=options.eval_every,
                        save_every=options.save_every, log_every=options.log_every,
                        sample_tokens=options.sample_tokens, sample_prompt=options.sample_prompt,
                        resume=options.resume is not None, progress=not options.no_progress, wandb=options.wandb)


def saved_options(options) -> dict:
    """What the run folder records of the options (and a resume starts from)."""
    return {k: v for k, v in vars(options).items() if k not in NOT_SAVED}


def prepare_run(options, build=build_model):
    """Check everything, then build the model: ``(options, run folder, resume state, model)``.

    Nothing is written: the options are known to be usable before the library takes the run folder.
    """
    if options.resume is not None:
        run, resume_state = trainer.open_run(TrainingArgs(out=options.resume, resume=True))
        saved = resume_state or {"step": 0, "args": run.read_start()}  # killed before its first checkpoint
        options = resume_options(options, saved)
    else:
        resume_state = None
        run = RunFolder(options.out or Path("checkpoints_mlx") / (options.run_name or time.strftime("%Y%m%d-%H%M%S")))
        if run.holds_run():
            raise ConfigError(f"{run.path} already holds a run; continue it with --resume {run.path}, "
                              f"or choose another --out")
        run.check_usable()
    check_args(options)
    world = mx.distributed.init().size()
    if options.batch_size % world:
        raise ConfigError(f"--batch-size {options.batch_size} does not split over {world} processes")
    trainer.open_wandb(options.wandb)
    model = build(options, resume_state, run)
    check_memory(model, options, world)
    return options, run, resume_state, model


