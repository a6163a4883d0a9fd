"""MLX with its stock BLAS vs the OpenBLAS that ``import bdh_mlx`` loads, and vs the official-style PyTorch BDH
(eager and torch.compile): matmul GFLOP/s and training tokens/s side by side, one run, same CPU and config.

Each variant runs in its own subprocess, because a BLAS only takes effect if loaded before ``mlx.core``; the
stock run sets ``BDH_MLX_BLAS=0``. The PyTorch model is written here from the spec (docs: the official
``bdh.py``): same shapes, same dense attention, AdamW with the same settings. Needs ``pip install torch``.

FLOPs of one training step, counted from the config (matmuls only; B batch, T block, D n_embd, nh heads,
N neurons per head, V vocab, L n_layer):

    per layer, forward:  2*B*T*D*nh*N   v @ encoder
                       + 2*B*nh*T*T*N   QR @ QR^T (dense T x T, as both implementations compute it)
                       + 2*B*nh*T*T*D   scores @ v
                       + 2*B*T*nh*D*N   a @ encoder_v
                       + 2*B*T*nh*N*D   concat_heads(xy) @ decoder
    forward = L * (per layer) + 2*B*T*D*V (lm_head);  step = 3 * forward (the backward pass is ~2x)

    python benchmarks/blas.py --preset small --batch-size 8 --block-size 256
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

VARIANTS = {  # name: (worker, extra environment)
    "mlx, stock BLAS": ("mlx", {"BDH_MLX_BLAS": "0"}),
    "mlx + OpenBLAS": ("mlx", {}),
    "torch eager": ("torch", {}),
    "torch.compile": ("torch-compile", {}),
}
MATMUL_SIZE = 2048


def step_flops(config, batch_size, block_size) -> int:
    """Matmul FLOPs of one training step (forward + backward), from the formula in the module docstring."""
    B, T, D, nh, N = batch_size, block_size, config.n_embd, config.n_head, config.n_neurons
    layer = 2 * B * T * D * nh * N * 3 + 2 * B * nh * T * T * (N + D)
    return 3 * (config.n_layer * layer + 2 * B * T * D * config.vocab_size)


def best_rate(run, repeats, flops) -> float:
    """Best FLOP rate (GFLOP/s) of ``run()`` over ``repeats`` calls, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


# --- MLX -------------------------------------------------------------------------------------


def gemm_groups(config, batch_size, block_size):
    """The step's matmuls as (group, [(batch, m, k, n)]) with the forward shapes; the backward repeats each twice."""
    B, T, D, nh, N, V = (batch_size, block_size, config.n_embd, config.n_head, config.n_neurons, config.vocab_size)
    layers = config.n_layer
    return {
        "encoder": [(1, B * T, D, nh * N)] * layers,
        "attention": [(B * nh, T, N, T), (B * nh, T, T, D)] * layers,
        "encoder_v": [(nh, B * T, D, N)] * layers,
        "decoder": [(1, B * T, nh * N, D)] * layers,
        "lm_head": [(1, B * T, D, V)],
    }


def gemm_seconds(mx, config, batch_size, block_size) -> dict:
    """Seconds per step that the step's matmuls alone take at their shapes (forward time x 3), by group."""
    seconds = {}
    for group, shapes in gemm_groups(config, batch_size, block_size).items():
        pairs = [(mx.random.normal((b, m, k)), mx.random.normal((b, k, n))) for b, m, k, n in shapes]
        mx.eval(pairs)
        flops = sum(2 * b * m * k * n for b, m, k, n in shapes)
        seconds[group] = 3 * flops / 1e9 / best_rate(lambda pairs=pairs: mx.eval([x @ y for x, y in pairs]), 2, flops)
    return seconds


def mlx_worker(args):
    from bdh_mlx import blas  # before mlx.core: loads the fast BLAS unless BDH_MLX_BLAS=0

    blas.load()
    import mlx.core as mx
    from train_throughput import compiled_step, measure

    from bdh_mlx.model import BDHConfig

    a, b = mx.random.normal((MATMUL_SIZE, MATMUL_SIZE)), mx.random.normal((MATMUL_SIZE, MATMUL_SIZE))
    matmul = best_rate(lambda: mx.eval(a @ b), 3, 2 * MATMUL_SIZE**3)
    config = BDHConfig.from_preset(args.preset, dropout=args.dropout)
    batches = [mx.random.randint(0, 256, (args.batch_size, args.block_size + 1)).astype(mx.uint8)
               for _ in range(args.warmup + args.steps)]
    tokens_per_s, _, _ = measure(compiled_step, config, mx.float32, batches, args.warmup)
    return {"matmul": matmul, "tokens_per_s": tokens_per_s, "library": blas.global_cblas() or "mlx reference BLAS",
            "gemm_seconds": gemm_seconds(mx, config, args.batch_size, args.block_size) if args.profile else None}


# --- PyTorch: the official BDH, written from the spec ------------------------------------------


