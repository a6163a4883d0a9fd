"""``bdh-mlx finetune``: instruction fine-tuning with the training loop of ``bdh-mlx train``.

Examples are read from JSON lines / JSON / parquet files, a folder with ``train`` and ``valid`` files,
or a Hugging Face dataset, and normalised to Alpaca's (instruction, input, output):

    Alpaca   instruction, input, output
    Dolly    instruction, context, response (category dropped; a non-empty context is appended to the
             instruction as ``instruction + "\\n\\n**Context:**\\n" + context``, as the official BDH code does)
    mlx-lm   prompt, completion (the prompt becomes the instruction)
    chat     messages: one example per assistant message that answers a user message; the user message is
             the instruction and the turns before it (``template.history_text``) the input

Each example becomes ``prompt + output + end`` in the template (``template.ALPACA_TEMPLATE``), which is
stored in the fine-tuned checkpoints. The loss is the cross-entropy of the output and end bytes only
(prompt bytes and padding are masked), averaged over those bytes. Whole examples are packed into blocks of
``block_size + 1`` bytes; an example longer than that loses the start of its prompt.
"""

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bdh_mlx.arguments import (
    ArgumentParser,
    add_batch_arguments,
    non_negative_float,
    number_in,
    positive_int,
    run_command,
)
from bdh_mlx.errors import ConfigError, DataError
from bdh_mlx.inference.template import ALPACA_TEMPLATE, format_prompt, history_text
from bdh_mlx.model import ATTENTION_FORMS
from bdh_mlx.training import options as opts
from bdh_mlx.training import trainer
from bdh_mlx.training.data import BatchSampler, open_dataset

PROG = "bdh-mlx finetune"
CONTEXT_HEADER = "\n\n**Context:**\n"
FILE_TYPES = (".jsonl", ".json", ".parquet")
VALID_NAMES = ("valid", "validation", "val")
FORMATS = {  # name -> the columns that identify it, checked in this order
    "chat": {"messages"},
    "alpaca": {"instruction", "output"},
    "dolly": {"instruction", "response"},
    "completion": {"prompt", "completion"},
}
EXPECTED = ("instruction/input/output (Alpaca), instruction/context/response (Dolly), prompt/completion (mlx-lm) "
            "or messages (chat)")


@dataclass
class Example:
    instruction: str
    input: str
    output: str


# --- Reading and normalising -----------------------------------------------------------


def warn(text: str):
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def detect_format(columns, source: str) -> str:
    """The format whose columns are all present; a clear error listing what was found otherwise."""
    for name, needed in FORMATS.items():
        if needed <= set(columns):
            return name
    found = ", ".join(sorted(columns)) or "none"
    raise DataError(f"{source}: no usable columns (found: {found}); expected {EXPECTED}")


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    return "" if value is None else str(value)


def from_messages(messages) -> list:
    """One example per assistant message that follows a user message (see the module docstring)."""
    examples = []
    for i, message in enumerate(messages):
        if i and message.get("role") == "assistant" and messages[i - 1].get("role") == "user":
            examples.append(Example(_text(messages[i - 1], "content"), history_text(messages[: i - 1]),
                                    _text(message, "content")))
    return examples


def convert_record(record: dict, fmt: str) -> list:
    """The examples (usually one) of a record in format ``fmt``."""
    if fmt == "chat":
        return from_messages(record["messages"] or [])
    if fmt == "alpaca":
        return [Example(_text(record, "instruction"), _text(record, "input"), _text(record, "output"))]
    if fmt == "dolly":
        instruction, context = _text(record, "instruction"), _text(record, "context")
        if context:
            instruction += CONTEXT_HEADER + context
        return [Example(instruction, "", _text(record, "response"))]
    return [Example(_text(record, "prompt"), "", _text(record, "completion"))]


