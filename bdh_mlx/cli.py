"""``bdh-mlx <command>``: a thin dispatcher over the command modules, each with a ``main()``."""

import argparse
import importlib
import sys

from .errors import BDHError

COMMANDS = {
    "train": ("bdh_mlx.train", "train a model (or resume a run)"),
    "generate": ("bdh_mlx.generate", "generate text from a checkpoint"),
    "eval": ("bdh_mlx.evaluate", "validation loss and bits per byte of a checkpoint"),
    "convert": ("bdh_mlx.convert", "convert to and from the official PyTorch state_dict"),
    "plot": ("bdh_mlx.plot", "draw PNG charts of a run's metrics"),
}


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def run_command(prog, run, args):
    """Run ``run(args)``; report a BDHError or Ctrl-C as one line and exit non-zero."""
    try:
        return run(args)
    except BDHError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: bdh-mlx <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"bdh-mlx {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"bdh-mlx: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
