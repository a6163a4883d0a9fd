"""``bdh-mlx chat``: talk to an instruction-tuned checkpoint, one line per message.

Each line read from standard input is an instruction, wrapped in the checkpoint's prompt template; the
answer is streamed until the end-of-response marker. Works the same when standard input is a pipe.
With ``--history`` the earlier turns go into the template's input, the way ``finetune`` presents
multi-turn ``messages`` examples. ``/reset`` forgets them; an empty line is skipped; end of input quits.
"""

import sys

from bdh_mlx.arguments import ArgumentParser, add_checkpoint_argument, add_dtype_argument, positive_int, run_command
from bdh_mlx.inference.generate import add_sampling_arguments, sampling_options, stream_generate
from bdh_mlx.inference.template import end_of_response, format_prompt, history_text, stored_template
from bdh_mlx.storage.checkpoint import load
from bdh_mlx.storage.files import COMPUTE_DTYPES

PROG = "bdh-mlx chat"


def build_parser():
    p = ArgumentParser(prog=PROG, description="Chat with a fine-tuned checkpoint (bdh-mlx finetune): one message "
                       "per line on standard input, the answers on standard output.")
    add_checkpoint_argument(p, help="a fine-tuned checkpoint: .npz path, mlx-lm model folder or Hub repo id "
                            "org/name[@revision]; --model is mlx-lm's spelling")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=512, help="most bytes per answer")
    p.add_argument("--history", action="store_true", help="show the model the earlier turns (as the input)")
    add_sampling_arguments(p)
    add_dtype_argument(p)
    return p


def run(args):
    model = load(args.checkpoint, compute_dtype=COMPUTE_DTYPES[args.dtype])
    template, stop = stored_template(model), end_of_response(model)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{PROG}: type a message and press Enter; /reset forgets the conversation, Ctrl-D quits",
              file=sys.stderr)
    turns = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if message == "/reset":
            turns = []
            continue
        if not message:
            continue
        prompt = format_prompt(template, message, history_text(turns) if args.history else None)
        answer = []
        for response in stream_generate(model, prompt, max_tokens=args.max_tokens, stop=[stop], seed=args.seed,
                                        **sampling_options(args)):
            answer.append(response.text)
            print(response.text, end="", flush=True)
        print(flush=True)
        turns += [{"role": "user", "content": message}, {"role": "assistant", "content": "".join(answer)}]


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
