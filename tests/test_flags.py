"""Every flag of generate, chat, eval, quantize, merge, the interpret commands, upload and convert reaches the library.

Each row names a command, an option (by its argparse ``dest``: every spelling of it is tried, as
``--flag value`` and ``--flag=value``), a value, what to look at after the command ran (``observe``) and the
same thing computed by calling the library with the matching keyword (``expect``). The test asserts that the
command gives what the library gives, and that without the flag it does not: a flag the command ignored
would fail. ``test_every_flag_has_a_row`` keeps the table complete as flags are added.
"""

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_RUN

from bdh_mlx import BDH, BDHConfig, cli, generate, load, quantize, save
from bdh_mlx.inference.generate import prefill
from bdh_mlx.inference.sample_utils import make_logits_processors as make_processors
from bdh_mlx.inference.template import ALPACA_TEMPLATE, format_prompt, history_text
from bdh_mlx.interpret import (
    Atlas,
    Moments,
    activation_stats,
    build_atlas,
    changing_synapses,
    concept_synapses,
    graph_summary,
    synapse_series,
    write_report,
)
from bdh_mlx.interpret.graphs import initial_model
from bdh_mlx.modeling.cache import BDHCache
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.convert import mlx_to_torch, torch_to_mlx
from bdh_mlx.storage.files import COMPUTE_DTYPES
from bdh_mlx.storage.upload import prepare_upload_folder
from bdh_mlx.tools.merge import merge
from bdh_mlx.training import data as data_module
from bdh_mlx.training.data import eval_batches, split_corpus
from bdh_mlx.training.evaluate import evaluate

TINY = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
COMMANDS = ("generate", "chat", "eval", "quantize", "merge", "inspect", "neurons", "synapses", "graphs", "upload",
            "convert")
TEXT = "the quick brown fox jumps over the lazy dog. " * 30
SYNAPSE_TEXT = "hello there, hello. " * 10  # long enough for synapses that grew at 3 bytes to be ranked


# --- The files the commands read, made once --------------------------------------------------------------


class Files:
    """Paths by name (``{ckpt}``, ``{corpus}``...): formatted into command lines with ``{out}``, a fresh folder."""

    def __init__(self, folder: Path):
        self.folder, self.runs, self.paths = folder, 0, {}

    def add(self, name, path):
        self.paths[name] = str(path)
        return path

    def fresh(self) -> Path:
        self.runs += 1
        out = self.folder / f"out{self.runs}"
        out.mkdir()
        return out

    def __getitem__(self, name):
        return self.paths[name]


def tiny_checkpoint(path, seed, **config):
    mx.random.seed(seed)
    save(BDH(BDHConfig(**{**TINY, **config})), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import datasets

    folder = tmp_path_factory.mktemp("flags")
    f = Files(folder)
    f.add("ckpt", tiny_checkpoint(folder / "a.npz", 0))
    f.add("ckpt2", tiny_checkpoint(folder / "b.npz", 1))
    f.add("wide", tiny_checkpoint(folder / "wide.npz", 2, n_embd=64))  # quantize: group sizes 32 and 64 fit
    f.add("tuned", tiny_checkpoint(folder / "tuned.npz", 3, prompt_template=dict(ALPACA_TEMPLATE)))
    f.add("tuned2", tiny_checkpoint(folder / "tuned2.npz", 4, prompt_template=dict(ALPACA_TEMPLATE)))
    f.add("corpus", folder / "corpus.txt").write_text(TEXT)
    f.add("corpus2", folder / "corpus2.txt").write_text("pack my box with five dozen liquor jugs. " * 30)
    f.add("val", folder / "val.txt").write_text("sphinx of black quartz, judge my vow. " * 10)
    splits = {"train": ["alpha beta gamma delta " * 8] * 6, "other": ["one two three four five " * 8] * 6}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        f.add("dataset", folder / "dataset"))
    f.add("columns", folder / "columns.jsonl").write_text(
        "".join(json.dumps({"text": "x" * 60, "note": f"note {i} " * 10}) + "\n" for i in range(8)))
    f.add("concept", folder / "concept.txt").write_text("red apples\n\nred roses\n\nred cars\n\nred wine\n")
    f.add("other", folder / "other.txt").write_text("blue sea\n\ngreen grass\n\nwhite snow\n\nblack coal\n")
    model = load(f["ckpt"])
    cache = model.make_cache(1)
    prefill(model, mx.array([list(b"first part, ")]), cache)
    cache.save(f.add("cache", folder / "cache.npz"))
    build_atlas(model, np.frombuffer(TEXT.encode(), np.uint8), progress=False).save(f.add("atlas", folder / "atlas"))
    f.add("pt", folder / "a.pt")  # made by the convert rows, which need PyTorch
    f.add("pt2", folder / "b.pt")
    run = folder / "run"
    assert cli.main(["train", *TINY_RUN, "--data", f["corpus"], "--out", str(run), "--steps", "2",
                     "--eval-every", "2"]) == 0
    f.add("run", run)
    return f