def torch_bdh(config):
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, nh, N, V = config.n_embd, config.n_head, config.n_neurons, config.vocab_size

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            j = torch.arange(N, dtype=torch.float32)
            freqs = 1.0 / (65536.0 ** (2 * torch.floor(j / 2) / N)) / (2 * math.pi)
            self.register_buffer("freqs", freqs.view(1, 1, 1, N))

        @staticmethod
        def rope(phases, v):
            v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
            phases = (phases % 1) * (2 * math.pi)
            return v * torch.cos(phases) + v_rot * torch.sin(phases)

        def forward(self, q, v):
            T = q.size(2)
            qr = self.rope(torch.arange(T, dtype=torch.float32).view(1, 1, -1, 1) * self.freqs, q)
            return (qr @ qr.mT).tril(diagonal=-1) @ v

    class BDH(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Parameter(torch.randn(nh * N, D) * 0.02)
            self.encoder = nn.Parameter(torch.randn(nh, D, N) * 0.02)
            self.encoder_v = nn.Parameter(torch.randn(nh, D, N) * 0.02)
            self.attn = Attention()
            self.ln = nn.LayerNorm(D, elementwise_affine=False, bias=False)
            self.embed = nn.Embedding(V, D)
            self.drop = nn.Dropout(config.dropout)
            self.lm_head = nn.Parameter(torch.randn(D, V) * 0.02)

        def forward(self, idx, targets=None):
            """The loss against ``targets``, or the logits (B, T, V) without them."""
            B, T = idx.size()
            v = self.ln(self.embed(idx).unsqueeze(1))
            for _ in range(config.n_layer):
                x = F.relu(v @ self.encoder)
                a = self.ln(self.attn(x, v))
                y = F.relu(a @ self.encoder_v)
                xy = self.drop(x * y)
                u = self.ln(xy.transpose(1, 2).reshape(B, 1, T, nh * N) @ self.decoder)
                v = self.ln(v + u)
            logits = v.view(B, T, D) @ self.lm_head
            if targets is None:
                return logits
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    return BDH()


def torch_worker(args, compiled):
    import torch

    from bdh_mlx.model import BDHConfig

    torch.manual_seed(0)
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    matmul = best_rate(lambda: a @ b, 3, 2 * MATMUL_SIZE**3)
    config = BDHConfig.from_preset(args.preset, dropout=args.dropout)
    model = torch_bdh(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    forward = torch.compile(model) if compiled else model
    batches = torch.randint(0, 256, (args.warmup + args.steps, args.batch_size, args.block_size + 1))

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        forward(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()

    for batch in batches[:args.warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    tokens_per_s = args.steps * args.batch_size * args.block_size / (time.perf_counter() - start)
    return {"matmul": matmul, "tokens_per_s": tokens_per_s, "library": f"torch {torch.__version__}",
            "threads": torch.get_num_threads()}


# --- The side-by-side run ------------------------------------------------------------------------


def run_variant(name, args):
    worker, env = VARIANTS[name]
    stock = bool(env)  # only the stock run sets an environment variable (the opt-out)
    argv = [sys.executable, __file__, "--worker", worker, "--preset", args.preset, "--batch-size",
            str(args.batch_size), "--block-size", str(args.block_size), "--dropout", str(args.dropout),
            "--warmup", str(args.stock_warmup if stock else args.warmup),
            "--steps", str(args.stock_steps if stock else args.steps)]
    if stock or not args.profile:
        argv.append("--no-profile")
    environ = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "BDH_MLX_BLAS")}
    done = subprocess.run(argv, env={**environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--stock-steps", type=int, default=1, help="timed steps with the (slow) stock BLAS")
    p.add_argument("--stock-warmup", type=int, default=1)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip timing the step's matmuls alone (where the fast MLX step's time goes)")
    p.add_argument("--worker", choices=["mlx", "torch", "torch-compile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = mlx_worker(args) if args.worker == "mlx" else torch_worker(args, args.worker == "torch-compile")
        print(json.dumps(result))
        return

    from bdh_mlx.model import BDHConfig

    config = BDHConfig.from_preset(args.preset, dropout=args.dropout)
    flops = step_flops(config, args.batch_size, args.block_size)
    tokens = args.batch_size * args.block_size
    print(f"preset {args.preset} ({config.num_parameters:,} parameters, n_layer {config.n_layer}, "
          f"N {config.n_neurons}), batch {args.batch_size} x {args.block_size}, float32, dropout {args.dropout}, "
          f"{os.cpu_count()} CPUs")
    print(f"one training step: {flops / 1e9:.1f} GFLOP of matmuls (from the config), {tokens} tokens")
    print(f"{'variant':<18}{'matmul GFLOP/s':>16}{'tokens/s':>11}{'step GFLOP/s':>14}{'of peak':>9}  library")
    results = {}
    for name in args.variants:
        result = results[name] = run_variant(name, args)
        if result is None:
            continue
        achieved = result["tokens_per_s"] / tokens * flops / 1e9
        print(f"{name:<18}{result['matmul']:>16,.1f}{result['tokens_per_s']:>11,.0f}{achieved:>14,.1f}"
              f"{achieved / result['matmul']:>9.2f}  {os.path.basename(result['library'])}", flush=True)
    fast = results.get("mlx + OpenBLAS")
    if fast and fast["gemm_seconds"]:
        step_seconds = tokens / fast["tokens_per_s"]
        parts = ", ".join(f"{group} {s:.2f}" for group, s in fast["gemm_seconds"].items())
        rest = step_seconds - sum(fast["gemm_seconds"].values())
        print(f"mlx + OpenBLAS step {step_seconds:.2f} s: its matmuls alone take {parts} s; "
              f"the rest (elementwise, LayerNorm, RoPE, mask, AdamW) {rest:.2f} s")
    for other in ("mlx, stock BLAS", "torch eager", "torch.compile"):
        if fast and results.get(other):
            print(f"mlx + OpenBLAS / {other}: {fast['tokens_per_s'] / results[other]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