def normalise(records: list, source: str) -> tuple:
    """``(examples, format)``: the records converted, skipping those without an output (counted in a warning)."""
    if not records:
        raise DataError(f"{source}: no examples (the data is empty)")
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{source}: every example must be a JSON object with named fields")
    fmt = detect_format(records[0].keys(), source)
    examples = []
    for number, record in enumerate(records, start=1):
        try:
            examples += convert_record(record, fmt)
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{source}: example {number} does not have the {fmt} format of the first one") from None
    usable = [e for e in examples if e.output]
    if not usable:
        raise DataError(f"{source}: none of the {len(examples)} examples has a response")
    if len(usable) < len(examples):
        warn(f"{source}: skipped {len(examples) - len(usable)} examples with an empty response")
    return usable, fmt


def parse_json(text: str, where: str):
    """One JSON value that holds only text UTF-8 can encode; a one-line DataError naming ``where`` otherwise."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: holds {e.object[e.start]!r}, a lone surrogate, which is not text") from None
    except ValueError as e:  # malformed JSON, or a number too long to read (over 4300 digits)
        reason = str(e).splitlines()[0][:200]
        raise DataError(f"{where}: not valid JSON ({reason})") from None
    return value


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a one-line DataError naming the line of the first invalid byte otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") \
            from None


def read_file(path: Path) -> list:
    """The records of a JSON lines, JSON (a list of objects) or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return open_dataset(str(path), "train").to_list()
    if suffix not in FILE_TYPES:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(FILE_TYPES)}")
    text = read_text(path)
    if suffix == ".json":
        records = parse_json(text, str(path)) if text.strip() else []
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json file must hold a list of examples")
        return records
    return [parse_json(line, f"{path}: line {number}")
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def folder_files(folder: Path) -> tuple:
    """``(train file, validation file or None)`` of a folder like mlx-lm's (train.jsonl, valid.jsonl)."""
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in FILE_TYPES}
    if "train" not in files:
        raise DataError(f"{folder}: no train file (train.jsonl, train.json or train.parquet)")
    return files["train"], next((files[n] for n in VALID_NAMES if n in files), None)


def dataset_records(spec: str, split: str, limit) -> list:
    """The first ``limit`` rows (all when None) of a Hugging Face dataset split, as dicts."""
    ds = open_dataset(spec, split)
    return ds.select(range(min(limit or len(ds), len(ds)))).to_list()


def read_source(spec: str, split: str, val_spec, val_split, limit=None) -> tuple:
    """``(train records, validation records or None, source description, validation source)``; ``limit`` caps
    dataset reads."""
    path = Path(spec).expanduser()
    if path.is_dir():
        train_file, val_file = folder_files(path)
        val = read_file(val_file) if val_file is not None else None
        train_records, source, val_source = read_file(train_file), str(path), str(val_file)
    elif path.is_file():
        train_records, val, source, val_source = read_file(path), None, str(path), None
    elif spec.startswith((".", "/", "~")) or path.suffix.lower() in FILE_TYPES:
        raise DataError(f"{spec}: no such file or folder")
    else:
        train_records, source = dataset_records(spec, split, limit), f"dataset {spec} [{split}]"
        val = dataset_records(spec, val_split, limit) if val_split is not None else None
        val_source = f"dataset {spec} [{val_split}]"
    if val_spec is not None:
        val, val_source = read_file(Path(val_spec).expanduser()), val_spec
    return train_records, val, source, val_source


@dataclass
class InstructionData:
    train: list
    val: list
    format: str
    source: str


def load_examples(args) -> InstructionData:
    """The training and validation examples the data options name, normalised; ``--max-examples`` caps both."""
    records, val_records, source, val_source = read_source(args.data, args.split, args.val_data, args.val_split,
                                                           args.max_examples)
    cap = slice(args.max_examples)
    train_examples, fmt = normalise(records[cap], source)
    rng = np.random.Generator(np.random.PCG64(args.seed))
    if val_records is None:
        if len(train_examples) < 2:
            raise DataError(f"{source}: {len(train_examples)} example; need at least 2 to hold some out for "
                            f"validation (or give --val-data)")
        order = rng.permutation(len(train_examples))
        n_val = min(max(1, round(len(order) * args.val_fraction)), len(order) - 1)
        val_examples = [train_examples[i] for i in order[:n_val]]
        train_examples = [train_examples[i] for i in order[n_val:]]
    else:
        val_examples = normalise(val_records[cap], f"{val_source} (validation)")[0]
        train_examples = [train_examples[i] for i in rng.permutation(len(train_examples))]
    return InstructionData(train_examples, val_examples, fmt, source)


