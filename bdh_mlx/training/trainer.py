"""The training library: ``train(model, optimizer, train_set, val_set, args)``, in the shape of mlx-lm's trainer.

The step follows mlx-lm: ``value_and_grad`` inside ``mx.compile`` over
``[model.state, optimizer.state, mx.random.state]``; losses stay arrays and are read on
logging steps only. Under ``mlx.launch -n N`` the global batch is split across N processes
and the gradients are averaged inside the step (``mx.distributed``); rank 0 alone writes.
A run lives in a folder (``run_folder.py``) with evaluations, checkpoints and an exact resume point.
``bdh-mlx train`` and ``bdh-mlx finetune`` are thin commands over this module.

    model = BDH(BDHConfig.from_preset("tiny"))
    optimizer = make_optimizer(make_schedule(3e-3, steps=200))
    corpus = load_corpus("data_cache", data="corpus.txt")
    train(model, optimizer, BatchSampler(corpus.train, 8, 64, seed=0), eval_batches(corpus.val, 8, 64, 10),
          TrainingArgs(steps=200, out="runs/tiny"))
"""

import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from bdh_mlx import blas
from bdh_mlx.errors import BDHError, ConfigError
from bdh_mlx.model import BDH, BatchShare
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import eval_mode
from bdh_mlx.training.evaluate import evaluate, next_byte_inputs, next_byte_loss
from bdh_mlx.training.run_folder import RunFolder

PROG = "bdh-mlx train"  # the name in the messages of a run (``bdh-mlx finetune`` passes its own)


@dataclass
class TrainingArgs:
    """How long to train, how often to evaluate, save and log, and where the run folder is."""

    out: str | None = None  # the run folder; None: checkpoints_mlx/<start time>
    steps: int = 3000  # total optimizer steps (when resuming: the new total)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # clip the global gradient norm to this
    seed: int = 0  # the dropout stream (seed + 1) and the evaluation samples
    eval_every: int = 250  # steps between evaluations; 0: only at the end
    save_every: int = 1000  # steps between kept checkpoints; 0: only last.npz
    log_every: int = 10  # steps between loss reads
    sample_tokens: int = 200  # bytes sampled at each evaluation
    sample_prompt: str = "\n"
    resume: bool = False  # continue the run in ``out`` from its last resume point
    progress: bool = True  # a progress bar
    wandb: str | None = None  # also log to this Weights & Biases project


class TrainingError(BDHError):
    """The run cannot go on (e.g. the loss became NaN)."""


# --- The compiled step, the optimizer and its schedule -------------------------------------


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


def make_train_step(model: BDH, optimizer: optim.Optimizer, grad_accum: int = 1, max_grad_norm: float | None = None,
                    loss=next_byte_loss, group=None):
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


def make_schedule(lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0,
                  decay_steps: int | None = None, min_lr: float = 0.0):
    """Constant, cosine or linear decay to ``min_lr`` over ``decay_steps`` (default: ``steps``), after a linear
    warm-up of ``warmup_steps`` from 0."""
    if schedule == "constant":
        main = optim.linear_schedule(lr, lr, 1) if warmup_steps else lr
    elif schedule in ("cosine", "linear"):
        decay = (decay_steps or steps) - warmup_steps
        if decay <= 0:
            raise ConfigError(f"a warm-up of {warmup_steps} steps leaves no steps for the {schedule} decay "
                              f"(--warmup-steps against --decay-steps or --steps)")
        if schedule == "cosine":
            main = optim.cosine_decay(lr, decay, end=min_lr)
        else:
            main = optim.linear_schedule(lr, min_lr, decay)
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; use constant, cosine or linear")
    if not warmup_steps:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def make_optimizer(learning_rate, weight_decay: float = 0.1) -> optim.AdamW:
    """AdamW with PyTorch semantics: bias-corrected moments, decoupled weight decay, eps 1e-8.

    ``learning_rate``: a number or a schedule (``make_schedule``).
    """
    return optim.AdamW(learning_rate=learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=weight_decay,
                       bias_correction=True)


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


