"""``bdh-mlx train``: a compiled AdamW training loop with evaluation, checkpoints and exact resume.

The step follows mlx-lm: ``value_and_grad`` inside ``mx.compile`` over
``[model.state, optimizer.state, mx.random.state]``; losses stay arrays and are read on
logging steps only. Under ``mlx.launch -n N`` the global batch is split across N processes
and the gradients are averaged inside the step (``mx.distributed``); rank 0 alone writes.
The run folder is described in ``run_folder.py``.
"""

import argparse
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from bdh_mlx import blas
from bdh_mlx.arguments import (
    ArgumentParser,
    add_batch_arguments,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
    seed_int,
)
from bdh_mlx.errors import BDHError, ConfigError
from bdh_mlx.model import ATTENTION_FORMS, BDH, PRESETS, BatchShare, BDHConfig
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import COMPUTE_DTYPES, eval_mode
from bdh_mlx.training.data import BatchSampler, add_data_arguments, default_cache_dir, eval_batches, load_corpus
from bdh_mlx.training.evaluate import add_eval_arguments, evaluate, next_byte_inputs, next_byte_loss
from bdh_mlx.training.run_folder import RunFolder

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
# Options that do not change what is computed: the only ones a resumed run may set.
RESUMABLE = {"steps", "eval_every", "save_every", "log_every", "sample_tokens", "sample_prompt", "wandb",
             "no_progress", "force"}
NOT_SAVED = {"explicit", "resume", "config", "force"}  # options that are not part of a run's record


class TrainingError(BDHError):
    """The run cannot go on (e.g. the loss became NaN)."""


# --- The compiled step ---------------------------------------------------------------


loss_fn = next_byte_loss  # the objective of ``bdh-mlx train``


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


def make_train_step(model: BDH, optimizer: optim.Optimizer, grad_accum: int = 1, max_grad_norm: float | None = None,
                    loss=loss_fn, group=None):
    """``step(batches) -> (loss, grad_norm)`` for batches (grad_accum, B, ...), and the state it compiles over.

    Micro-batches accumulate gradients in a compiled step each (evaluated one by one, so memory
    stays that of one micro-batch); the last one also averages over processes (``group``), clips
    and applies the AdamW update. ``loss(model, batch)`` is the objective.
    """
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, loss)
    world = 1 if group is None else group.size()

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
        if world > 1:
            loss, grads = mx.distributed.all_sum(loss, group=group) / world, nn.average_gradients(grads, group=group)
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
    return optim.AdamW(learning_rate=make_schedule(args), betas=[0.9, 0.999], eps=1e-8,
                       weight_decay=args.weight_decay, bias_correction=True)


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
    model.add_argument("--init-from", metavar="CKPT", help="start from the weights (and config) of a checkpoint")


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


def add_run_arguments(parser, default_eval_every=250, default_save_every=1000):
    ev = parser.add_argument_group("evaluation")
    add_eval_arguments(ev)
    ev.add_argument("--eval-every", type=non_negative_int, default=default_eval_every,
                    help="steps between evaluations; 0: only at the end")
    ev.add_argument("--sample-tokens", type=non_negative_int, default=200, help="bytes sampled at each evaluation")
    ev.add_argument("--sample-prompt", default="\n", help="prompt of the evaluation sample (default: a newline)")
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


def build_parser():
    p = ArgumentParser(prog=PROG, description="Train a BDH model on raw bytes (or resume a run).")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of option values; flags override it")
    add_model_arguments(p)
    add_data_arguments(p)
    add_batch_arguments(p)
    add_optimizer_arguments(p)
    add_run_arguments(p)
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


def parse_args(argv=None, build=build_parser):
    parser = build()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config is not None:
        if args.resume is not None:
            parser.error("--config cannot be combined with --resume (a run resumes with its own options)")
        parser.set_defaults(**read_config_file(parser, args.config))
        args = parser.parse_args(argv)
    args.explicit = sorted(explicit_options(parser, argv))
    return args


def check_args(args):
    """Refuse, before anything is written, options that can never work."""
    make_schedule(args)  # warm-up against the decay
    if args.sample_tokens and args.sample_prompt == "":  # None: the command picks one (finetune)
        raise ConfigError("--sample-prompt is empty; give at least one character (or --sample-tokens 0)")


