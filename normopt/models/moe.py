"""Mixture-of-experts SwiGLU feed-forward: top-k token-choice routing, routed experts stored
as 3-D weights, optional always-on shared experts, and load balancing.

For a token x (dim features) and E routed experts:

    s      = softmax(W_r x)  or  sigmoid(W_r x)               (router scores, float32)
    chosen = top-k over s + b                                   (b: the balancing bias, 0 unless aux_free)
    g_i    = s_i / sum_{j in chosen} s_j  for i in chosen       (normalised top-k weights)
    y      = sum_{i in chosen} g_i SwiGLU_i(x) + SwiGLU_shared(x)
    SwiGLU_i(x) = W2[i] (silu(W1[i] x) * W3[i] x),  W1, W3: (E, hidden, dim), W2: (E, dim, hidden)

No token is dropped: every expert processes every token routed to it.

Load balancing (``moe_balance``):

* ``aux_loss``: the DeepSeek-V2 expert-balance loss, per sequence of T tokens and averaged
  over the sequences:  L = coef * sum_i f_i P_i  with  f_i = E / (k T) * (tokens of the
  sequence sent to i)  and  P_i = mean over the sequence's tokens of s_i / sum_j s_j.
  Per sequence, so the loss of a batch does not depend on how it is split into micro-batches
  or ranks; perfectly balanced routing gives L = coef.
* ``aux_free``: the auxiliary-loss-free bias of DeepSeek-V3: b only changes which experts
  are chosen, never g. After each optimizer step b_i <- b_i + rate * sign(mean load - load_i),
  with the loads counted over the whole global batch (all ranks), so every rank keeps the
  same b. b is a buffer and is checkpointed with the model.
* ``none``: plain top-k routing.

Each layer counts the tokens routed to each expert over a step (``load_counts``, a buffer
that is not saved), which drives the bias and the logged load statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from normopt.key_roles import require
from normopt.models.swiglu import SwiGLU
from normopt.parallel import collectives

SCORES = ("softmax", "sigmoid")
BALANCE = ("aux_loss", "aux_free", "none")


def router_scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    """s = softmax(logits) or sigmoid(logits), in float32."""
    logits = logits.float()
    return logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()


def top_k_routing(
    scores: torch.Tensor, bias: torch.Tensor | None, k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices, weights), each (..., k): the k experts with the largest s + b, and
    their scores s (not s + b) divided by their sum when ``normalize``."""
    choice = scores if bias is None else scores + bias
    idx = choice.topk(k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return idx, weights


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens sent to each expert over the last dim's k choices and all leading dims: (E,)."""
    return torch.bincount(idx.flatten(), minlength=n_experts)


def balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Per-sequence expert-balance loss without its coefficient, averaged over sequences:
    mean_b sum_i f_{b,i} P_{b,i} with f = E / (k T) * count and P = mean_t s / sum_j s.
    ``scores`` (batch, T, E), ``idx`` (batch, T, k)."""
    batch, seq, k = idx.shape
    counts = torch.zeros(batch, n_experts, device=idx.device, dtype=scores.dtype)
    counts.scatter_add_(1, idx.reshape(batch, -1), torch.ones(batch, seq * k, device=idx.device, dtype=scores.dtype))
    f = counts * (n_experts / (k * seq))
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * P).sum(dim=-1).mean()


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of the share of routed tokens per expert; log E when perfectly balanced."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


class Router(nn.Module):
    forward_statistics = ("load_counts",)  # see models/activation_checkpoint.py
    param_role = "router"  # its gate is an optimizer group of its own (optim/param_groups.py)

    def __init__(self, dim: int, n_experts: int, top_k: int, score: str, balance: str, bias_rate: float = 0.0):
        super().__init__()
        self.n_experts, self.top_k, self.score, self.balance = n_experts, top_k, score, balance
        self.bias_rate = bias_rate
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.register_buffer("load_counts", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, expert indices, weights) for x of shape (batch, seq, dim)."""
        scores = router_scores(self.gate(x), self.score)
        bias = self.expert_bias if self.balance == "aux_free" else None
        idx, weights = top_k_routing(scores, bias, self.top_k)
        if self.training:
            with torch.no_grad():
                self.load_counts += expert_counts(idx, self.n_experts).to(self.load_counts.dtype)
        return scores, idx, weights

    @torch.no_grad()
    def update_bias(self, global_counts: torch.Tensor, rate: float) -> None:
        """b_i <- b_i + rate * sign(mean load - load_i) (aux_free), from the step's counts over
        all ranks."""
        if self.balance == "aux_free":
            self.expert_bias += rate * torch.sign(global_counts.mean() - global_counts).to(self.expert_bias.dtype)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The routing biases and pending counts at their init (zero)."""
        self.expert_bias.zero_()
        self.load_counts.zero_()

    @classmethod
    def end_optimizer_step(cls, routers: list[Router]) -> dict[str, torch.Tensor]:
        """The model's end-of-step hook (models/llama.py): :func:`commit_routers`, the
        step's token counts per (MoE layer, expert) to log (``expert_loads``)."""
        return {"expert_loads": commit_routers(routers)}

    @staticmethod
    def step_statistics_record(summed: dict[str, torch.Tensor]) -> dict:
        """Metrics fields of the expert loads summed over a logging window (:func:`load_summary`)."""
        return load_summary(summed["expert_loads"].cpu()) if "expert_loads" in summed else {}


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three 3-D weights (experts, out, in)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    # eager under train.compile: the per-expert token counts change every step, and each new
    # count would otherwise trigger a recompilation of the loop
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over each token's chosen experts of g_i SwiGLU_i(x), for x (tokens, dim) and
        idx, weights (tokens, k). Tokens are sorted by expert and each expert multiplies its
        own contiguous slice."""
        k = idx.shape[-1]
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = expert_counts(idx, self.w1.shape[0]).tolist()
        token = order // k
        gate = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token[start : start + n]
            h = x[rows]
            y = (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, rows, y * gate[start : start + n])
            start += n
        return out


class MoEFeedForward(nn.Module):
    name = "moe"
    aux_loss_name = "moe_aux_loss"  # forward returns (output, balance loss); logged under this name
    matrix_components = {f"ffn.{part}.{w}": "ffn" for part in ("experts", "shared") for w in ("w1", "w2", "w3")}

    def __init__(self, args):
        super().__init__()
        self.router = Router(
            args.dim, args.n_experts, args.moe_top_k, args.moe_score, args.moe_balance, args.moe_bias_rate
        )
        self.experts = GroupedExperts(args.n_experts, args.dim, args.moe_hidden)
        self.shared = SwiGLU(args.dim, args.n_shared_experts * args.moe_hidden) if args.n_shared_experts > 0 else None
        self.aux_coef = args.moe_aux_coef if args.moe_balance == "aux_loss" else 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, auxiliary loss) for x of shape (batch, seq, dim)."""
        scores, idx, weights = self.router(x)
        out = self.experts(x.flatten(0, 1), idx.flatten(0, 1), weights.flatten(0, 1)).view_as(x)
        if self.shared is not None:
            out = out + self.shared(x)
        aux = (
            self.aux_coef * balance_loss(scores, idx, self.router.n_experts)
            if self.aux_coef and self.training
            else scores.new_zeros(())
        )
        return out, aux

    def input_matrices(self) -> list[torch.Tensor]:
        shared = self.shared.input_matrices() if self.shared is not None else []
        return [self.router.gate.weight, self.experts.w1, self.experts.w3, *shared]

    def output_matrices(self) -> list[torch.Tensor]:
        shared = self.shared.output_matrices() if self.shared is not None else []
        return [self.experts.w2, *shared]

    # -- what the registry asks (models/components.py) --------------------------------

    @classmethod
    def build(cls, args) -> MoEFeedForward:
        return cls(args)

    @classmethod
    def check_shapes(cls, args) -> None:
        require(
            args.moe_top_k <= args.n_experts,
            "model.moe_top_k",
            f"{args.moe_top_k} experts per token but only {args.n_experts} experts",
        )

    @classmethod
    def fill_shapes(cls, args) -> dict:
        """Unset sizes: 8 experts of hidden ffn_hidden / 2 (the dense active size at top-2)."""
        defaults = dict(n_experts=8, moe_hidden=max(1, args.ffn_hidden // 2))
        return {k: v for k, v in defaults.items() if not getattr(args, k)}

    @classmethod
    def param_counts(cls, args) -> tuple[int, int]:
        return moe_param_counts(args)

    @classmethod
    def saved_bytes_per_token(cls, args, compute_bytes: int) -> int:
        """4 hidden vectors per expert a token visits (routed and shared), and the float32
        router scores."""
        return 4 * compute_bytes * args.moe_hidden * (args.moe_top_k + args.n_shared_experts) + 4 * 2 * args.n_experts

    @classmethod
    def describe(cls, args, total_params: int, active_params: int) -> str | None:
        return (
            f"ffn: moe {args.n_experts} experts (hidden {args.moe_hidden}), top-{args.moe_top_k} {args.moe_score}, "
            f"{args.n_shared_experts} shared, balance {args.moe_balance}; active parameters "
            f"{active_params:,} of {total_params:,}"
        )


def moe_param_counts(args) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer: router E d, routed experts
    E 3 d h (k of them active), shared experts n_s 3 d h (always active)."""
    expert = 3 * args.dim * args.moe_hidden
    router = args.n_experts * args.dim
    shared = args.n_shared_experts * expert
    return router + args.n_experts * expert + shared, router + args.moe_top_k * expert + shared


def moe_routers(model: nn.Module) -> list[Router]:
    """The routers of the model's MoE layers, shallowest first."""
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def commit_expert_loads(
    model: nn.Module, bias_rate: float, group: dist.ProcessGroup | None = None
) -> torch.Tensor | None:
    """End of an optimizer step: sum every router's token counts over the ranks (one
    all-reduce for all layers), step the aux-free biases with them and clear the counts.
    Returns the step's counts, (MoE layers, experts), or None for a model without MoE.
    Call it once per optimizer step, on every rank."""
    routers = moe_routers(model)
    return commit_routers(routers, bias_rate, group) if routers else None


@torch.no_grad()
def commit_routers(
    routers: list[Router], bias_rate: float | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """:func:`commit_expert_loads` for the given routers, each stepping its biases at
    ``bias_rate`` (None: its own ``bias_rate``)."""
    counts = torch.stack([r.load_counts for r in routers])
    collectives.all_reduce_sum(counts, group)
    for router, layer_counts in zip(routers, counts):
        router.update_bias(layer_counts, router.bias_rate if bias_rate is None else bias_rate)
        router.load_counts.zero_()
    return counts


def load_summary(counts: torch.Tensor) -> dict[str, list]:
    """Per MoE layer, from token counts (layers, experts): the counts, the entropy of the
    load shares (nats; log E = perfectly even) and the busiest expert's load over the mean."""
    counts = counts.double()
    return {
        "moe_tokens_per_expert": [[int(c) for c in row] for row in counts],
        "moe_load_entropy": [load_entropy(row) for row in counts],
        "moe_max_over_mean": [float(row.max() / row.mean().clamp_min(1e-12)) for row in counts],
    }