# --- Running a command and looking at what it did ----------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str
    folder: Path
    spied: dict = field(default_factory=dict)


@dataclass
class Spy:
    """Record the value of ``parameter`` at each call of ``owner.function`` (calling through); ``owner`` is a
    module, or ``module:Class`` for a method."""

    owner: str
    function: str
    parameter: str

    @contextlib.contextmanager
    def watching(self, monkeypatch, record: list):
        module, _, name = self.owner.partition(":")
        module = importlib.import_module(module)
        module = getattr(module, name) if name else module
        real = getattr(module, self.function)
        signature = inspect.signature(real)

        def spy(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            record.append(bound.arguments[self.parameter])
            return real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(module, self.function, spy)
            yield


def run_command(files, argv, monkeypatch, stdin="", spy=None) -> Result:
    folder = files.fresh()
    argv = [a.format(out=folder, **files.paths) for a in argv]
    out, err, spied = io.StringIO(), io.StringIO(), []
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with spy.watching(monkeypatch, spied) if spy else contextlib.nullcontext():
            code = cli.main(argv)
    return Result(code, out.getvalue(), err.getvalue(), folder, {"values": spied})


def ok(result: Result):
    """The result, or None for a command that failed (so that a failure never equals an expectation)."""
    return result if result.code == 0 else None


def stdout(result):
    return ok(result) and result.out


def spied(result):
    return ok(result) and result.spied["values"][:1]


def file_text(name):
    def observe(result):
        path = result.folder / name
        return ok(result) and path.exists() and path.read_text()
    return observe


def weights_digest(path) -> str:
    """One digest of a checkpoint's config and weights."""
    config, weights = read_checkpoint(path)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(weights):
        digest.update(name.encode() + np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()


def checkpoint_file(name):
    def observe(result):
        path = result.folder / name
        return ok(result) and path.exists() and weights_digest(path)
    return observe


# --- What the library gives ---------------------------------------------------------------------------------


def generated(files, checkpoint="ckpt", prompt="ab", echo=True, **kwargs) -> str:
    """What ``bdh-mlx generate`` prints: the prompt (unless an instruction), the text, a newline."""
    model = load(files[checkpoint])
    options = dict(max_tokens=12, temperature=1.0, seed=1) | kwargs
    return (prompt if echo else "") + generate(model, prompt, **options) + "\n"


def instructed(files, instruction="Name a colour.", input=None, **kwargs):
    model = load(files["tuned"])
    template = model.config.prompt_template
    prompt = format_prompt(template, instruction, input)
    return generated(files, "tuned", prompt, echo=False, stop=[template["end"]], temperature=0.0, **kwargs)


def chatted(files, checkpoint="tuned", history=False, **kwargs) -> str:
    """What ``bdh-mlx chat`` prints for CHAT_INPUT."""
    model = load(files[checkpoint])
    template = model.config.prompt_template
    options = dict(max_tokens=12, temperature=1.0, seed=1) | kwargs
    printed, turns = "", []
    for message in CHAT_INPUT.split():
        prompt = format_prompt(template, message, history_text(turns) if history else None)
        answer = generate(model, prompt, stop=[template["end"]], **options)
        printed += answer + "\n"
        turns += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
    return printed


def file_bytes(path) -> np.ndarray:
    return np.frombuffer(Path(path).read_bytes(), np.uint8)


def dataset_bytes(files, split="train") -> np.ndarray:
    import datasets

    rows = datasets.load_from_disk(files["dataset"])[split]["text"]
    return np.frombuffer("".join(f"{t}\n" for t in rows).encode(), np.uint8)


def evaluated(files, checkpoint="ckpt", train=None, val=None, block_size=16, batch_size=2, eval_batches_=2,
              dtype=None):
    """``(shape, loss line)`` of ``bdh-mlx eval``, from ``evaluate`` on the validation bytes."""
    model = load(files[checkpoint], compute_dtype=COMPUTE_DTYPES[dtype or "float32"])
    train = file_bytes(files["corpus"]) if train is None else train
    val = split_corpus(train, "").val if val is None else val
    batches = eval_batches(val, batch_size, block_size, eval_batches_)
    metrics = evaluate(model, batches)
    return (f"{eval_batches_} x {batch_size} x {block_size}",
            f"val loss {metrics['val_loss']:.4f} | bits per byte {metrics['val_bpb']:.4f}")


def eval_printed(result):
    if not ok(result):
        return None
    shape = re.search(r"\((\d+ x \d+ x \d+) bytes", result.out).group(1)
    return shape, next(line for line in result.out.splitlines() if line.startswith("val loss"))


def quantized(files, checkpoint="wide", bits=8, group_size=None, embedding=False):
    path = files.folder / f"q-{bits}-{group_size}-{embedding}-{checkpoint}.npz"
    save(quantize(load(files[checkpoint]), bits, group_size, embedding), path)
    return weights_digest(path)


def merged(files):
    path = files.folder / "merged.npz"
    save(merge(load(files["ckpt"]), load(files["ckpt2"])), path)
    return weights_digest(path)


def text_bytes(text=TEXT):
    return np.frombuffer(text.encode(), np.uint8)


def report(files, text="hello there", checkpoint="ckpt", max_text_bytes=None, chunk_size=256, **options) -> str:
    """The HTML ``bdh-mlx inspect --out`` writes: the statistics' moments give the z-scores, G_x is kept at 16
    edges per neuron beside the baselines of the same configuration at initialization (seed 0)."""
    path, model = files.folder / "report.html", load(files[checkpoint])
    data = text_bytes(text)[:max_text_bytes]
    options = dict(graph_edges=16, init_model=initial_model(model.config), max_bytes=2000,
                   title=f"BDH: looking inside {files[checkpoint]}") | options
    moments = Moments(model.config)
    stats = activation_stats(model, data, chunk_size, progress=False, moments=moments)
    write_report(path, model, data, stats=stats, moments=moments, chunk_size=chunk_size, progress=False, **options)
    return path.read_text()


def stats_json(files, text="hello there", max_text_bytes=None):
    return json.dumps(activation_stats(load(files["ckpt"]), text_bytes(text)[:max_text_bytes], progress=False),
                      indent=1)


def atlas_contents(atlas):
    return json.dumps(atlas.meta, sort_keys=True), {k: atlas[k].tobytes() for k in sorted(atlas.arrays)}


def atlas_in(name):
    def observe(result):
        path = result.folder / name
        return ok(result) and path.exists() and atlas_contents(Atlas.load(path))
    return observe


def atlas_expected(files, checkpoint="ckpt", data="corpus", top_k=10, context=24, max_bytes=None):
    text = file_bytes(files[data])[:max_bytes]
    return atlas_contents(build_atlas(load(files[checkpoint]), text, top_k, context, progress=False,
                                      source=files[data]))


def tracked(files, text=SYNAPSE_TEXT, synapses=None, top=5, min_steps=None, max_text_bytes=None, checkpoint="ckpt"):
    """``bdh-mlx synapses``' tracked synapses and their final strengths: ``--track``, or else the ``top`` whose
    growth varies most (``changing_synapses``)."""
    model = load(files[checkpoint])
    data = text_bytes(text)[:max_text_bytes]
    synapses = synapses or [s[:4] for s in changing_synapses(model, data, top, min_steps, progress=False)]
    series = synapse_series(model, data, synapses, progress=False)
    return [[*s, round(float(v[-1]), 6)] for s, v in zip(synapses, series, strict=True)]


def tracked_printed(result):
    if not ok(result):
        return None
    found = re.findall(r"layer (\d+) head (\d+) y(\d+) -> x(\d+): ([-\d.]+) after", result.out)
    return [[*map(int, f[:4]), round(float(f[4]), 4)] for f in found]


def rounded(rows):
    return [[*r[:4], round(r[4], 4)] for r in rows]


def concept_found(files, concept="concept", other="other", top=5):
    def texts(name):
        parts = [t.strip() for t in Path(files[name]).read_text().split("\n\n") if t.strip()]
        return parts[:-1], parts[-1:]

    (concept, held_concept), (other, held_other) = texts(concept), texts(other)
    results = concept_synapses(load(files["ckpt"]), concept, other, held_concept, held_other, top, progress=False)
    return [(r["layer"], r["head"], r["i"], r["j"]) for r in results]


def concept_printed(result):
    if not ok(result):
        return None
    return [tuple(map(int, f)) for f in re.findall(r"layer (\d+) head (\d+) y(\d+) -> x(\d+): score", result.out)]


def plain(value):
    """Summaries as JSON can hold them: arrays (the degrees) as lists, also in the baselines' nested dicts."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


def graphs(files, kind="x", top_k=None, threshold=None, edges=None, heads=None, baselines=True, seed=0,
           checkpoint="ckpt"):
    """``bdh-mlx graphs --json``: ``edges`` per neuron (the library's default: 16 N entries per head), the
    baselines (the configuration at initialization with ``seed``, the shuffle) unless ``baselines`` is False."""
    model = load(files[checkpoint])
    init = initial_model(model.config, seed) if baselines else None
    edges = edges * model.config.n_neurons if edges else None
    summaries = graph_summary(model, kind, top_k, threshold, edges, heads, init, seed)
    return json.dumps([plain(s) for s in summaries], indent=1)


def upload_card(files, run=None, license="mit", datasets=(), repo="org/name", checkpoint="ckpt"):
    folder = files.fresh()
    prepare_upload_folder(files[checkpoint], folder, repo, files[run] if run else None, license, list(datasets))
    return (folder / "README.md").read_text()


def torch_digest(path):
    import torch

    state = torch.load(path, weights_only=True)
    return hashlib.sha256(b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


def converted_to_torch(files, checkpoint="ckpt"):
    path = files.folder / f"{checkpoint}.pt"
    mlx_to_torch(files[checkpoint], path)
    return torch_digest(path)


def converted_from_torch(files, pt="pt", n_layer=2, dropout=None):
    path = files.folder / f"from-{pt}-{n_layer}-{dropout}.npz"
    torch_to_mlx(files[pt], path, n_layer, dropout)
    return weights_digest(path)


@dataclass
class HubSpy:
    """``HfApi.create_repo`` and ``upload_folder`` replaced: records their keywords, uploads nothing."""

    calls: dict = field(default_factory=dict)

    def install(self, monkeypatch):
        from huggingface_hub import HfApi

        def create_repo(api, repo_id, **kwargs):
            self.calls["create_repo"] = {"repo_id": repo_id, **kwargs}

        def upload_folder(api, **kwargs):
            self.calls["upload_folder"] = kwargs
            return type("Commit", (), {"commit_url": "url"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


# --- The table -------------------------------------------------------------------------------------------------

CHAT_INPUT = "Hello\nAgain\n"
BASE = {
    "generate": ["generate", "--model", "{ckpt}", "--prompt", "ab", "--max-tokens", "12", "--temp", "1",
                 "--seed", "1"],
    "instruction": ["generate", "--model", "{tuned}", "--instruction", "Name a colour.", "--max-tokens", "12",
                    "--temp", "0"],
    "chat": ["chat", "--model", "{tuned}", "--max-tokens", "12", "--temp", "1", "--seed", "1"],
    "eval": ["eval", "--checkpoint", "{ckpt}", "--data", "{corpus}", "--block-size", "16", "--batch-size", "2",
             "--eval-batches", "2"],
    "dataset": ["eval", "--checkpoint", "{ckpt}", "--dataset", "{dataset}", "--block-size", "16", "--batch-size",
                "2", "--eval-batches", "2"],
    "quantize": ["quantize", "--checkpoint", "{wide}", "--bits", "8", "--out", "{out}/q.npz"],
    "merge": ["merge", "{ckpt}", "{ckpt2}"],
    "inspect": ["inspect", "--checkpoint", "{ckpt}", "--text", "hello there", "--out", "{out}/r.html"],
    "inspect-file": ["inspect", "--checkpoint", "{ckpt}", "--file", "{corpus}", "--out", "{out}/r.html"],
    "inspect-json": ["inspect", "--checkpoint", "{ckpt}", "--text", "hello there", "--json", "{out}/s.json"],
    "neurons": ["neurons", "--checkpoint", "{ckpt}", "--data", "{corpus}", "--out", "{out}/atlas"],
    "synapses": ["synapses", "--checkpoint", "{ckpt}", "--text", SYNAPSE_TEXT],
    "synapses-file": ["synapses", "--checkpoint", "{ckpt}", "--file", "{corpus}"],
    "concept": ["synapses", "--checkpoint", "{ckpt}", "--concept", "{other}", "--other", "{concept}"],
    "graphs": ["graphs", "--checkpoint", "{ckpt}", "--json", "{out}/g.json"],
    "upload": ["upload", "--checkpoint", "{ckpt}", "--repo", "org/name", "--dry-run", "{out}"],
    "hub": ["upload", "--checkpoint", "{ckpt}", "--repo", "org/name"],
    "to-torch": ["convert", "--to-torch", "{ckpt}", "--out", "{out}/m.pt"],
    "from-torch": ["convert", "--from-torch", "{pt}", "--n-layer", "2", "--out", "{out}/m.npz"],
    "to-mlx-lm": ["convert", "--to-mlx-lm", "{ckpt}", "--out", "{out}/dir"],
}


@dataclass
class Row:
    base: str  # a key of BASE
    dest: str  # the option's argparse dest
    value: str | None  # None: a switch
    observe: Callable  # Result -> what the command did
    expect: Callable  # Files -> the same, from the library
    extra: tuple = ()  # more arguments for every run of the row (with and without the flag)
    spy: Spy | None = None
    hub: bool = False

    @property
    def command(self):
        return BASE[self.base][0]


PREFILL = Spy("bdh_mlx.inference.generate", "prefill", "chunk_size")
# inspect and synapses import these from the library when they run: spied where they are defined
STATS_CHUNK = Spy("bdh_mlx.interpret.stats", "activation_stats", "chunk_size")
ATLAS_CHUNK = Spy("bdh_mlx.interpret.cmd_neurons", "build_atlas", "chunk_size")
SERIES_CHUNK = Spy("bdh_mlx.interpret.synapses", "synapse_series", "chunk_size")
DTYPE = Spy("bdh_mlx.model:BDH", "__init__", "compute_dtype")
PROGRESS = Spy("bdh_mlx.interpret.synapses", "synapse_series", "progress")


def saved_cache(result):
    path = result.folder / "c.npz"
    if not (ok(result) and path.exists()):
        return None
    return [np.array(s).tobytes() for s in BDHCache.load(path).states]


def cache_after_prompt(files):
    model = load(files["ckpt"])
    cache = model.make_cache(1)
    prefill(model, mx.array([list(b"ab")]), cache)
    return [np.array(s).tobytes() for s in cache.states]


PNG = b"\x89PNG\r\n\x1a\n"


def png(name):
    def observe(result):
        path = result.folder / name
        return ok(result) and path.exists() and path.read_bytes()[:8]
    return observe


def eval_text_field(files):
    lines = Path(files["columns"]).read_text().splitlines()
    notes = "".join(json.loads(line)["note"] + "\n" for line in lines)
    return evaluated(files, train=np.frombuffer(notes.encode(), np.uint8))


def cache_files(result):
    return ok(result) and sorted(p.name for p in (result.folder / "cache").glob("*"))


def dataset_cache_name(files):
    return [data_module._cache_name("dataset", data_module._dataset_key(files["dataset"], "train", None))]


def synapses_json(result):
    path = result.folder / "s.json"
    return ok(result) and path.exists() and [[d["layer"], d["head"], d["i"], d["j"], round(d["final"], 6)]
                                             for d in json.loads(path.read_text())]


def hub_call(method, keyword):
    return lambda result: ok(result) and result.spied["hub"][method].get(keyword)


ROWS = [
    # generate
    Row("generate", "checkpoint", "{ckpt2}", stdout, lambda f: generated(f, "ckpt2")),
    Row("generate", "prompt", "xyz", stdout, lambda f: generated(f, prompt="xyz")),
    Row("generate", "max_tokens", "5", stdout, lambda f: generated(f, max_tokens=5)),
    Row("generate", "temperature", "0.3", stdout, lambda f: generated(f, temperature=0.3)),
    Row("generate", "top_k", "3", stdout, lambda f: generated(f, top_k=3)),
    Row("generate", "top_p", "0.5", stdout, lambda f: generated(f, top_p=0.5)),
    Row("generate", "min_p", "0.95", stdout, lambda f: generated(f, min_p=0.95)),
    Row("generate", "repetition_penalty", "3", stdout,
        lambda f: generated(f, temperature=0.0, logits_processors=make_processors(3.0, 20)), extra=("--temp", "0")),
    Row("generate", "repetition_context_size", "1", stdout,
        lambda f: generated(f, temperature=0.0, logits_processors=make_processors(3.0, 1)),
        extra=("--temp", "0", "--repetition-penalty", "3")),
    Row("generate", "seed", "2", stdout, lambda f: generated(f, seed=2)),
    Row("generate", "stop", "\ufffd", stdout, lambda f: generated(f, stop=["\ufffd"])),  # an invalid byte
    # the compute dtype does not change this tiny model's text: its arrival is checked
    Row("generate", "dtype", "bfloat16", spied, lambda f: [mx.bfloat16], spy=DTYPE),
    Row("generate", "prefill_chunk", "1", spied, lambda f: [1], spy=PREFILL),
    Row("generate", "save_cache", "{out}/c.npz", saved_cache, cache_after_prompt),
    Row("generate", "load_cache", "{cache}", stdout,
        lambda f: "ab" + generated(f, prompt="first part, ab", echo=False)),
    Row("instruction", "instruction", "Say hi.", stdout, lambda f: instructed(f, "Say hi.")),
    Row("instruction", "input", "red", stdout, lambda f: instructed(f, input="red")),
    # chat
    Row("chat", "checkpoint", "{tuned2}", stdout, lambda f: chatted(f, "tuned2")),
    Row("chat", "max_tokens", "4", stdout, lambda f: chatted(f, max_tokens=4)),
    Row("chat", "history", None, stdout, lambda f: chatted(f, history=True)),
    Row("chat", "temperature", "0.3", stdout, lambda f: chatted(f, temperature=0.3)),
    Row("chat", "top_k", "3", stdout, lambda f: chatted(f, top_k=3)),
    Row("chat", "top_p", "0.5", stdout, lambda f: chatted(f, top_p=0.5)),
    Row("chat", "min_p", "0.95", stdout, lambda f: chatted(f, min_p=0.95)),
    Row("chat", "repetition_penalty", "3", stdout, lambda f: chatted(f, logits_processors=make_processors(3.0, 20))),
    Row("chat", "repetition_context_size", "1", stdout,
        lambda f: chatted(f, logits_processors=make_processors(3.0, 1)), extra=("--repetition-penalty", "3")),
    Row("chat", "seed", "2", stdout, lambda f: chatted(f, seed=2)),
    Row("chat", "dtype", "bfloat16", spied, lambda f: [mx.bfloat16], spy=DTYPE),
    # eval
    Row("eval", "checkpoint", "{ckpt2}", eval_printed, lambda f: evaluated(f, "ckpt2")),
    Row("eval", "block_size", "8", eval_printed, lambda f: evaluated(f, block_size=8)),
    Row("eval", "batch_size", "3", eval_printed, lambda f: evaluated(f, batch_size=3)),
    Row("eval", "eval_batches", "1", eval_printed, lambda f: evaluated(f, eval_batches_=1)),
    Row("eval", "dtype", "bfloat16", eval_printed, lambda f: evaluated(f, dtype="bfloat16")),
    Row("eval", "data", "{corpus2}", eval_printed, lambda f: evaluated(f, train=file_bytes(f["corpus2"]))),
    Row("eval", "val_data", "{val}", eval_printed, lambda f: evaluated(f, val=file_bytes(f["val"]))),
    Row("dataset", "dataset", "{columns}", eval_printed, eval_text_field, extra=("--text-field", "note")),
    Row("dataset", "text_field", "note", eval_printed, eval_text_field, extra=("--dataset", "{columns}")),
    Row("dataset", "split", "other", eval_printed, lambda f: evaluated(f, train=dataset_bytes(f, "other"))),
    Row("dataset", "val_split", "other", eval_printed,
        lambda f: evaluated(f, train=dataset_bytes(f), val=dataset_bytes(f, "other"))),
    Row("dataset", "cache_dir", "{out}/cache", cache_files, dataset_cache_name),
    # quantize
    Row("quantize", "checkpoint", "{ckpt}", checkpoint_file("q.npz"), lambda f: quantized(f, "ckpt")),
    Row("quantize", "bits", "4", checkpoint_file("q.npz"), lambda f: quantized(f, bits=4)),
    Row("quantize", "group_size", "32", checkpoint_file("q.npz"), lambda f: quantized(f, group_size=32)),
    Row("quantize", "embedding", None, checkpoint_file("q.npz"), lambda f: quantized(f, embedding=True)),
    Row("quantize", "out", "{out}/other.npz", checkpoint_file("other.npz"), quantized),
    # merge
    Row("merge", "out", "{out}/m.npz", checkpoint_file("m.npz"), merged),
    # inspect
    Row("inspect", "checkpoint", "{ckpt2}", file_text("r.html"), lambda f: report(f, checkpoint="ckpt2")),
    Row("inspect", "text", "other words", file_text("r.html"), lambda f: report(f, "other words")),
    Row("inspect-file", "file", "{val}", file_text("r.html"), lambda f: report(f, Path(f["val"]).read_text())),
    Row("inspect", "out", "{out}/other.html", file_text("other.html"), report),
    Row("inspect", "json", "{out}/s.json", file_text("s.json"), stats_json),
    Row("inspect", "atlas", "{atlas}", file_text("r.html"), lambda f: report(f, atlas=Atlas.load(f["atlas"]))),
    Row("inspect", "synapse", "1:0:2:3", file_text("r.html"), lambda f: report(f, synapses=[(1, 0, 2, 3)])),
    Row("inspect", "graph_edges", "4", file_text("r.html"), lambda f: report(f, graph_edges=4)),
    Row("inspect", "graph_edges", "0", file_text("r.html"), lambda f: report(f, graph_edges=None)),  # no graphs
    Row("inspect", "max_report_bytes", "5", file_text("r.html"), lambda f: report(f, max_bytes=5)),
    Row("inspect", "max_bytes", "5", file_text("r.html"), lambda f: report(f, max_text_bytes=5)),
    Row("inspect-json", "max_bytes", "5", file_text("s.json"), lambda f: stats_json(f, max_text_bytes=5)),
    Row("inspect", "chunk_size", "3", spied, lambda f: [3], spy=STATS_CHUNK),
    Row("inspect", "no_progress", None, lambda r: ok(r) and r.err, lambda f: ""),
    # neurons
    Row("neurons", "checkpoint", "{ckpt2}", atlas_in("atlas"), lambda f: atlas_expected(f, "ckpt2")),
    Row("neurons", "data", "{val}", atlas_in("atlas"), lambda f: atlas_expected(f, data="val")),
    Row("neurons", "out", "{out}/atlas2", atlas_in("atlas2"), atlas_expected),
    Row("neurons", "top_k", "3", atlas_in("atlas"), lambda f: atlas_expected(f, top_k=3)),
    Row("neurons", "context", "5", atlas_in("atlas"), lambda f: atlas_expected(f, context=5)),
    Row("neurons", "max_bytes", "100", atlas_in("atlas"), lambda f: atlas_expected(f, max_bytes=100)),
    Row("neurons", "chunk_size", "7", spied, lambda f: [7], spy=ATLAS_CHUNK),
    Row("neurons", "no_progress", None, lambda r: ok(r) and r.err, lambda f: ""),
    # synapses
    Row("synapses", "checkpoint", "{ckpt2}", tracked_printed, lambda f: rounded(tracked(f, checkpoint="ckpt2"))),
    Row("synapses", "text", "other words", tracked_printed, lambda f: rounded(tracked(f, "other words"))),
    Row("synapses-file", "file", "{val}", tracked_printed,
        lambda f: rounded(tracked(f, Path(f["val"]).read_text()))),
    Row("synapses", "track", "1:0:5:7", tracked_printed, lambda f: rounded(tracked(f, synapses=[(1, 0, 5, 7)]))),
    Row("synapses", "top", "2", tracked_printed, lambda f: rounded(tracked(f, top=2))),
    Row("synapses", "min_steps", "1", tracked_printed, lambda f: rounded(tracked(f, min_steps=1))),
    Row("synapses", "max_bytes", "60", tracked_printed, lambda f: rounded(tracked(f, max_text_bytes=60))),
    Row("synapses", "json", "{out}/s.json", synapses_json, tracked),
    Row("synapses", "plot", "{out}/s.png", png("s.png"), lambda f: PNG),
    Row("synapses", "chunk_size", "5", spied, lambda f: [5], spy=SERIES_CHUNK),
    Row("synapses", "no_progress", None, spied, lambda f: [False], spy=PROGRESS),
    Row("concept", "concept", "{concept}", concept_printed, lambda f: concept_found(f, "concept", "concept")),
    Row("concept", "other", "{other}", concept_printed, lambda f: concept_found(f, "other", "other")),
    # graphs
    Row("graphs", "checkpoint", "{ckpt2}", file_text("g.json"), lambda f: graphs(f, checkpoint="ckpt2")),
    Row("graphs", "kind", "y", file_text("g.json"), lambda f: graphs(f, kind="y")),
    Row("graphs", "edges", "4", file_text("g.json"), lambda f: graphs(f, edges=4)),
    Row("graphs", "top_k", "4", file_text("g.json"), lambda f: graphs(f, top_k=4)),
    Row("graphs", "threshold", "0.05", file_text("g.json"), lambda f: graphs(f, threshold=0.05)),
    Row("graphs", "head", "1", file_text("g.json"), lambda f: graphs(f, heads=[1])),
    Row("graphs", "no_baselines", None, file_text("g.json"), lambda f: graphs(f, baselines=False)),
    Row("graphs", "seed", "3", file_text("g.json"), lambda f: graphs(f, seed=3)),
    Row("graphs", "json", "{out}/h.json", file_text("h.json"), graphs),
    Row("graphs", "plot", "{out}/d.png", png("d.png"), lambda f: PNG),
    # upload
    Row("upload", "checkpoint", "{tuned}", file_text("README.md"), lambda f: upload_card(f, checkpoint="tuned")),
    Row("upload", "repo", "org/other", file_text("README.md"), lambda f: upload_card(f, repo="org/other")),
    Row("upload", "run", "{run}", file_text("README.md"), lambda f: upload_card(f, run="run")),
    Row("upload", "license", "apache-2.0", file_text("README.md"), lambda f: upload_card(f, license="apache-2.0")),
    Row("upload", "dataset", "org/texts", file_text("README.md"), lambda f: upload_card(f, datasets=["org/texts"])),
    Row("upload", "dry_run", "{out}/folder", file_text("folder/README.md"), upload_card),
    Row("hub", "private", None, hub_call("create_repo", "private"), lambda f: True, hub=True),
    Row("hub", "message", "first words", hub_call("upload_folder", "commit_message"), lambda f: "first words",
        hub=True),
    # convert
    Row("to-torch", "to_torch", "{ckpt2}", lambda r: ok(r) and torch_digest(r.folder / "m.pt"),
        lambda f: converted_to_torch(f, "ckpt2")),
    Row("to-torch", "out", "{out}/n.pt", lambda r: ok(r) and (r.folder / "n.pt").exists() and torch_digest(
        r.folder / "n.pt"), converted_to_torch),
    Row("from-torch", "from_torch", "{pt2}", checkpoint_file("m.npz"), lambda f: converted_from_torch(f, "pt2")),
    Row("from-torch", "n_layer", "3", checkpoint_file("m.npz"), lambda f: converted_from_torch(f, n_layer=3)),
    Row("from-torch", "dropout", "0.3", checkpoint_file("m.npz"), lambda f: converted_from_torch(f, dropout=0.3)),
    Row("to-mlx-lm", "to_mlx_lm", "{ckpt2}", checkpoint_file("dir"), lambda f: weights_digest(f["ckpt2"])),
]


def parser_of(command):
    return importlib.import_module(cli.COMMANDS[command][0]).build_parser()


def spellings(command, dest, value) -> list:
    """Every long spelling of the option, as ``--flag value`` and ``--flag=value`` (a switch: ``--flag``)."""
    options = [o for a in parser_of(command)._actions if a.dest == dest for o in a.option_strings if o[:2] == "--"]
    assert options, f"{command} has no option for {dest}"
    if value is None:
        return [[option] for option in options]
    return [spelling for option in options for spelling in ([option, value], [f"{option}={value}"])]


def run_row(row, files, monkeypatch, flag) -> Result:
    hub = HubSpy()
    if row.hub:
        hub.install(monkeypatch)
    stdin = CHAT_INPUT if row.command == "chat" else ""
    result = run_command(files, [*BASE[row.base], *row.extra, *flag], monkeypatch, stdin, row.spy)
    result.spied["hub"] = hub.calls
    return result


def official_files(files):
    """The .pt files the convert rows read."""
    for checkpoint, pt in (("ckpt", "pt"), ("ckpt2", "pt2")):
        if not Path(files[pt]).exists():
            mlx_to_torch(files[checkpoint], files[pt])


@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.torch) if row.command == "convert" else row
                                 for row in ROWS], ids=lambda row: f"{row.base}-{row.dest}")
def test_the_flag_reaches_the_library(row, files, monkeypatch):
    if row.command == "convert":
        official_files(files)
    expected = row.expect(files)
    for flag in spellings(row.command, row.dest, row.value):
        result = run_row(row, files, monkeypatch, flag)
        assert row.observe(result) == expected, (flag, result.code, result.err[-300:])
    without = run_row(row, files, monkeypatch, [])
    assert row.observe(without) != expected, "the command gives the same without the flag: the row cannot fail"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_row(command):
    options = {a.dest for a in parser_of(command)._actions if a.option_strings and a.dest != "help"}
    covered = {row.dest for row in ROWS if row.command == command}
    assert options - covered == set()
