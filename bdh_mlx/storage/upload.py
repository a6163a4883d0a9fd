"""``bdh-mlx upload``: a checkpoint on the Hugging Face Hub, with its config and a model card (and a run's metrics).

The repo gets the mlx-lm model folder of the checkpoint (``storage/mlx_lm.py``: ``config.json``,
``model.safetensors``, a byte-level tokenizer and the model file), so that one repo serves both
``bdh_mlx.load("org/name")`` and ``mlx_lm.generate --model org/name --trust-remote-code``, and ``README.md``;
with ``--run`` the card also reports the run's final metrics and shows its plots (uploaded under ``plots/``).
"""

import argparse
import json
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, add_checkpoint_argument, run_command
from bdh_mlx.errors import DataError
from bdh_mlx.storage.convert import export
from bdh_mlx.storage.files import atomic_write_text
from bdh_mlx.storage.hub import CARD_FILE, hub_errors, looks_like_path, parse_repo_id
from bdh_mlx.storage.mlx_lm import CONFIG_FILE, WEIGHTS_FILE
from bdh_mlx.tools.plot import read_metrics

PROG = "bdh-mlx upload"
PLOTS_DIR = "plots"
PAPER = "https://arxiv.org/abs/2509.26507"


def run_summary(run_dir) -> dict:
    """A run folder's training record: steps and tokens (``last.json``), final and best evaluation (metrics)."""
    records = read_metrics(run_dir)
    last = Path(run_dir) / "last.json"
    try:
        state = json.loads(last.read_text())
        args = state["args"]
        tokens = state["step"] * args["grad_accum"] * args["batch_size"] * args["block_size"]
    except FileNotFoundError:
        raise DataError(f"{run_dir}: no last.json (is it a bdh-mlx run folder?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{last}: unreadable ({type(e).__name__}: {e})") from None
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        raise DataError(f"{run_dir}: metrics.jsonl has no evaluation yet")
    return {"steps": state["step"], "tokens": tokens, "args": args, "final": evals[-1],
            "best": min(evals, key=lambda r: r["val_loss"])}


def training_data(args: dict) -> tuple:
    """(a sentence naming the training data, the Hub dataset ids among it) from a run's arguments."""
    if args.get("dataset"):
        name = args["dataset"]
        on_hub = not looks_like_path(name) and parse_repo_id(name) is not None
        return f"the dataset `{name}` (split `{args.get('split', 'train')}`)", [name] if on_hub else []
    if args.get("data"):
        return f"`{Path(args['data']).name}`", []
    return "the built-in corpus (CPython's pydoc_data documentation topics)", []


def card_metadata(license: str, datasets: list) -> str:
    """The card's YAML front matter, written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="bdh-mlx", tags=["mlx", "bdh"], license=license,
                         datasets=datasets or None, pipeline_tag="text-generation")
    return f"---\n{data.to_yaml()}\n---\n"


def training_section(summary: dict, data: str, plots: list) -> str:
    args, final, best = summary["args"], summary["final"], summary["best"]
    rows = [
        ("training data", data),
        ("steps", f"{summary['steps']:,}"),
        ("tokens seen", f"{summary['tokens']:,} (steps {summary['steps']:,} x grad accum {args['grad_accum']} x "
                        f"batch {args['batch_size']} x block {args['block_size']} bytes)"),
        ("final validation loss", f"{final['val_loss']:.4f} nats (step {final['step']:,})"),
        ("final bits per byte", f"{final['val_bpb']:.4f}"),
        ("best validation loss", f"{best['val_loss']:.4f} nats, {best['val_bpb']:.4f} bits per byte "
                                 f"(step {best['step']:,})"),
    ]
    lines = ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if "sparsity_x" in final:
        lines += ["Fraction of non-zero neuron activations at the final evaluation:", "",
                  "| layer | x | y |", "|---|---|---|"]
        lines += [f"| {i} | {x:.3f} | {y:.3f} |"
                  for i, (x, y) in enumerate(zip(final["sparsity_x"], final["sparsity_y"], strict=True))]
        lines.append("")
    lines += [f"![{Path(p).stem}]({PLOTS_DIR}/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def usage(repo_id: str, config) -> str:
    """How to run the model: continue text, or, for an instruction-tuned model, follow an instruction."""
    if config.prompt_template is None:
        return f"""```bash
pip install bdh-mlx
bdh-mlx generate --model {repo_id} --prompt "The " --max-tokens 200
```

```python
from bdh_mlx import generate, load

model = load("{repo_id}")
print(generate(model, "The ", max_tokens=200))
```
"""
    end = config.prompt_template["end"]
    return f"""An instruction-tuned model (`bdh-mlx finetune`): its prompt template is stored in the checkpoint, and
its answers end with `{end}`.

```bash
pip install bdh-mlx
bdh-mlx generate --model {repo_id} --instruction "Name three colours."
bdh-mlx chat --model {repo_id}      # one message per line
```