def resume_args(args, state: dict):
    """The run's own arguments, with the options that do not change the computation taken from the command line."""
    changed = sorted(set(args.explicit) - RESUMABLE - {"resume"})
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        allowed = ", ".join("--" + name.replace("_", "-") for name in sorted(RESUMABLE))
        raise ConfigError(f"{flags} cannot change when resuming (allowed: {allowed}); "
                          f"start a new run with --init-from to change them")
    merged = argparse.Namespace(**{**state["args"], **{k: getattr(args, k) for k in args.explicit}})
    merged.resume, merged.explicit, merged.force = args.resume, args.explicit, args.force
    if merged.steps <= state["step"]:
        raise ConfigError(
            f"{args.resume} is at step {state['step']} of {merged.steps}; pass --steps TOTAL above {state['step']}"
        )
    return merged


# --- Memory and time, told before the run starts ------------------------------------------


def estimate_step_memory(model: BDH, batch_size: int, block_size: int, dtype=mx.float32) -> int:
    """Bytes a training step needs, roughly: weights with their gradients and AdamW moments, plus activations.

    Calibrated against ``mx.get_peak_memory`` on the CPU (within about 1.2x): per layer the parallel form
    holds about 6 (B, nh, T, N) and 2 (B, nh, T, T) arrays for the backward pass, the chunked form about 4
    (B, nh, T, N) arrays plus its per-chunk states.
    """
    c = model.config
    B, T, L, nh, N, D = batch_size, block_size, c.n_layer, c.n_head, c.n_neurons, c.n_embd
    size = 4 if dtype == mx.float32 else 2
    weights = 4 * 4 * c.num_parameters
    if model.attention_form(T, cached=False) == "parallel":
        activations = L * B * nh * T * (6 * N + 2 * T + 4 * D) * size
    else:
        C = min(c.chunk_size, T)
        activations = L * B * nh * T * (4 * N + 4 * D) * size + 2 * B * nh * -(-T // C) * N * D * 4
    return weights + activations


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, args, world: int):
    need = estimate_step_memory(model, args.batch_size // world, args.block_size, COMPUTE_DTYPES[args.dtype])
    have = machine_memory()
    if need > 0.9 * have and not args.force:
        raise ConfigError(f"a training step needs about {need / 2**30:.1f} GiB but this machine has "
                          f"{have / 2**30:.1f} GiB; use a smaller --batch-size (with --grad-accum), --block-size or "
                          f"preset, or --force to try anyway")
    return need


def format_duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


# --- The run ---------------------------------------------------------------------------


def model_config(args) -> BDHConfig:
    overrides = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    return BDHConfig.from_preset(args.preset or DEFAULT_PRESET, **overrides)


def build_model(args, resume_state, run: RunFolder) -> BDH:
    dtype = COMPUTE_DTYPES[args.dtype]
    if resume_state is not None:
        model = checkpoint.load(run.path / resume_state["model"], compute_dtype=dtype)
    elif args.init_from is not None:
        if args.preset is not None:
            raise ConfigError("--preset and --init-from exclude each other: the checkpoint holds its config")
        overrides = {f: getattr(args, a) for a, f in MODEL_FLAGS.items() if getattr(args, a) is not None}
        model = checkpoint.load(args.init_from, compute_dtype=dtype, **overrides)
    else:
        mx.random.seed(args.seed)
        model = BDH(model_config(args), compute_dtype=dtype)
        mx.eval(model.parameters())
    return model.train()


def open_wandb(args):
    if args.wandb is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def random_key() -> list:
    return [int(k) for k in mx.random.state[0].tolist()]


def set_random_key(key: list):
    """Restore the global MLX key: ``mx.random.seed(s)`` sets the key to (s >> 32, s & 0xffffffff)."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def sample_text(model: BDH, args) -> str:
    """A short sample with dropout off; the training randomness is saved and restored around it.

    An instruction-tuned model's sample ends at its end-of-response marker, as ``chat`` would end it.
    """
    from bdh_mlx.inference.generate import generate

    template = model.config.prompt_template
    key = random_key()
    try:
        with eval_mode(model):
            return generate(model, args.sample_prompt, max_tokens=args.sample_tokens, temperature=0.8, top_k=50,
                            seed=args.seed, stop=() if template is None else [template["end"]])
    finally:
        set_random_key(key)


def is_finite(model: BDH) -> bool:
    return all(mx.all(mx.isfinite(p)).item() for _, p in tree_flatten(model.parameters()))


class StopFlag:
    """Ctrl-C during training, answered at once even while the main thread is inside a long step.

    Python runs signal handlers only between bytecodes, so a step of minutes would hide Ctrl-C until it ends.
    The C-level handler also writes the signal to a wakeup socket (``signal.set_wakeup_fd``), which a watcher
    thread reads: the first Ctrl-C is acknowledged at once and asks the loop to save after this step; a second
    one stops the process at once without saving (every checkpoint on disk stays intact).
    """

    def __init__(self, prog: str = PROG):
        self.requested, self.prog = False, prog

    def say(self, text):
        tqdm.write(f"{self.prog}: {text}", file=sys.stderr)

    def __enter__(self):
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self.previous = signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts
        threading.Thread(target=self._watch, name="bdh-mlx-ctrl-c", daemon=True).start()
        return self

    def _watch(self):
        while data := self._read.recv(64):
            if signal.SIGINT in data:
                self._interrupt()

    def _interrupt(self):
        if not self.requested:
            self.requested = True
            self.say("Ctrl-C: finishing this step, then saving (press Ctrl-C again to stop without saving)")
            return
        self.say("stopped without saving; the checkpoints on disk are intact")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGINT, self.previous)
        self._write.close()  # ends the watcher
        self._read.close()


@dataclass
class LossMeter:
    """Training losses summed on the device, read (one host sync) on logging steps."""

    tokens_per_step: int
    total: mx.array = field(default_factory=lambda: mx.array(0.0))
    count: int = 0
    since: tuple = (0, 0.0)  # (step, time) of the last read

    def add(self, loss):
        self.total, self.count = self.total + loss, self.count + 1

    def read(self, step: int, grad_norm) -> dict:
        loss, norm = self.total.item() / max(self.count, 1), grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            steps = f"at step {step}" if step == self.since[0] + 1 else f"in steps {self.since[0] + 1}-{step}"
            raise TrainingError(f"the loss became {loss} (grad norm {norm}) {steps}")
        now = time.perf_counter()
        tokens_per_sec = (step - self.since[0]) * self.tokens_per_step / max(now - self.since[1], 1e-9)
        self.total, self.count, self.since = mx.array(0.0), 0, (step, now)
        return {"train_loss": loss, "grad_norm": norm, "tokens_per_sec": tokens_per_sec}


class Trainer:
    """One run: the model, optimizer, data and run folder, and one method each to step, evaluate, save and log.

    ``loss``, ``inputs`` (the token ids of a batch, for the sparsity) and ``sampler`` are what a run trains on,
    ``prog`` the command that runs it (``bdh-mlx finetune`` passes its own).
    """

    def __init__(self, args, run: RunFolder, resume_state, model: BDH, sampler, val_batches, loss=loss_fn,
                 source: str = "", inputs=next_byte_inputs, prog: str = PROG):
        self.args, self.run, self.model, self.sampler, self.val_batches = args, run, model, sampler, val_batches
        self.loss, self.inputs, self.prog = loss, inputs, prog
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.writer = self.rank == 0
        self.saved_args = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
        self.optimizer = make_optimizer(args)
        self.optimizer.init(model.trainable_parameters())
        self.start, self.elapsed_before, self.best = 0, 0.0, {"val_loss": math.inf, "step": None}
        if resume_state is not None:
            self.optimizer.state = run.load_optimizer_state(resume_state)
            self.optimizer.init(model.trainable_parameters())
            sampler.state = resume_state["sampler"]
            set_random_key(resume_state["random_key"])
            self.start, self.elapsed_before = resume_state["step"], resume_state["elapsed"]
            self.best = run.read_best(resume_state["best"])
        else:
            mx.random.seed(args.seed + 1)  # dropout's stream, apart from the one that initialised the weights
        self.saved_step = self.start if resume_state is not None else None
        train_loss = loss
        if self.world > 1:  # each process's dropout masks: its rows of the masks of the whole batch
            rows = args.batch_size // self.world
            train_loss = partial(loss, share=BatchShare(self.rank * rows, args.batch_size))
        self.step_fn, self.state = make_train_step(model, self.optimizer, args.grad_accum, args.grad_clip, train_loss,
                                                   self.group if self.world > 1 else None)
        self.tokens_per_step = args.grad_accum * args.batch_size * args.block_size
        self.meter = LossMeter(self.tokens_per_step)
        self.t0 = time.perf_counter()
        self.source = source
        self.bar = None
        self.wandb_run = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def say(self, text: str):
        if self.writer:
            tqdm.write(text, file=sys.stderr)

    def step(self):
        """One optimizer step on this process's share of the next global batch."""
        batches = self.sampler.sample(self.args.grad_accum)
        rows = batches.shape[1] // self.world
        local = batches[:, self.rank * rows : (self.rank + 1) * rows]
        loss, self.grad_norm = self.step_fn(mx.array(local))
        self.meter.add(loss)
        mx.eval(self.state, self.meter.total, self.grad_norm)

    def evaluate(self, step: int) -> dict:
        record = evaluate(self.model, self.val_batches, self.group if self.world > 1 else None, self.loss,
                          self.inputs)
        if not math.isfinite(record["val_loss"]):
            raise TrainingError(f"the validation loss became {record['val_loss']} at step {step}")
        if record["val_loss"] < self.best["val_loss"]:
            self.best = {"val_loss": record["val_loss"], "step": step}
            if self.writer:
                self.run.write_best(self.model, self.best)
        if self.args.sample_tokens and self.writer:
            record["sample"] = sample_text(self.model, self.args)
        x, y = np.mean(record["sparsity_x"]), np.mean(record["sparsity_y"])
        self.say(f"step {step}: val loss {record['val_loss']:.4f}, {record['val_bpb']:.4f} bits/byte, "
                 f"non-zero x {x:.3f}, y {y:.3f}" + (f"\n--- sample ---\n{record['sample']}\n---" if "sample" in
                                                     record else ""))
        return record

    def save(self, step: int, keep: bool):
        """A resume point at ``step``, unless the weights are no longer finite (then stop: never save poison)."""
        if not is_finite(self.model):
            raise TrainingError(f"the weights became NaN or Inf by step {step}")
        if self.writer:
            meta = {"random_key": random_key(), "sampler": self.sampler.state, "best": self.best,
                    "elapsed": self.elapsed(), "world_size": self.world, "args": self.saved_args}
            self.run.save_resume_point(step, self.model, self.optimizer, meta, keep)
        self.saved_step = step

    def log(self, record: dict):
        if not self.writer:
            return
        self.run.append_metrics(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "sample"}, step=record["step"])

    def tell_the_time(self, step: int, seconds_per_step: float):
        """Once, early: the measured time per step and what the whole run will take."""
        left = (self.args.steps - step) * seconds_per_step
        self.say(f"{self.prog}: {seconds_per_step:.2f} s per step; {self.args.steps - step} steps to go: about "
                 f"{format_duration(left)}")
        if mx.default_device() == mx.cpu and sys.platform == "linux" and blas.load() is None:
            self.say(f"{self.prog}: MLX uses its slow reference BLAS here (about 10x slower): "
                     f"pip install 'bdh-mlx[cpu]' gives it OpenBLAS; bdh-mlx info shows the BLAS in use")
        if left > 86400 or (left > 3600 and mx.default_device() == mx.cpu):
            self.say(f"{self.prog}: that is long for this machine ({mx.default_device()}); consider a smaller "
                     f"--preset, fewer --steps or a smaller --batch-size, or a GPU")

    def kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"the last good checkpoint is {self.run.path / 'last.npz'} (step {self.saved_step})"


