"""What every command shares: the parser, argument types, common options, and how ``main()`` runs.

Each command module has ``build_parser()``, ``run(args)`` and
``main(argv=None) -> int: return run_command(PROG, build_parser().parse_args, run, argv)``.
"""

import argparse
import math
import sys

from bdh_mlx.errors import BDHError
from bdh_mlx.storage.files import COMPUTE_DTYPES

DEFAULT_BLOCK_SIZE, DEFAULT_BATCH_SIZE = 512, 32  # the official recipe
SEED_MAX = 2**62  # mx.random.seed takes an unsigned 64-bit integer; leave room for seed + 1
# Optional packages (imported where they are needed) and the pip install that brings each one.
# The interpret commands check theirs up front (``bdh_mlx.interpret.common.require``), naming INTERPRET.
INTERPRET = 'pip install "bdh-mlx[interpret]"'
EXTRAS = {
    "matplotlib": 'pip install "bdh-mlx[plot]"',
    "scipy": INTERPRET,
    "networkx": INTERPRET,
    "powerlaw": INTERPRET,
    "torch": 'pip install "bdh-mlx[torch]"',
    "wandb": "pip install wandb",
    "yaml": "pip install pyyaml",
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the default is None or False or already named."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "default:" in help or action.default in (None, False, argparse.SUPPRESS):
            return help
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{help} (default: %(default)s)".strip()
        return help


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_in(lo=None, hi=None, *, kind=float, lo_open=False, hi_open=False):
    """An argparse type: a finite ``kind`` (int or float) in [lo, hi]; ``lo_open``/``hi_open`` exclude the ends."""
    noun = "integer" if kind is int else "number"
    if hi is None and lo == 0 and lo_open or hi is None and lo == 1 and kind is int and not lo_open:
        wanted = f"a positive {noun}"
    elif hi is None and lo == 0:
        wanted = f"a non-negative {noun}"
    elif hi is None and lo is not None:
        wanted = f"a{'n' if kind is int else ''} {noun} {'>' if lo_open else '>='} {lo}"
    else:
        wanted = f"a{'n' if kind is int else ''} {noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        fits = math.isfinite(value)
        fits = fits and (lo is None or (value > lo if lo_open else value >= lo))
        fits = fits and (hi is None or (value < hi if hi_open else value <= hi))
        if not fits:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = wanted
    return parse


positive_int = number_in(1, kind=int)
non_negative_int = number_in(0, kind=int)
positive_float = number_in(0, lo_open=True)
non_negative_float = number_in(0)
seed_int = number_in(0, SEED_MAX, kind=int)


def add_batch_arguments(parser, block_size=DEFAULT_BLOCK_SIZE, batch_size=DEFAULT_BATCH_SIZE):
    """``--block-size``, ``--batch-size`` and ``--dtype``: the shape and precision of a batch (train, eval)."""
    group = parser.add_argument_group("batch and precision")
    group.add_argument("--block-size", type=positive_int, default=block_size, help="bytes per sequence")
    group.add_argument("--batch-size", type=positive_int, default=batch_size, help="sequences per batch")
    add_dtype_argument(group)
    return group


CHECKPOINT_HELP = ("a bdh-mlx checkpoint: .npz path, mlx-lm model folder (convert --to-mlx-lm) or Hub repo id "
                   "org/name[@revision]; --model is mlx-lm's spelling")


def add_checkpoint_argument(parser, help: str = CHECKPOINT_HELP):
    """``--checkpoint`` (or mlx-lm's ``--model``): the checkpoint a command reads."""
    parser.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="CKPT", help=help)


def add_dtype_argument(parser):
    parser.add_argument("--dtype", choices=list(COMPUTE_DTYPES), default="float32",
                        help="compute dtype; the weights stay float32")


def describe_os_error(error: OSError) -> str:
    """One line for an OS error: the path and what went wrong (no traceback)."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def describe_missing(names, pip: str | None = None) -> str:
    """One line for packages that are not installed and the ``pip install`` that brings them (default: the
    first one's in EXTRAS)."""
    names = list(names)
    pip = pip or EXTRAS.get(names[0], f"pip install {names[0]}")
    return f"this needs {', '.join(names)}, which {'is' if len(names) == 1 else 'are'} not installed: {pip}"


def describe_missing_module(error: ModuleNotFoundError) -> str:
    """One line for a package that is not installed: which ``pip install`` brings it."""
    return describe_missing([(error.name or "").split(".")[0] or "a package"])


def run_command(prog: str, parse, run, argv=None) -> int:
    """Parse ``argv`` and call ``run(args)``; returns the exit code.

    0: done; 2: bad input or a failure reported as one line on stderr (a BDHError, an OS error
    such as a full disk or a read-only folder, or a missing optional package); 130: interrupted (Ctrl-C).
    """
    try:
        run(parse(argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except BDHError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"{prog}: error: {describe_missing_module(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