```python
from bdh_mlx import apply_template, end_of_response, generate, load

model = load("{repo_id}")
prompt = apply_template(model, "Name three colours.")
print(generate(model, prompt, max_tokens=200, stop=[end_of_response(model)]))
```
"""


def mlx_lm_usage(repo_id: str, config) -> str:
    """The model in mlx-lm: generate (a base model) or chat (an instruction-tuned one), and the server."""
    server = f"mlx_lm.server --model {repo_id} --trust-remote-code   # OpenAI-compatible, on 127.0.0.1:8080"
    if config.prompt_template is None:
        return f"""```bash
mlx_lm.generate --model {repo_id} --trust-remote-code --prompt "The " --max-tokens 200
{server}
```
"""
    return f"""```bash
mlx_lm.chat --model {repo_id} --trust-remote-code
{server}
```

The chat template is the stored prompt template; pass `stop: ["{config.prompt_template['end']}"]` in requests to the
server to end answers at the end-of-response marker, as `bdh-mlx chat` does.
"""


def model_card(repo_id: str, config, license: str, datasets: list, summary=None, plots=()) -> str:
    """README.md of a model repo: front matter, what the model is, how to load and generate, how it was trained."""
    data, run_datasets = training_data(summary["args"]) if summary else (None, [])
    datasets = list(dict.fromkeys([*datasets, *run_datasets]))
    text = f"""{card_metadata(license, datasets)}
# {repo_id.split("/")[1]}

A [Baby Dragon Hatchling (BDH)]({PAPER}) language model over bytes, trained with
[bdh-mlx](https://pypi.org/project/bdh-mlx/) for Apple's MLX.

| parameters | layers | heads | embedding | neurons per head | vocabulary |
|---|---|---|---|---|---|
| {config.num_parameters:,} | {config.n_layer} | {config.n_head} | {config.n_embd} | {config.n_neurons:,} | \
{config.vocab_size} bytes |

`{WEIGHTS_FILE}` holds the weights under the official BDH names and `{CONFIG_FILE}` the config: an mlx-lm model
folder (`bdh-mlx convert --to-mlx-lm`), which bdh-mlx reads without running its `.py` file.

## Use

{usage(repo_id, config)}
`load` and `--model` download the repo once into the Hugging Face cache; `{repo_id}@REVISION` pins a revision.

In mlx-lm (`pip install "bdh-mlx[mlx-lm]"`): `--trust-remote-code` runs `bdh_model.py`, two lines that import the
model from the installed bdh-mlx.

{mlx_lm_usage(repo_id, config)}"""
    return text + ("\n" + training_section(summary, data, plots) if summary else "")


def prepare_upload_folder(checkpoint, folder, repo_id: str, run_dir=None, license: str = "mit",
                          datasets=()) -> list:
    """Write the checkpoint's mlx-lm model folder, README.md (and plots/ with a run) into ``folder``; returns paths."""
    from bdh_mlx.tools.plot import plot_run

    summary = run_summary(run_dir) if run_dir is not None else None
    folder = Path(folder)
    config, files = export(checkpoint, folder)
    plots = plot_run(run_dir, folder / PLOTS_DIR) if run_dir is not None else []
    card = model_card(repo_id, config, license, list(datasets), summary, plots)
    atomic_write_text(folder / CARD_FILE, card)
    return [*files, folder / CARD_FILE, *plots]


def upload_folder(folder, repo_id: str, private: bool = False, message: str = "Upload bdh-mlx model") -> str:
    """Create ``repo_id`` if needed and commit the folder's files to it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message).commit_url


def repo_id_arg(text: str) -> str:
    parsed = parse_repo_id(text)
    if parsed is None or parsed[1] is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id (org/name)")
    return text


def build_parser():
    p = ArgumentParser(prog=PROG, description="Upload a checkpoint to the Hugging Face Hub with its config and a "
                                              "model card (needs a token with write access: HF_TOKEN or "
                                              "`hf auth login`).")
    add_checkpoint_argument(p, help="checkpoint to upload (.npz, mlx-lm model folder or Hub repo id; or --model)")
    p.add_argument("--repo", required=True, type=repo_id_arg, metavar="ORG/NAME",
                   help="the Hub repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--run", metavar="RUN_DIR", help="the training run folder: its metrics and plots go in the card")
    p.add_argument("--license", default="mit", help="license in the model card")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME",
                   help="Hub dataset id for the card (repeatable; a run's --dataset is added by itself)")
    p.add_argument("--message", default="Upload bdh-mlx model", help="commit message")
    p.add_argument("--dry-run", metavar="DIR", help="write the repo's files to DIR and upload nothing")
    return p


def run(args):
    if args.dry_run is not None:
        paths = prepare_upload_folder(args.checkpoint, args.dry_run, args.repo, args.run, args.license, args.dataset)
        print("\n".join(map(str, paths)))
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bdh-upload-") as folder:
        paths = prepare_upload_folder(args.checkpoint, folder, args.repo, args.run, args.license, args.dataset)
        url = upload_folder(folder, args.repo, args.private, args.message)
    print(f"uploaded {len(paths)} files to {args.repo}: {url}")


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
