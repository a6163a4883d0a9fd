"""Convert between the official PyTorch BDH state_dict (``.pt``) and bdh-mlx checkpoints (``.npz``).

    bdh-mlx convert --from-torch model.pt --out model.npz --n-layer L [--dropout P]
    bdh-mlx convert --to-torch model.npz --out model.pt
    bdh-mlx convert --to-mlx-lm model.npz --out DIR      (an mlx-lm model folder: storage/mlx_lm.py)

The mapping itself is plain numpy (``from_torch_state_dict``, ``to_torch_state_dict``);
torch is imported only to read and write ``.pt`` files.
"""

import io
import math
import pickle
from pathlib import Path

import numpy as np

from bdh_mlx.arguments import ArgumentParser, number_in, positive_int, run_command
from bdh_mlx.errors import BDHError, CheckpointError
from bdh_mlx.model import BDHConfig, rope_frequencies
from bdh_mlx.storage import mlx_lm
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.files import atomic_write
from bdh_mlx.storage.format import ROPE_FREQS_KEY, check_finite, check_weights, save_weights, weight_shapes

COMPILE_PREFIX = "_orig_mod."  # torch.compile prefixes every key with this
FREQS_KEY = "attn.freqs"  # the official RoPE buffer: a constant, recomputed by the model
# The order of the official ``state_dict()``: own parameters, then the submodules' tensors.
TORCH_KEY_ORDER = ("decoder", "encoder", "encoder_v", "lm_head", FREQS_KEY, "embed.weight")
TORCH_MISSING = 'PyTorch is needed to read or write .pt files: pip install "bdh-mlx[torch]" (or pip install torch)'