# --- Tokens, masks and blocks --------------------------------------------------------------


def encode(example: Example, template: dict, length: int) -> tuple:
    """``(tokens, mask, cut)``: the example's bytes, 1 where a byte is a target (output and end marker),
    and how the example was shortened to ``length`` bytes: 0 not at all, 1 prompt start dropped,
    2 the output itself cut (the prompt is gone too).
    """
    prompt = format_prompt(template, example.instruction, example.input).encode("utf-8")
    response = (example.output + template["end"]).encode("utf-8")
    cut = 0
    excess = len(prompt) + len(response) - length
    if excess > 0:
        cut = 1 if excess <= len(prompt) else 2
        prompt, response = prompt[min(excess, len(prompt)) :], response[:length]
    tokens = np.frombuffer(prompt + response, dtype=np.uint8)
    mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)])
    return tokens, mask, cut


def pack(examples: list, template: dict, block_size: int, what: str = "") -> np.ndarray:
    """Whole examples packed in order into rows of ``block_size + 1`` bytes: (rows, 2, block_size + 1) uint8.

    ``[:, 0]`` holds the bytes (padding 0), ``[:, 1]`` the mask (padding 0). Truncations are counted in a warning.
    """
    length = block_size + 1
    rows, row, used, cuts = [], np.zeros((2, length), np.uint8), 0, [0, 0, 0]
    for example in examples:
        tokens, mask, cut = encode(example, template, length)
        cuts[cut] += 1
        if used + len(tokens) > length:
            rows.append(row)
            row, used = np.zeros((2, length), np.uint8), 0
        row[0, used : used + len(tokens)], row[1, used : used + len(tokens)] = tokens, mask
        used += len(tokens)
    rows.append(row)
    if cuts[1] or cuts[2]:
        warn(f"{cuts[1] + cuts[2]} of {len(examples)} {what}examples are longer than "
             f"--block-size + 1 = {length} bytes: their prompts were truncated from the start"
             + (f" ({cuts[2]} lost their whole prompt and the end of the response)" if cuts[2] else ""))
    return np.stack(rows)


def response_loss(model, batch, share=None) -> mx.array:
    """Mean cross-entropy over the target bytes (mask 1) of a (B, 2, T + 1) batch of bytes and masks."""
    batch = batch.astype(mx.int32)
    tokens, weights = batch[:, 0], batch[:, 1, 1:]
    logits, _ = model(tokens[:, :-1], share=share)
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    return (losses * weights).sum() / mx.maximum(weights.sum(), 1)


def response_inputs(batch: np.ndarray) -> np.ndarray:
    """The input bytes of a (B, 2, T + 1) batch."""
    return batch[:, 0, :-1]


class RowSampler(BatchSampler):
    """Random packed rows (with replacement); the generator state is saved for an exact resume."""

    def sample(self, n_micro: int = 1) -> np.ndarray:
        """(n_micro, batch_size, 2, block_size + 1) uint8."""
        picks = self.rng.integers(0, len(self.data), size=n_micro * self.batch_size)
        return self.data[picks].reshape(n_micro, self.batch_size, *self.data.shape[1:])