def train_loop(t: Trainer, stop: StopFlag) -> dict:
    """The loop: step, and on logging steps read the losses, evaluate, save and log."""
    args, record, timed = t.args, {}, None
    with tqdm(total=args.steps, initial=t.start, unit="step", dynamic_ncols=True,
              disable=args.no_progress or not t.writer, mininterval=0.1 if sys.stderr.isatty() else 30) as t.bar:
        t.meter.since = (t.start, time.perf_counter())
        for step in range(t.start + 1, args.steps + 1):
            if stop.requested:
                if t.saved_step != step - 1:
                    t.save(step - 1, keep=False)
                t.say(f"{t.prog}: stopped at step {step - 1}; saved {t.run.path / 'last.npz'}; "
                      f"continue with: {t.prog} --resume {t.run.path}")
                raise KeyboardInterrupt
            t.step()
            t.bar.update(1)
            if step == t.start + 1:
                timed = (step, time.perf_counter())  # the first step compiles: time from the end of it
            elif step == min(t.start + 4, args.steps):
                t.tell_the_time(step, (time.perf_counter() - timed[1]) / (step - timed[0]))
            final = step == args.steps
            evaluating = final or (args.eval_every and step % args.eval_every == 0)
            saving = final or (args.save_every and step % args.save_every == 0)
            if not (evaluating or saving or step % args.log_every == 0 or step == 1):
                continue
            record = {"step": step, **t.meter.read(step, t.grad_norm), "lr": t.optimizer.learning_rate.item()}
            if evaluating:
                record.update(t.evaluate(step))
            record.update(elapsed=t.elapsed(), world_size=t.world)
            if saving:
                t.save(step, keep=bool(args.save_every and step % args.save_every == 0))
            t.log(record)
    return record


