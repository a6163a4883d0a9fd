"""Quantizing a model's weights to 4 or 8 bits (``quantize``), and ``bdh-mlx quantize``.

``bdh-mlx quantize --checkpoint CKPT --bits 4|8 [--group-size 32|64|128] [--embedding] --out Q.npz``
"""

import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from bdh_mlx.arguments import ArgumentParser, add_checkpoint_argument, run_command
from bdh_mlx.errors import BDHError
from bdh_mlx.inference.engines import choose_engine
from bdh_mlx.modeling.quantized import QuantizedEmbedding, QuantizedWeight, default_group_size, stored_shapes
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.hub import resolve_checkpoint


def quantize(model, bits: int = 4, group_size: int | None = None, embedding: bool = False):
    """Quantize ``model``'s encoder, encoder_v, decoder, lm_head (and embedding) in place; returns the model.

    ``group_size`` defaults to the largest of 128, 64, 32 that divides n_embd and the neurons per head.
    The model is then for inference only: it is put in eval mode, and a training forward pass is refused.
    """
    config = model.config
    if config.quantization is not None:
        raise BDHError(f"the model is already quantized ({config.quantization['bits']}-bit)")
    group_size = default_group_size(config) if group_size is None else group_size
    config = replace(config, quantization={"bits": bits, "group_size": group_size, "embedding": embedding})
    nh = config.n_head
    stored = {
        "encoder": model.encoder.swapaxes(-1, -2),
        "encoder_v": model.encoder_v.swapaxes(-1, -2),
        "decoder": model.decoder.reshape(nh, -1, config.n_embd).swapaxes(-1, -2),
        "lm_head": model.lm_head.T,
        "embed": model.embed.weight,
    }
    for name in stored_shapes(config):
        kind = QuantizedEmbedding if name == "embed" else QuantizedWeight
        setattr(model, name, kind.from_matrix(stored[name], group_size, bits))
    model.config = config
    model.engine = choose_engine(config, model.compute_dtype)  # quantized weights: the dense MLX step
    mx.eval(model.parameters())
    model.eval()
    return model



def build_parser():
    p = ArgumentParser(prog="bdh-mlx quantize",
                       description="Quantize a checkpoint's weights to 4 or 8 bits (MLX affine quantization).")
    add_checkpoint_argument(p, help="a float checkpoint (.npz, mlx-lm model folder or Hub repo id; or --model)")
    p.add_argument("--bits", type=int, required=True, help="4 or 8")
    p.add_argument("--group-size", type=int,
                   help="values sharing one scale and bias (default: the largest of 128, 64, 32 that fits the model)")
    p.add_argument("--embedding", action="store_true", help="also quantize the embedding table")
    p.add_argument("--out", type=Path, required=True, metavar="Q.npz", help="quantized checkpoint to write")
    return p


def run(args):
    if Path(args.out).is_dir():
        raise BDHError(f"{args.out}: is a directory; --out needs a file name")
    source = resolve_checkpoint(args.checkpoint)
    model = checkpoint.load(source)
    quantize(model, args.bits, args.group_size, args.embedding)
    checkpoint.save(model, args.out)
    before, after = os.path.getsize(source), os.path.getsize(args.out)
    print(f"wrote {args.out}: {args.bits}-bit, group size {model.config.quantization['group_size']}, "
          f"{after / 1e6:.2f} MB ({after / before:.3f} of {before / 1e6:.2f} MB)")


def main(argv=None) -> int:
    return run_command("bdh-mlx quantize", build_parser().parse_args, run, argv)
