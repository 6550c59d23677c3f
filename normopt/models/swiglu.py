"""The dense feed-forward (``model.ffn: dense``): SwiGLU, w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    name = "dense"
    aux_loss_name = None  # returns its output only (see the model protocol, models/llama.py)
    matrix_components = {"ffn.w1": "ffn", "ffn.w2": "ffn", "ffn.w3": "ffn"}

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def input_matrices(self) -> list[torch.Tensor]:
        return [self.w1.weight, self.w3.weight]

    def output_matrices(self) -> list[torch.Tensor]:
        return [self.w2.weight]

    # -- what the registry asks (models/components.py) --------------------------------

    @classmethod
    def build(cls, args) -> SwiGLU:
        return cls(args.dim, args.ffn_hidden)

    @classmethod
    def check_shapes(cls, args) -> None:
        """Refuse (UserError naming the key) a shape this feed-forward cannot take."""

    @classmethod
    def fill_shapes(cls, args) -> dict:
        return {}

    @classmethod
    def param_counts(cls, args) -> tuple[int, int]:
        """(total, active per token): 3 d f both."""
        return (3 * args.dim * args.ffn_hidden,) * 2

    @classmethod
    def saved_bytes_per_token(cls, args, compute_bytes: int) -> int:
        """w1's and w3's outputs, silu's output and the product w2 reads: 4 hidden vectors."""
        return 4 * compute_bytes * args.ffn_hidden

    @classmethod
    def describe(cls, args, total_params: int, active_params: int) -> str | None:
        return None