def prepare_run(args, build=build_model):
    """Check everything, then take the run folder: ``(args, run, resume_state, model)``.

    Nothing is written before all the options are known to be usable.
    """
    if args.resume is not None:
        run = RunFolder(args.resume)
        if not run.path.is_dir():
            raise ConfigError(f"{run.path}: no such run folder")
        resume_state = run.read_resume_state()
        if resume_state is None:
            started = run.read_start()
            if started is None:
                raise ConfigError(f"{run.path}: no resume state (no last.json); start a fresh run with --out instead")
            resume_state = {"step": 0, "args": started}  # killed before its first checkpoint: start it over
        args = resume_args(args, resume_state)
        if resume_state["step"] == 0:
            resume_state = None
    else:
        resume_state = None
        run = RunFolder(args.out or Path("checkpoints_mlx") / (args.run_name or time.strftime("%Y%m%d-%H%M%S")))
        if run.holds_run():
            raise ConfigError(f"{run.path} already holds a run; continue it with --resume {run.path}, "
                              f"or choose another --out")
        run.check_usable()
    check_args(args)
    world = mx.distributed.init().size()
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} does not split over {world} processes")
    open_wandb(args)
    model = build(args, resume_state, run)
    check_memory(model, args, world)
    return args, run, resume_state, model


