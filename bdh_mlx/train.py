"""``bdh-mlx train``: a compiled AdamW training loop with evaluation, checkpoints and exact resume.

The step follows mlx-lm: ``value_and_grad`` inside ``mx.compile`` over
``[model.state, optimizer.state, mx.random.state]``; losses stay arrays and are read
on logging steps only. A run folder holds ``metrics.jsonl``, ``step_0000500.npz``,
``best.npz``, ``last.npz`` and, beside each resume point, ``*.optimizer.npz`` and ``*.json``.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from . import checkpoint
from .arguments import (
    ArgumentParser,
    add_batch_arguments,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from .data import BatchSampler, add_data_arguments, default_cache_dir, eval_batches, load_corpus
from .errors import BDHError, CheckpointError, ConfigError
from .evaluate import add_eval_arguments, evaluate
from .model import BDH, BDHConfig
from .utils import COMPUTE_DTYPES, atomic_savez, atomic_write, atomic_write_text, eval_mode, read_npz

PROG = "bdh-mlx train"
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
# What a resumed run may change; everything else comes from the run's own last.json.
RESUME_FLAGS = {"resume", "steps", "eval_every", "save_every", "log_every", "sample_tokens", "wandb"}


class TrainingError(BDHError):
    """The run cannot go on (e.g. the loss became NaN)."""


# --- The compiled step ---------------------------------------------------------------


def loss_fn(model: BDH, batch):
    """Mean next-byte cross-entropy of a (B, T + 1) batch of bytes."""
    batch = batch.astype(mx.int32)
    return model(batch[:, :-1], batch[:, 1:])[1]


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


def make_train_step(model: BDH, optimizer: optim.Optimizer, grad_accum: int = 1, max_grad_norm: float | None = None):
    """``step(batches) -> (loss, grad_norm)`` for batches (grad_accum, B, T + 1), and the state it compiles over.

    Micro-batches accumulate gradients in a compiled step each (evaluated one by one, so memory
    stays that of one micro-batch); the last one also clips and applies the AdamW update.
    """
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(batch, acc):
        loss, grads = loss_and_grad(model, batch)
        if acc is not None:
            loss, grads = loss + acc[0], tree_map(mx.add, acc[1], grads)
        return loss, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update(batch, acc):
        loss, grads = accumulate(batch, acc)
        if grad_accum > 1:
            loss, grads = loss / grad_accum, tree_map(lambda g: g / grad_accum, grads)
        if max_grad_norm:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = global_norm(grads)
        optimizer.update(model, grads)
        return loss, norm

    def step(batches):
        acc = None
        for micro in batches[:-1]:
            acc = accumulate(micro, acc)
            mx.eval(acc, mx.random.state)
        return update(batches[-1], acc)

    return step, state


def make_schedule(args):
    """Constant, cosine or linear decay to ``min_lr`` over ``decay_steps``, after a linear warm-up."""
    if args.schedule == "constant":
        main = optim.linear_schedule(args.lr, args.lr, 1) if args.warmup_steps else args.lr
    else:
        decay = (args.decay_steps or args.steps) - args.warmup_steps
        if decay <= 0:
            raise ConfigError(f"--warmup-steps {args.warmup_steps} leaves no steps for the {args.schedule} decay")
        if args.schedule == "cosine":
            main = optim.cosine_decay(args.lr, decay, end=args.min_lr)
        else:
            main = optim.linear_schedule(args.lr, args.min_lr, decay)
    if not args.warmup_steps:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, args.lr, args.warmup_steps), main], [args.warmup_steps])


def make_optimizer(args) -> optim.AdamW:
    """AdamW with PyTorch semantics: bias-corrected moments, decoupled weight decay, eps 1e-8."""
    return optim.AdamW(
        learning_rate=make_schedule(args),
        betas=[0.9, 0.999],
        eps=1e-8,
        weight_decay=args.weight_decay,
        bias_correction=True,
    )


# --- Arguments -----------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(prog=PROG, description="Train a BDH model on raw bytes (or resume a run).", allow_abbrev=False)
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of option values; flags override it")
    model = p.add_argument_group("model")
    model.add_argument("--preset", help=f"tiny, small, 25m, 100m (default: {DEFAULT_PRESET})")
    model.add_argument("--n-layer", type=positive_int)
    model.add_argument("--n-embd", type=positive_int)
    model.add_argument("--n-head", type=positive_int)
    model.add_argument("--mlp-multiplier", type=positive_int, help="mlp_internal_dim_multiplier")
    model.add_argument("--dropout", type=non_negative_float, help="(default: 0.1)")
    model.add_argument("--attention", choices=["auto", "parallel", "chunked"])
    model.add_argument("--chunk-size", type=positive_int)
    model.add_argument("--init-from", metavar="CKPT", help="start from the weights (and config) of a checkpoint")

    add_batch_arguments(p)
    opt = p.add_argument_group("optimisation (defaults: the official recipe)")
    add_eval_arguments(opt)
    opt.add_argument("--steps", type=positive_int, default=3000, help="total optimizer steps (default: 3000)")
    opt.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (default: 1e-3)")
    opt.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="(default: 0.1)")
    opt.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="constant")
    opt.add_argument("--warmup-steps", type=non_negative_int, default=0)
    opt.add_argument("--decay-steps", type=positive_int, help="length of the decay (default: --steps)")
    opt.add_argument("--min-lr", type=non_negative_float, default=0.0, help="learning rate at the end of the decay")
    opt.add_argument("--grad-clip", type=positive_float, help="global-norm gradient clipping (default: off)")
    opt.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default: 1)")
    opt.add_argument("--seed", type=int, default=0)

    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="run folder (default: checkpoints_mlx/<run-name>/)")
    run.add_argument("--run-name", help="(default: the start time)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.json; --steps: new total")
    run.add_argument("--eval-every", type=non_negative_int, default=250, help="0: only at the end (default: 250)")
    run.add_argument("--save-every", type=non_negative_int, default=1000, help="0: only last.npz (default: 1000)")
    run.add_argument("--log-every", type=positive_int, default=10, help="steps between loss reads (default: 10)")
    run.add_argument("--sample-tokens", type=non_negative_int, default=200, help="sample length at each evaluation")
    run.add_argument("--sample-prompt", default="\n", help="prompt of the evaluation sample")
    run.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (needs wandb installed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_arguments(p)
    return p


def read_config_file(parser, path) -> dict:
    """Option values from a YAML or TOML file, checked like the flags they stand for."""
    path = Path(path)
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
    actions = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "resume", "help"):
            raise ConfigError(f"{path}: unknown option {key!r}")
        try:
            if action.type is not None:
                value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[dest] = value
    return defaults


def explicit_options(parser, argv) -> set:
    """The destinations of the options written on the command line."""
    written = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    return {a.dest for a in parser._actions if written.intersection(a.option_strings)}


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config is not None:
        if args.resume is not None:
            parser.error("--config cannot be combined with --resume (a run resumes with its own options)")
        parser.set_defaults(**read_config_file(parser, args.config))
        args = parser.parse_args(argv)
    args.explicit = sorted(explicit_options(parser, argv))
    return args


# --- Run folder, resume state ----------------------------------------------------------


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(
        (run_dir / name).exists() for name in ("last.json", "metrics.jsonl", "last.npz", "best.npz")
    )


def fresh_run_dir(args) -> Path:
    name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("checkpoints_mlx") / name
    if holds_run(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --out"
        )
    return run_dir


def read_resume_state(run_dir: Path) -> dict:
    path = run_dir / "last.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no resume state (no last.json); start a fresh run with --out instead")
    try:
        state = json.loads(path.read_text())
        files = [run_dir / state["model"], run_dir / state["optimizer"]]
        state["step"], state["args"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable resume state ({type(e).__name__}: {e})") from None
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: refers to {f.name}, which is missing")
    return state


def resume_args(args, state: dict):
    """The run's own arguments, with the few a resume may change taken from the command line."""
    changed = sorted(set(args.explicit) - RESUME_FLAGS)
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ConfigError(f"{flags} cannot change when resuming (allowed: --steps, --eval-every, --save-every, "
                          f"--log-every, --sample-tokens, --wandb); start a new run with --init-from to change them")
    merged = argparse.Namespace(**{**state["args"], **{k: getattr(args, k) for k in args.explicit}})
    merged.resume, merged.explicit = args.resume, args.explicit
    if merged.steps <= state["step"]:
        raise ConfigError(
            f"{args.resume} is at step {state['step']} of {merged.steps}; pass --steps TOTAL above {state['step']}"
        )
    return merged


