"""Write the PyTorch reference fixtures that tests/test_parity.py checks the MLX model against.

Needs torch (``pip install torch``); run from the repository root as ``python tests/make_fixtures.py``.
The package never imports this file. The model below is a small PyTorch BDH written from
the paper's equations in the shape of the official code: the same parameter names,
the ``attn.freqs`` buffer, and ``forward(idx, targets) -> (logits, loss)``.

Each fixture ``tests/fixtures/<name>.npz`` holds the config (JSON bytes as uint8), every
parameter under its official name, ``attn.freqs``, ``idx``, ``targets``, ``logits``,
``loss`` and ``grad.<name>`` for every parameter, all computed in float32 with dropout 0.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures"

# name: (config, batch, time, seed). Tiny dims so the files stay small.
CASES = {
    "base": (dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=256), 2, 16, 0),
    "odd_heads": (dict(n_layer=3, n_embd=24, n_head=3, mlp_internal_dim_multiplier=4, vocab_size=97), 3, 33, 1),
    "single_token": (dict(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=64), 2, 1, 2),
    "long": (dict(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=64), 2, 520, 3),
}


@dataclasses.dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256


def get_freqs(n, theta, dtype):
    """f[j] = 1 / theta^(2 floor(j/2) / n) / 2pi."""
    j = torch.arange(0, n, 1, dtype=dtype)
    return 1.0 / (theta ** ((j / 2).floor() * 2 / n)) / (2 * math.pi)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        N = config.mlp_internal_dim_multiplier * config.n_embd // config.n_head
        self.register_buffer("freqs", get_freqs(N, theta=2**16, dtype=torch.float32).view(1, 1, 1, N))

    @staticmethod
    def rope(phases, v):
        v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
        phases = (phases % 1) * (2 * math.pi)
        return v * torch.cos(phases) + v_rot * torch.sin(phases)

    def forward(self, Q, K, V):
        assert Q is K
        T = Q.size(-2)
        r_phases = torch.arange(0, T, dtype=self.freqs.dtype).view(1, 1, -1, 1) * self.freqs
        QR = self.rope(r_phases, Q)
        scores = (QR @ QR.mT).tril(diagonal=-1)
        return scores @ V


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D = config.n_head, config.n_embd
        N = config.mlp_internal_dim_multiplier * D // nh
        self.decoder = nn.Parameter(torch.zeros((nh * N, D)).normal_(std=0.02))
        self.encoder = nn.Parameter(torch.zeros((nh, D, N)).normal_(std=0.02))
        self.attn = Attention(config)
        self.ln = nn.LayerNorm(D, elementwise_affine=False, bias=False)
        self.embed = nn.Embedding(config.vocab_size, D)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.drop = nn.Dropout(config.dropout)
        self.encoder_v = nn.Parameter(torch.zeros((nh, D, N)).normal_(std=0.02))
        self.lm_head = nn.Parameter(torch.zeros((D, config.vocab_size)).normal_(std=0.02))

    def forward(self, idx, targets=None):
        C = self.config
        B, T = idx.size()
        D, nh = C.n_embd, C.n_head
        N = D * C.mlp_internal_dim_multiplier // nh

        x = self.ln(self.embed(idx).unsqueeze(1))  # B, 1, T, D
        for _ in range(C.n_layer):
            x_sparse = F.relu(x @ self.encoder)  # B, nh, T, N
            yKV = self.ln(self.attn(Q=x_sparse, K=x_sparse, V=x))
            y_sparse = F.relu(yKV @ self.encoder_v)
            xy_sparse = self.drop(x_sparse * y_sparse)  # B, nh, T, N
            yMLP = xy_sparse.transpose(1, 2).reshape(B, 1, T, N * nh) @ self.decoder  # B, 1, T, D
            x = self.ln(x + self.ln(yMLP))
        logits = x.view(B, T, D) @ self.lm_head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_fixture(config: dict, batch: int, time: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = BDH(BDHConfig(dropout=0.0, **config)).eval()
    idx = torch.randint(0, config["vocab_size"], (batch, time))
    targets = torch.randint(0, config["vocab_size"], (batch, time))
    logits, loss = model(idx, targets)
    loss.backward()
    arrays = {"config": np.frombuffer(json.dumps({**config, "dropout": 0.0}).encode(), dtype=np.uint8)}
    arrays.update({k: v.detach().numpy() for k, v in model.state_dict().items()})
    arrays.update({f"grad.{k}": p.grad.numpy() for k, p in model.named_parameters()})
    arrays.update(idx=idx.numpy(), targets=targets.numpy(), logits=logits.detach().numpy(), loss=loss.detach().numpy())
    return arrays


def main():
    FIXTURES.mkdir(exist_ok=True)
    for name, (config, batch, time, seed) in CASES.items():
        path = FIXTURES / f"{name}.npz"
        np.savez(path, **make_fixture(config, batch, time, seed))
        print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