def val_batches(rows: np.ndarray, batch_size: int, n_batches: int) -> np.ndarray:
    """Every validation row once (cycling to fill the last batch), at most ``n_batches`` batches."""
    n = min(n_batches, -(-len(rows) // batch_size))
    return rows[np.arange(n * batch_size) % len(rows)].reshape(n, batch_size, *rows.shape[1:])


# --- Command line ------------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(prog=PROG, description="Fine-tune a BDH checkpoint on instruction/response pairs "
                             "(Alpaca, Dolly, prompt/completion or chat messages), or resume a fine-tune.")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of option values; flags override it")
    model = p.add_argument_group("model (the checkpoint's config, except for these)")
    model.add_argument("--init-from", "--model", dest="init_from", metavar="CKPT_OR_REPO",
                       help="the checkpoint to fine-tune: .npz path, mlx-lm model folder or Hub repo id "
                       "org/name[@revision] (required; --model is mlx-lm's spelling)")
    model.add_argument("--dropout", type=non_negative_float, help="dropout on x * y")
    model.add_argument("--attention", choices=ATTENTION_FORMS, help="attention form (auto, parallel, chunked)")
    model.add_argument("--chunk-size", type=positive_int, help="tokens per chunk of the chunked form")
    p.set_defaults(preset=None, **{flag: None for flag in opts.MODEL_FLAGS})  # the shape is the checkpoint's
    data = p.add_argument_group("instruction data")
    data.add_argument("--data", metavar="FILE_OR_DATASET", help="a .jsonl/.json/.parquet file, a folder with "
                      "train and valid files, or a Hugging Face dataset name (e.g. tatsu-lab/alpaca)")
    data.add_argument("--val-data", metavar="FILE", help="validation examples (default: a folder's valid file, "
                      "else --val-fraction of --data)")
    data.add_argument("--split", default="train", help="dataset split to train on")
    data.add_argument("--val-split", help="dataset split for validation (default: --val-fraction of --split)")
    data.add_argument("--val-fraction", type=number_in(0, 1, lo_open=True, hi_open=True), default=0.1,
                      help="share of the examples held out for validation when no validation data is given")
    data.add_argument("--max-examples", type=positive_int, help="use only the first N examples (quick runs)")
    add_batch_arguments(p, block_size=512, batch_size=16)
    opts.add_optimizer_arguments(p)
    opts.add_run_arguments(p, default_eval_every=100, default_save_every=500, sample_prompt_help="prompt of the "
                            "evaluation sample (default: the first validation example, templated)")
    p.set_defaults(steps=1000, lr=1e-4, sample_prompt=None)
    return p


def parse_args(argv=None):
    return opts.parse_options(build_parser, argv)


def build_model(args, resume_state, run):
    """The model to fine-tune (``--init-from``), with the template it will be trained with in its config."""
    model = opts.build_model(args, resume_state, run)
    if resume_state is None:
        model.config.prompt_template = dict(ALPACA_TEMPLATE)
    return model


def finetune(options) -> dict:
    """Run (or resume) a fine-tune as the options describe; returns the last metrics record."""
    if options.resume is None and (options.init_from is None or options.data is None):
        raise ConfigError("--init-from CKPT_OR_REPO (the model to fine-tune) and --data FILE_OR_DATASET are required")
    options, run, _, model = opts.prepare_run(options, build=build_model)
    template = model.config.prompt_template
    data = load_examples(options)
    train_rows = pack(data.train, template, options.block_size)
    val_rows = pack(data.val, template, options.block_size, "validation ")
    args = opts.training_args(options, run)
    if options.sample_prompt is None:
        args = replace(args, sample_prompt=format_prompt(template, data.val[0].instruction, data.val[0].input))
    source = (f"{len(data.train)} {data.format} examples from {data.source} in {len(train_rows)} blocks, "
              f"{len(data.val)} for validation")
    sampler = RowSampler(train_rows, options.batch_size, options.block_size, options.seed)
    batches = val_batches(val_rows, options.batch_size, options.eval_batches)
    optimizer = trainer.make_optimizer(opts.build_schedule(options), options.weight_decay)
    return trainer.train(model, optimizer, sampler, batches, args, response_loss, response_inputs,
                         record=opts.saved_options(options), source=source, prog=PROG,
                         try_args='--instruction "..."')


def main(argv=None) -> int:
    return run_command(PROG, parse_args, finetune, argv)
