"""Merge two BDH models by concatenating their neurons (paper, section 7.1); ``bdh-mlx merge``.

    bdh-mlx merge A.npz B.npz --out AB.npz

Per head, the merged model's neurons are A's then B's: encoder and encoder_v are concatenated along N,
the decoder's rows in the same order; embed and lm_head are averaged. RoPE frequencies depend on a
neuron's index and on N, so each neuron keeps the frequency it was trained with: the merged model carries
per-neuron frequencies, saved in its checkpoint.
"""

import mlx.core as mx

from bdh_mlx.arguments import ArgumentParser, run_command
from bdh_mlx.errors import ConfigError
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage import checkpoint

PROG = "bdh-mlx merge"
MUST_MATCH = ("n_layer", "n_embd", "n_head", "vocab_size")


def merged_config(a: BDHConfig, b: BDHConfig) -> BDHConfig:
    """A's config with N = N_a + N_b (mlp_internal_dim_multiplier m_a + m_b); ConfigError if they cannot merge."""
    for name in MUST_MATCH:
        if getattr(a, name) != getattr(b, name):
            raise ConfigError(f"cannot merge: {name} differs ({getattr(a, name)} vs {getattr(b, name)})")
    multiplier = a.mlp_internal_dim_multiplier + b.mlp_internal_dim_multiplier
    if multiplier * a.n_embd // a.n_head != a.n_neurons + b.n_neurons:
        raise ConfigError(
            f"cannot merge: N = {a.n_neurons} + {b.n_neurons} is not mlp_internal_dim_multiplier * n_embd // n_head "
            f"for mlp_internal_dim_multiplier {multiplier} (n_embd {a.n_embd}, n_head {a.n_head})"
        )
    return BDHConfig.from_dict({**a.to_dict(), "mlp_internal_dim_multiplier": multiplier})


def merge(model_a: BDH, model_b: BDH) -> BDH:
    """One model holding both models' neurons, per head A's then B's; embed and lm_head averaged."""
    config = merged_config(model_a.config, model_b.config)
    nh, D = config.n_head, config.n_embd

    def per_head_rows(model):
        return model.decoder.reshape(nh, model.config.n_neurons, D)

    merged = BDH(config, rope_freqs=mx.concatenate([model_a._freqs, model_b._freqs]))
    merged.encoder = mx.concatenate([model_a.encoder, model_b.encoder], axis=2)
    merged.encoder_v = mx.concatenate([model_a.encoder_v, model_b.encoder_v], axis=2)
    merged.decoder = mx.concatenate([per_head_rows(model_a), per_head_rows(model_b)], axis=1).reshape(-1, D)
    merged.embed.weight = (model_a.embed.weight + model_b.embed.weight) / 2
    merged.lm_head = (model_a.lm_head + model_b.lm_head) / 2
    mx.eval(merged.parameters())
    return merged


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Merge two BDH checkpoints by concatenating their neurons.")
    parser.add_argument("a", metavar="A.npz", help="first checkpoint (its neurons come first in each head)")
    parser.add_argument("b", metavar="B.npz", help="second checkpoint")
    parser.add_argument("--out", required=True, help="merged checkpoint to write")
    return parser


def run(args):
    merged = merge(checkpoint.load_float(args.a), checkpoint.load_float(args.b))  # quantized ones dequantized
    checkpoint.save(merged, args.out)
    c = merged.config
    print(f"wrote {args.out}: N {c.n_neurons} per head (mlp_internal_dim_multiplier {c.mlp_internal_dim_multiplier}), "
          f"{c.num_parameters:,} parameters, float32")


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