def format_duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


# --- The run ---------------------------------------------------------------------------


def open_run(args: TrainingArgs) -> tuple:
    """``(run folder, resume state or None)``, checked before anything is written.

    Resuming a run that stopped before its first resume point starts it over (state None).
    """
    run = RunFolder(args.out or Path("checkpoints_mlx") / time.strftime("%Y%m%d-%H%M%S"))
    if not args.resume:
        if run.holds_run():
            raise ConfigError(f"{run.path} already holds a run; resume it, or choose another run folder")
        run.check_usable()
        return run, None
    if not run.path.is_dir():
        raise ConfigError(f"{run.path}: no such run folder")
    state = run.read_resume_state()
    if state is None and run.read_start() is None:
        raise ConfigError(f"{run.path}: no resume state (no last.json); start a fresh run with --out instead")
    return run, state


def open_wandb(project):
    """The ``wandb`` module when logging to a ``project`` (None: no logging)."""
    if project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def check_same_run(group, run: RunFolder, start: int, record: dict):
    """Every process must train this run from this step, or none may start.

    ``mlx.launch`` rings find each other by port: processes of two launches on the same ports (its default
    is fixed) can join one ring, where their gradients would silently mix. This all-gather of a digest of
    (run folder, start step, options) refuses that, and is the barrier before rank 0 writes.
    """
    if group.size() == 1:
        return
    text = json.dumps([str(run.path.resolve()), start, record], sort_keys=True, default=str)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:3], "big")  # exact in any dtype
    everyone = mx.distributed.all_gather(mx.array([digest], dtype=mx.int32), group=group).tolist()
    if len(set(everyone)) > 1:
        raise TrainingError(f"the {group.size()} processes are not all training {run.path} from step {start} "
                            f"(another launch on the same ports? give each its own mlx.launch --starting-port)")


def random_key() -> list:
    return [int(k) for k in mx.random.state[0].tolist()]


