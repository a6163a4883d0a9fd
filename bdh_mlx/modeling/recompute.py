"""Gradient checkpointing for the training forward pass of long sequences."""

import mlx.core as mx


def recompute_in_backward(fn, *inputs):
    """``fn(*inputs)[0]``, keeping only the inputs: ``fn`` is recomputed in the backward pass.

    Like mx.checkpoint, but the first input's gradient is passed on only once the others' are taken,
    while the recomputed activations are alive; otherwise every call's N-wide gradients wait for the end.
    """

    def output(*inputs):
        return fn(*inputs)[0]

    @mx.custom_function
    def checkpointed(*inputs):
        return output(*inputs)

    @checkpointed.vjp
    def checkpointed_vjp(primals, cotangent, _):
        primals = mx.depends(list(primals), cotangent)  # recompute only when the backward pass gets here
        _, (first, *rest) = mx.vjp(output, primals, [cotangent])
        return (mx.depends(first, rest), *rest)

    return checkpointed(*inputs)
