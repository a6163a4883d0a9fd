"""``bdh-mlx quantize --checkpoint CKPT --bits 4|8 [--group-size 32|64|128] [--embedding] --out Q.npz``."""

import os
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, run_command
from bdh_mlx.errors import BDHError
from bdh_mlx.model.quantized import quantize
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.hub import resolve_checkpoint


def build_parser():
    p = ArgumentParser(prog="bdh-mlx quantize",
                       description="Quantize a checkpoint's weights to 4 or 8 bits (MLX affine quantization).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a float bdh-mlx .npz checkpoint")
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
