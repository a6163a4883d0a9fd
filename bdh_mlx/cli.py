"""``bdh-mlx <command>``: a thin dispatcher over the command modules, each with a ``main(argv) -> int``."""

import importlib
import sys

COMMANDS = {
    "train": ("bdh_mlx.training.train", "train a model (or resume a run)"),
    "finetune": ("bdh_mlx.training.finetune", "fine-tune a checkpoint on instruction/response pairs"),
    "generate": ("bdh_mlx.inference.generate", "generate text from a checkpoint"),
    "chat": ("bdh_mlx.inference.chat", "chat with a fine-tuned checkpoint (one message per line)"),
    "eval": ("bdh_mlx.training.evaluate", "validation loss and bits per byte of a checkpoint"),
    "plot": ("bdh_mlx.tools.plot", "draw PNG charts of a run's metrics"),
    "inspect": ("bdh_mlx.interpret.cmd_inspect", "activation statistics and an HTML report of a text"),
    "neurons": ("bdh_mlx.interpret.cmd_neurons", "a neuron atlas: every neuron's firing rate and top contexts"),
    "synapses": ("bdh_mlx.interpret.cmd_synapses", "track synapses along a text, or find a concept's synapses"),
    "graphs": ("bdh_mlx.interpret.cmd_graphs", "neuron graphs: degree distribution and modularity"),
    "merge": ("bdh_mlx.tools.merge", "merge two checkpoints by concatenating their neurons"),
    "quantize": ("bdh_mlx.tools.quantize", "quantize a checkpoint to 4 or 8 bits"),
    "upload": ("bdh_mlx.storage.upload", "upload a checkpoint to the Hugging Face Hub with a model card"),
    "convert": ("bdh_mlx.storage.convert", "to and from the official PyTorch state_dict; to an mlx-lm folder"),
    "info": ("bdh_mlx.tools.info", "versions, device, the BLAS in use and its measured matmul speed"),
}


def usage() -> str:
    lines = [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    return ("usage: bdh-mlx <command> [options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n'bdh-mlx <command> --help' lists a command's options; 'bdh-mlx --version' prints the version.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from bdh_mlx import __version__

        print(f"bdh-mlx {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"bdh-mlx: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        command = importlib.import_module(COMMANDS[argv[0]][0])
    except ModuleNotFoundError as e:  # an optional package the command needs (the interpret commands: scipy)
        from bdh_mlx.arguments import describe_missing_module

        print(f"bdh-mlx {argv[0]}: error: {describe_missing_module(e)}", file=sys.stderr)
        return 2
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
