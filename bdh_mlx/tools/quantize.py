"""``bdh-mlx quantize --checkpoint CKPT --bits 4|8 [--group-size 64] [--embedding] --out Q.npz``."""

import os
from pathlib import Path

from bdh_mlx.arguments import ArgumentParser, add_checkpoint_argument, run_command
from bdh_mlx.errors import BDHError
from bdh_mlx.model.quantized import quantize
from bdh_mlx.storage import checkpoint


def build_parser():
    p = ArgumentParser(prog="bdh-mlx quantize",
                       description="Quantize a checkpoint's weights to 4 or 8 bits (MLX affine quantization).")
    add_checkpoint_argument(p, help="a float checkpoint (.npz, mlx-lm model folder or Hub repo id; or --model)")
    p.add_argument("--bits", type=int, required=True, help="4 or 8")
    p.add_argument("--group-size", type=int, default=64, help="values sharing one scale and bias: 32, 64 or 128")
    p.add_argument("--embedding", action="store_true", help="also quantize the embedding table")
    p.add_argument("--out", type=Path, required=True, metavar="Q.npz", help="quantized checkpoint to write")
    return p


def run(args):
    if Path(args.out).is_dir():
        raise BDHError(f"{args.out}: is a directory; --out needs a file name")
    model = checkpoint.load(args.checkpoint)
    quantize(model, args.bits, args.group_size, args.embedding)
    checkpoint.save(model, args.out)
    before, after = os.path.getsize(args.checkpoint), os.path.getsize(args.out)
    print(f"wrote {args.out}: {args.bits}-bit, group size {args.group_size}, "
          f"{after / 1e6:.2f} MB ({after / before:.3f} of {before / 1e6:.2f} MB)")


def main(argv=None) -> int:
    return run_command("bdh-mlx quantize", build_parser().parse_args, run, argv)