def set_random_key(key: list):
    """Restore the global MLX key: ``mx.random.seed(s)`` sets the key to (s >> 32, s & 0xffffffff)."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def sample_text(model: BDH, args: TrainingArgs) -> str:
    """``args.sample_tokens`` bytes after ``args.sample_prompt``, dropout off; the training randomness is saved
    and restored around it. An instruction-tuned model's sample ends at its end-of-response marker, as
    ``chat`` would end it.
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

    ``train_set`` samples the batches (``sample(n_micro)``, with a ``state`` saved for an exact resume),
    ``val_set`` holds the fixed validation batches; ``loss(model, batch, share=None)`` is the objective and
    ``inputs(batch)`` the token ids of a batch (for the sparsity); ``record`` the options saved with the run.
    """

    def __init__(self, model: BDH, optimizer, train_set, val_set, args: TrainingArgs, run: RunFolder, resume_state,
                 loss, inputs, record: dict, prog: str = PROG):
        self.model, self.optimizer, self.sampler, self.val_batches = model, optimizer, train_set, val_set
        self.args, self.run, self.loss, self.inputs, self.saved_args, self.prog = args, run, loss, inputs, record, prog
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.writer = self.rank == 0
        model.train()
        optimizer.init(model.trainable_parameters())
        self.start, self.elapsed_before, self.best = 0, 0.0, {"val_loss": math.inf, "step": None}
        if resume_state is not None:
            self.restore(resume_state)
        else:
            mx.random.seed(args.seed + 1)  # dropout's stream, apart from the one that initialised the weights
        self.saved_step = self.start if resume_state is not None else None
        train_loss = loss
        if self.world > 1:  # each process's dropout masks: its rows of the masks of the whole batch
            rows = train_set.batch_size // self.world
            train_loss = partial(loss, share=BatchShare(self.rank * rows, train_set.batch_size))
        self.step_fn, self.state = make_train_step(model, optimizer, args.grad_accum, args.grad_clip, train_loss,
                                                   self.group if self.world > 1 else None)
        self.tokens_per_step = args.grad_accum * train_set.batch_size * train_set.block_size
        self.meter = LossMeter(self.tokens_per_step)
        self.t0 = time.perf_counter()
        self.bar = self.wandb_run = None

    def restore(self, state: dict):
        """Continue from a resume point: its weights, optimizer moments, data order, random key and step."""
        saved = checkpoint.load(self.run.path / state["model"])
        if saved.config != self.model.config:
            raise ConfigError(f"{self.run.path}: the model differs from the run's ({saved.config})")
        self.model.update(saved.parameters())
        self.optimizer.state = self.run.load_optimizer_state(state)
        self.optimizer.init(self.model.trainable_parameters())
        self.sampler.state = state["sampler"]
        set_random_key(state["random_key"])
        self.start, self.elapsed_before = state["step"], state["elapsed"]
        self.best = self.run.read_best(state["best"])

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
              disable=not args.progress or not t.writer, mininterval=0.1 if sys.stderr.isatty() else 30) as t.bar:
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


def announce(t: Trainer, source: str):
    """The first line of a run: what is trained, on what, in how big steps, and where it is saved."""
    config, sampler = t.model.config, t.sampler
    where = f"resuming at step {t.start}" if t.start else "starting"
    need = estimate_step_memory(t.model, sampler.batch_size // t.world, sampler.block_size, t.model.compute_dtype)
    processes = f", {t.world} processes" if t.world > 1 else ""
    t.say(f"{t.prog}: {where}: {config.num_parameters:,} parameters, {source}; {t.tokens_per_step:,} tokens "
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


def default_record(args: TrainingArgs, train_set) -> dict:
    """The options saved with a run started from Python: the arguments and the batch shape."""
    return {**asdict(args), "out": str(args.out), "batch_size": train_set.batch_size,
            "block_size": train_set.block_size}


def train(model: BDH, optimizer, train_set, val_set, args: TrainingArgs | None = None, loss=next_byte_loss,
          inputs=next_byte_inputs, *, record: dict | None = None, source: str = "the training set", prog: str = PROG,
          try_args: str = '--prompt "The " --max-tokens 200') -> dict:
    """Train ``model`` (or resume its run, ``args.resume``) as ``args`` say; returns the last metrics record.

    ``train_set``: a sampler of training batches (``BatchSampler``: random crops of a byte corpus);
    ``val_set``: the fixed validation batches (n, B, ...) (``eval_batches``); ``loss(model, batch, share=None)``
    the objective and ``inputs(batch)`` a batch's token ids (defaults: next-byte prediction). ``record``: the
    options saved in the run folder (default: ``args`` and the batch shape); ``source`` names the data in the
    first line, ``prog`` the command in the messages, ``try_args`` the generate options of the closing lines.
    """
    args = TrainingArgs() if args is None else args
    if model.config.quantization is not None:
        raise ConfigError("a quantized model cannot be trained (its weights are rounded, for generating only); "
                          "train the float model it was quantized from")
    group = mx.distributed.init()
    if train_set.batch_size % group.size():
        raise ConfigError(f"the batch size {train_set.batch_size} does not split over {group.size()} processes")
    run, resume_state = open_run(args)
    wandb = open_wandb(args.wandb)
    record = default_record(args, train_set) if record is None else record
    t = Trainer(model, optimizer, train_set, val_set, args, run, resume_state, loss, inputs, record, prog)
    check_same_run(group, run, t.start, record)
    if t.writer:
        run.lock()
    try:
        if t.writer:
            run.truncate_metrics(t.start)
            if resume_state is None:
                run.write_start(record)
        announce(t, source)
        if wandb is not None and t.writer:
            t.wandb_run = wandb.init(project=args.wandb, name=run.path.name, dir=str(run.path), config=record)
        try:
            with StopFlag(prog) as stop:
                last = train_loop(t, stop)
        except TrainingError as e:
            raise TrainingError(f"{e}; stopped, {t.kept()}") from None
        finally:
            if t.wandb_run is not None:
                t.wandb_run.finish()
    finally:
        run.unlock()
    summarise(t, try_args)
    return last