def train(args) -> dict:
    """Run (or resume) training as ``args`` describe; returns the last metrics record."""
    args, run, resume_state, model = prepare_run(args)
    corpus = load_corpus(args, args.cache_dir or default_cache_dir(run.path))
    corpus.check_block_size(args.block_size)
    sampler = BatchSampler(corpus.train, args.batch_size, args.block_size, args.seed)
    val_batches = eval_batches(corpus.val, args.batch_size, args.block_size, args.eval_batches)
    return run_training(args, run, resume_state, model, sampler, val_batches, loss_fn, corpus.source)


def run_training(args, run, resume_state, model, sampler, val_batches, loss, source, inputs=next_byte_inputs,
                 prog=PROG, try_args='--prompt "The " --max-tokens 200') -> dict:
    """Lock the folder and train: the part ``train`` and ``finetune`` share.

    ``inputs`` and ``prog``: see ``Trainer``; ``try_args``: the generate options the closing lines suggest.
    """
    writer = mx.distributed.init().rank() == 0
    if writer:
        run.lock()
    try:
        if writer:
            run.truncate_metrics(0 if resume_state is None else resume_state["step"])
            if resume_state is None:
                run.write_start({k: v for k, v in vars(args).items() if k not in NOT_SAVED})
        t = Trainer(args, run, resume_state, model, sampler, val_batches, loss, source, inputs, prog)
        announce(t)
        wandb = open_wandb(args)
        if wandb is not None and writer:
            t.wandb_run = wandb.init(project=args.wandb, name=run.path.name, dir=str(run.path), config=t.saved_args)
        try:
            with StopFlag(prog) as stop:
                record = train_loop(t, stop)
        except TrainingError as e:
            raise TrainingError(f"{e}; stopped, {t.kept()}") from None
        finally:
            if t.wandb_run is not None:
                t.wandb_run.finish()
    finally:
        run.unlock()
    summarise(t, try_args)
    return record


def announce(t: Trainer):
    """The first line of a run: what is trained, on what, in how big steps, and where it is saved."""
    args, config = t.args, t.model.config
    where = f"resuming at step {t.start}" if t.start else "starting"
    need = estimate_step_memory(t.model, args.batch_size // t.world, args.block_size, COMPUTE_DTYPES[args.dtype])
    processes = f", {t.world} processes" if t.world > 1 else ""
    t.say(f"{t.prog}: {where}: {config.num_parameters:,} parameters, {t.source}; {t.tokens_per_step:,} tokens "
          f"per step{processes}, about {need / 2**30:.2f} GiB per step; run folder {t.run.path}")


def summarise(t: Trainer, try_args: str):
    """The closing lines: time, best validation loss, where the checkpoints are, what to run next."""
    if t.best["step"] is None:
        return
    best = t.run.path / "best.npz"
    t.say(f"{t.prog}: done: {t.args.steps} steps in {format_duration(t.elapsed())}; best val loss "
          f"{t.best['val_loss']:.4f} ({t.best['val_loss'] / math.log(2):.4f} bits/byte) at step {t.best['step']}\n"
          f"  checkpoints: {best}, {t.run.path / 'last.npz'}\n"
          f"  try: bdh-mlx generate --checkpoint {best} {try_args}")


def main(argv=None) -> int:
    return run_command(PROG, parse_args, train, argv)