def from_torch_state_dict(state_dict: dict, n_layer: int = 6, dropout: float = 0.1, source: str = "state_dict"):
    """The config and float32 weights of an official state_dict of numpy arrays.

    The sizes are read from the shapes; ``n_layer`` and ``dropout`` are not stored in a state_dict.
    Raises CheckpointError, naming ``source``, on missing, unexpected or inconsistent keys.
    """
    weights = {}
    for key, value in state_dict.items():
        name = key.removeprefix(COMPILE_PREFIX)
        if name in weights:
            raise CheckpointError(f"{source}: {name} appears twice (with and without {COMPILE_PREFIX})")
        weights[name] = np.asarray(value)
    freqs = weights.pop(FREQS_KEY, None)
    for name, ndim in (("embed.weight", 2), ("encoder", 3)):
        if name not in weights:
            raise CheckpointError(f"{source}: not a BDH state_dict: missing {name}")
        if weights[name].ndim != ndim:
            raise CheckpointError(f"{source}: {name} has shape {weights[name].shape}, expected {ndim} dimensions")

    V, D = weights["embed.weight"].shape
    nh, _, N = weights["encoder"].shape
    multiplier = max(1, -(-N * nh // D))  # the smallest m with m * D // nh >= N
    if multiplier * D // nh != N:
        raise CheckpointError(
            f"{source}: encoder has {N} neurons per head, which no mlp_internal_dim_multiplier gives "
            f"with n_embd {D} and n_head {nh}"
        )
    try:
        config = BDHConfig(
            n_layer=n_layer, n_embd=D, n_head=nh, mlp_internal_dim_multiplier=multiplier, vocab_size=V, dropout=dropout
        )
    except BDHError as e:
        raise CheckpointError(f"{source}: {e}") from None
    check_weights(source, config, weights)
    check_finite(source, {name: weights[name] for name in weight_shapes(config)})
    if freqs is not None and freqs.shape != (1, 1, 1, N):
        raise CheckpointError(f"{source}: {FREQS_KEY} has shape {freqs.shape}, expected {(1, 1, 1, N)}")
    return config, {name: weights[name].astype(np.float32) for name in weight_shapes(config)}


def to_torch_state_dict(config: BDHConfig, weights: dict) -> dict:
    """The official state_dict (numpy, float32) of ``weights``, with the ``attn.freqs`` buffer."""
    N = config.n_neurons
    freqs = np.array(rope_frequencies(N)).reshape(1, 1, 1, N)
    return {
        name: freqs if name == FREQS_KEY else np.asarray(weights[name], dtype=np.float32) for name in TORCH_KEY_ORDER
    }


def _import_torch():
    try:
        import torch
    except ImportError:
        raise BDHError(TORCH_MISSING) from None
    return torch


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def stored_model_args(obj) -> dict:
    """The model config a training checkpoint may carry beside its weights (``model_args`` or ``config``), or {}."""
    if not isinstance(obj, dict):
        return {}
    for key in ("model_args", "config"):
        if isinstance(obj.get(key), dict) and "n_layer" in obj[key]:
            return obj[key]
    return {}


def load_torch_checkpoint(path) -> tuple:
    """Read a ``.pt`` state_dict (or a dict holding one under ``"model"``) as float32 numpy arrays.

    Returns ``(state_dict, model_args)``: ``model_args`` is the config stored beside the weights, or {}.
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a plain state_dict (corrupt, or it pickles objects; save model.state_dict() instead)"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    model_args = stored_model_args(obj)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict (a dict of tensors, or one under 'model')")
    try:
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}, model_args
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: tensors that cannot be read as arrays ({_first_line(e)})") from None


def official_freqs(torch, n_neurons: int):
    """``attn.freqs`` computed by torch exactly as the official code does.

    Its float32 ``pow`` is not correctly rounded, so for N >= 1024 a few entries differ by 1-3 ulp
    from ``rope_frequencies``; writing torch's own values makes the file match the official model's.
    """
    theta = 2**16
    j = torch.arange(0, n_neurons, 1, dtype=torch.float32)
    freqs = 1.0 / (theta ** ((j / 2).floor() * 2 / n_neurons)) / (2 * math.pi)
    return freqs.view(1, 1, 1, n_neurons)


def save_torch_state_dict(path, state_dict: dict):
    """Write a numpy state_dict as a ``.pt`` file of tensors, atomically, with torch's own ``attn.freqs``."""
    torch = _import_torch()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    tensors[FREQS_KEY] = official_freqs(torch, state_dict[FREQS_KEY].shape[-1])
    serialized = io.BytesIO()  # torch.save turns a write error (a full disk) into a RuntimeError: write it here
    torch.save(tensors, serialized)
    atomic_write(path, lambda f: f.write(serialized.getbuffer()))


def torch_to_mlx(src, out, n_layer: int | None = None, dropout: float | None = None) -> BDHConfig:
    """Convert an official ``.pt`` state_dict into a bdh-mlx ``.npz`` checkpoint.

    ``n_layer`` is not in the weights: it must be given unless the file stores a config that holds it.
    ``dropout`` defaults to the stored one, else 0.1.
    """
    state_dict, model_args = load_torch_checkpoint(src)
    n_layer = model_args.get("n_layer") if n_layer is None else n_layer
    if n_layer is None:
        raise CheckpointError(
            f"{src}: the number of layers is not stored in a state_dict (the weights are shared by all layers); "
            f"give --n-layer, the depth the model was trained with"
        )
    dropout = model_args.get("dropout", 0.1) if dropout is None else dropout
    config, weights = from_torch_state_dict(state_dict, n_layer, dropout, source=str(src))
    save_weights(out, config, weights)
    return config


def mlx_to_torch(src, out) -> BDHConfig:
    """Convert a bdh-mlx ``.npz`` checkpoint into an official ``.pt`` state_dict."""
    config, weights = read_checkpoint(src)
    if ROPE_FREQS_KEY in weights:
        raise CheckpointError(
            f"{src}: has per-neuron RoPE frequencies (a merged model); the official code computes them from N "
            "and cannot hold these, so it cannot be converted to a .pt file"
        )
    if config.quantization is not None:
        raise CheckpointError(f"{src}: a {config.quantization['bits']}-bit quantized checkpoint; "
                              "the official format needs the float checkpoint it was quantized from")
    save_torch_state_dict(out, to_torch_state_dict(config, weights))
    return config


def export(checkpoint, out) -> tuple:
    """Write the mlx-lm model folder of ``checkpoint`` (a path or Hub id) into ``out``; returns its config and files."""
    config, weights = read_checkpoint(checkpoint)
    return config, mlx_lm.write_export(config, weights, out, checkpoint)


def build_parser():
    parser = ArgumentParser(prog="bdh-mlx convert", description="Convert to and from the official PyTorch state_dict, "
                            "or to an mlx-lm model folder.")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", type=Path, metavar="PT", help="official state_dict (.pt) to convert")
    direction.add_argument("--to-torch", metavar="NPZ", help="bdh-mlx checkpoint (.npz or Hub repo id) to convert")
    direction.add_argument("--to-mlx-lm", metavar="CKPT", help="checkpoint (path or Hub repo id) to write as an mlx-lm "
                           "model folder (mlx_lm.generate/chat/server --model DIR --trust-remote-code)")
    parser.add_argument("--out", type=Path, required=True, help="file to write (with --to-mlx-lm: the folder)")
    parser.add_argument("--n-layer", type=positive_int, help="recurrent depth: not stored in a state_dict, so required "
                        "unless the file stores a config with n_layer (under 'model_args' or 'config')")
    parser.add_argument("--dropout", type=number_in(0, 1, hi_open=True),
                        help="dropout for further training (default: the stored one, else 0.1)")
    return parser


def _from_torch_options(args) -> dict:
    return {k: getattr(args, k) for k in ("n_layer", "dropout") if getattr(args, k) is not None}


def run(args):
    if args.to_mlx_lm:
        if args.out.exists() and not args.out.is_dir():
            raise CheckpointError(f"{args.out}: is a file; --out needs a folder with --to-mlx-lm")
        try:
            _, files = export(args.to_mlx_lm, args.out)
        except OSError as e:
            raise CheckpointError(f"{args.out}: cannot write ({e})") from None
        print(f"wrote {args.out}: {', '.join(f.name for f in files)}")
        return
    if args.out.is_dir():
        raise CheckpointError(f"{args.out}: is a directory; --out needs a file name")
    try:
        if args.from_torch:
            config = torch_to_mlx(args.from_torch, args.out, **_from_torch_options(args))
        else:
            config = mlx_to_torch(args.to_torch, args.out)
    except OSError as e:
        raise CheckpointError(f"{args.out}: cannot write ({e})") from None
    print(
        f"wrote {args.out}: n_layer {config.n_layer}, n_embd {config.n_embd}, n_head {config.n_head}, "
        f"N {config.n_neurons}, vocab {config.vocab_size}, {config.num_parameters:,} parameters"
    )


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.from_torch and _from_torch_options(args):
        parser.error("--n-layer and --dropout apply only to --from-torch")
    return args


def main(argv=None) -> int:
    return run_command("bdh-mlx convert", parse_args, run, argv)