def random_key() -> list:
    return [int(k) for k in mx.random.state[0].tolist()]


def set_random_key(key: list):
    """Restore the global MLX key: ``mx.random.seed(s)`` sets the key to (s >> 32, s & 0xffffffff)."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def link_or_copy(src: Path, dst: Path):
    """Point ``dst`` at the file ``src`` atomically (a hard link when possible, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(dst, lambda f: f.write(src.read_bytes()))


def save_resume_point(run_dir: Path, step: int, model, optimizer, meta: dict, keep: bool):
    """``step_NNNNNNN.{npz,optimizer.npz,json}``, then ``last.*`` pointing at them, last.json last.

    Each file is written atomically and the JSON names the weights and optimizer files it belongs
    to, so a crash at any point leaves ``last.json`` describing a complete, consistent step.
    A resume point that is not a periodic checkpoint (``keep`` False) is removed once superseded.
    """
    stem = f"step_{step:07d}"
    previous = json.loads((run_dir / "last.json").read_text()) if (run_dir / "last.json").exists() else None
    checkpoint.save(model, run_dir / f"{stem}.npz")
    atomic_savez(run_dir / f"{stem}.optimizer.npz", {k: np.array(v) for k, v in tree_flatten(optimizer.state)})
    state = {"step": step, "model": f"{stem}.npz", "optimizer": f"{stem}.optimizer.npz", "keep": keep, **meta}
    text = json.dumps(state, indent=1)
    atomic_write_text(run_dir / f"{stem}.json", text)
    link_or_copy(run_dir / f"{stem}.npz", run_dir / "last.npz")
    link_or_copy(run_dir / f"{stem}.optimizer.npz", run_dir / "last.optimizer.npz")
    atomic_write_text(run_dir / "last.json", text)
    if previous is not None and not previous.get("keep", True) and previous["step"] != step:
        old = f"step_{previous['step']:07d}"
        for suffix in (".npz", ".optimizer.npz", ".json"):
            (run_dir / f"{old}{suffix}").unlink(missing_ok=True)


def load_optimizer_state(path: Path) -> dict:
    return tree_unflatten([(k, mx.array(v)) for k, v in read_npz(path, "optimizer state").items()])


def truncate_metrics(path: Path, step: int):
    """Drop metric lines logged after ``step`` (by a run that stopped before saving them)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(f"{line}\n" for line in lines))


# --- The run ---------------------------------------------------------------------------


def model_config(args) -> BDHConfig:
    overrides = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    return BDHConfig.from_preset(args.preset or DEFAULT_PRESET, **overrides)


def build_model(args, resume_state, run_dir) -> BDH:
    if resume_state is not None:
        return checkpoint.load(run_dir / resume_state["model"])
    if args.init_from is not None:
        if args.preset is not None:
            raise ConfigError("--preset and --init-from exclude each other: the checkpoint holds its config")
        overrides = {f: getattr(args, a) for a, f in MODEL_FLAGS.items() if getattr(args, a) is not None}
        return checkpoint.load(args.init_from, **overrides)
    mx.random.seed(args.seed)
    model = BDH(model_config(args))
    mx.eval(model.parameters())
    return model


def open_wandb(args):
    if args.wandb is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def sample_text(model: BDH, args) -> str:
    """A short sample with dropout off; the training randomness is saved and restored around it."""
    from .generate import generate
    from .sample_utils import make_sampler

    key = random_key()
    try:
        with eval_mode(model):
            return generate(model, args.sample_prompt, max_tokens=args.sample_tokens,
                            sampler=make_sampler(temperature=0.8, top_k=50), seed=args.seed)
    finally:
        set_random_key(key)


class StopFlag:
    """The first Ctrl-C asks the loop to save and stop at the next step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(args):
    """Run (or resume) training as ``args`` describe; returns the final metrics record."""
    resume_state = None
    if args.resume is not None:
        run_dir = Path(args.resume)
        resume_state = read_resume_state(run_dir)
        args = resume_args(args, resume_state)
    else:
        run_dir = fresh_run_dir(args)
    make_schedule(args)  # checks warm-up against the decay before anything is written
    wandb = open_wandb(args)
    model = build_model(args, resume_state, run_dir)
    corpus = load_corpus(args, args.cache_dir or default_cache_dir(run_dir))
    corpus.check_block_size(args.block_size)

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    saved_args = {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "config")}
    model.set_compute_dtype(COMPUTE_DTYPES[args.dtype])
    optimizer = make_optimizer(args)
    optimizer.init(model.trainable_parameters())
    sampler = BatchSampler(corpus.train, args.batch_size, args.block_size, args.seed)
    val_batches = eval_batches(corpus.val, args.batch_size, args.block_size, args.eval_batches)
    start, best, elapsed_before = 0, {"val_loss": math.inf, "step": None}, 0.0
    if resume_state is not None:
        optimizer.state = load_optimizer_state(run_dir / resume_state["optimizer"])
        optimizer.init(model.trainable_parameters())
        sampler.state = resume_state["sampler"]
        set_random_key(resume_state["random_key"])
        start, elapsed_before = resume_state["step"], resume_state["elapsed"]
        best = resume_state["best"]
        if (run_dir / "best.json").exists():
            best = min(best, json.loads((run_dir / "best.json").read_text()), key=lambda b: b["val_loss"])
        truncate_metrics(metrics_path, start)
    else:
        mx.random.seed(args.seed + 1)  # dropout's stream, apart from the one that initialised the weights
    step_fn, state = make_train_step(model, optimizer, args.grad_accum, args.grad_clip)
    wandb_run = wandb and wandb.init(project=args.wandb, name=run_dir.name, dir=str(run_dir), config=saved_args)

    tokens_per_step = args.grad_accum * args.batch_size * args.block_size
    n_params = model.config.num_parameters
    where = "resuming at step " + str(start) if start else "starting"
    print(f"{PROG}: {where}: {n_params:,} parameters, {corpus.source} ({len(corpus.train):,} train / "
          f"{len(corpus.val):,} val bytes), run folder {run_dir}", file=sys.stderr)

    t0 = time.perf_counter()
    loss_sum, n_losses, last_log, grad_norm = mx.array(0.0), 0, (start, t0), None
    saved_step = start if resume_state is not None else None
    record = {}

    def elapsed():
        return elapsed_before + time.perf_counter() - t0

    def save(step, keep):
        nonlocal saved_step
        meta = {"random_key": random_key(), "sampler": sampler.state, "best": best, "elapsed": elapsed(),
                "args": saved_args}
        save_resume_point(run_dir, step, model, optimizer, meta, keep)
        saved_step = step

    def read_losses(step, grad_norm):
        """Host sync: the mean training loss since the last read; stops the run on NaN or Inf."""
        nonlocal loss_sum, n_losses, last_log
        train_loss, norm = loss_sum.item() / max(n_losses, 1), grad_norm.item()
        if not (math.isfinite(train_loss) and math.isfinite(norm)):
            kept = f"the last good checkpoint is {run_dir / 'last.npz'} (step {saved_step})" if saved_step is not None \
                else "no checkpoint was saved"
            when = f"at step {step}" if step == last_log[0] + 1 else f"in steps {last_log[0] + 1}-{step}"
            raise TrainingError(f"the loss became {train_loss} (grad norm {norm}) {when}; stopped, {kept}")
        now = time.perf_counter()
        tokens_per_sec = (step - last_log[0]) * tokens_per_step / max(now - last_log[1], 1e-9)
        loss_sum, n_losses, last_log = mx.array(0.0), 0, (step, now)
        return {"train_loss": train_loss, "lr": optimizer.learning_rate.item(), "grad_norm": norm,
                "tokens_per_sec": tokens_per_sec}

    with StopFlag() as stop, tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True,
                                  disable=args.no_progress, mininterval=0.1 if sys.stderr.isatty() else 30) as bar:
        for step in range(start + 1, args.steps + 1):
            if stop.requested:
                if n_losses:
                    read_losses(step - 1, grad_norm)
                if saved_step != step - 1:
                    save(step - 1, keep=False)
                bar.close()
                print(f"{PROG}: stopped at step {step - 1}; saved {run_dir / 'last.npz'}; "
                      f"continue with: bdh-mlx train --resume {run_dir}", file=sys.stderr)
                raise KeyboardInterrupt
            loss, grad_norm = step_fn(mx.array(sampler.sample(args.grad_accum)))
            loss_sum = loss_sum + loss
            n_losses += 1
            mx.eval(state, loss_sum, grad_norm)
            bar.update(1)

            final = step == args.steps
            evaluating = final or (args.eval_every and step % args.eval_every == 0)
            saving = final or (args.save_every and step % args.save_every == 0)
            if not (evaluating or saving or step % args.log_every == 0):
                continue
            record = {"step": step, **read_losses(step, grad_norm)}
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
            if evaluating:
                record.update(evaluate(model, val_batches))
                if not math.isfinite(record["val_loss"]):
                    raise TrainingError(f"the validation loss became {record['val_loss']} at step {step}; stopped")
                if record["val_loss"] < best["val_loss"]:
                    best = {"val_loss": record["val_loss"], "step": step}
                    checkpoint.save(model, run_dir / "best.npz")
                    atomic_write_text(run_dir / "best.json", json.dumps(best))
                if args.sample_tokens:
                    record["sample"] = sample_text(model, args)
                bar.write(f"step {step}: val loss {record['val_loss']:.4f}, {record['val_bpb']:.4f} bits/byte, "
                          f"non-zero x {np.mean(record['sparsity_x']):.3f}, y {np.mean(record['sparsity_y']):.3f}"
                          + (f"\n{record['sample']!r}" if args.sample_tokens else ""))
            record["elapsed"] = elapsed()
            if saving:
                save(step, keep=bool(args.save_every and step % args.save_every == 0))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in record.items() if k != "sample"}, step=step)
    if wandb_run is not None:
        wandb_run.finish()
    return record


def main(argv=None) -> int:
    return run_command(PROG, parse_args, train, argv)
