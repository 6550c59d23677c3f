"""Dynamic erf (Derf, arXiv 2512.10938) and normopt's EMA-blend fix (``derf_ema``).

Derf is bounded like DyT but saturates faster (erf approaches +-1 sooner than tanh), which
makes it sensitive to the growth of activations: large inputs are compressed (saturation)
and their magnitude is discarded (scale blindness).

``derf_ema`` reintroduces a running estimate of how much the input scale has grown since
the layer started. With x the layer input, m the EMA momentum, lambda the blend weight and
v_t = mean(x^2) over the global batch of optimizer step t (every micro-batch, every rank):

    r_t  = m r_{t-1} + (1 - m) v_t,   r_0 = 0            (once per optimizer step)
    rh_t = r_t / (1 - m^t)                               (bias-corrected EMA)
    r*   = v_1                                           (the first committed statistic)
    c    = (1 - lambda) + lambda sqrt(rh_t / r*)         (c = 1 before the first commit)
    y    = g * erf(alpha x / c + s) + b

c is unitless: multiplying every input by a constant leaves it unchanged, so the layer is
scale-equivariant in its running statistic, starts as plain Derf (c = 1 until activations
grow), and when the input RMS grows k-fold and stays there, c tends to (1 - lambda) + lambda k.
Large inputs are then rescaled before erf saturates, while per-token magnitude differences
survive because c is shared by all tokens. alpha / c is the layer's effective alpha.

The statistics are float64 buffers (a float32 EMA drifts by ~eps / (1 - m) from a constant
input), saved with the model and updated from statistics averaged over every data-parallel
rank and micro-batch of the step, so they are identical on every rank and the same for any
number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from normopt.models.norm_layer import Location, NormConfig, NormLayer
from normopt.parallel import collectives


def derf(
    x: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """y = g * erf(alpha * x / scale + s) (+ b), evaluated in float32."""
    arg = alpha.float() * (x.float() / scale) + shift.float()
    y = torch.erf(arg) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def ema_update(running: torch.Tensor, observed: torch.Tensor, momentum: float) -> torch.Tensor:
    """r <- m * r + (1 - m) * observed."""
    return running * momentum + observed * (1.0 - momentum)


def blended_scale(
    running: torch.Tensor, reference: torch.Tensor, commits: torch.Tensor, momentum: float, blend: float
) -> torch.Tensor:
    """c = (1 - lambda) + lambda sqrt(rh / r*) with rh = r / (1 - m^n) after n >= 1 commits;
    c = 1 before the first commit (n = 0) or when r* = 0 (an all-zero first input)."""
    started = (commits > 0) & (reference > 0)
    corrected = running / (1.0 - momentum ** commits.clamp(min=1))
    ratio = torch.where(
        started, corrected / torch.where(started, reference, torch.ones_like(reference)), torch.ones_like(running)
    )
    return (1.0 - blend) + blend * ratio.sqrt()


class Derf(NormLayer):
    """g * erf(a x + s) + b with learnable scalars a, s (shape (1,)) and per-feature g and
    (with ``bias``, as in Derf's reference code) b."""

    name = "derf"
    saturating_function = "erf"

    def __init__(self, dim: int, alpha_init: float = 0.5, shift_init: float = 0.0, bias: bool = True):
        super().__init__()
        self.alpha_init, self.shift_init = alpha_init, shift_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.shift = nn.Parameter(torch.full((1,), shift_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> Derf:
        return cls(dim, cfg.alpha_init(location), cfg.shift_init, bias=cfg.bias)

    @classmethod
    def param_count(cls, dim: int, cfg: NormConfig) -> int:
        return dim + (dim if cfg.bias else 0) + 2  # g, b, alpha, shift; derf_ema's statistics are buffers

    def input_scale(self) -> torch.Tensor | float:
        """The divisor of x inside erf: 1 for plain Derf."""
        return 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return derf(x, self.alpha, self.shift, self.weight, self.bias, self.input_scale())

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """z = alpha x / c + s, the argument of erf (c = 1 for plain Derf)."""
        return self.alpha.float() * (x.float() / self.input_scale()) + self.shift.float()

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.preactivation(x))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.constant_(self.shift, self.shift_init)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, alpha_init={self.alpha_init}, shift_init={self.shift_init}, "
            f"bias={self.bias is not None}"
        )


class DerfEMA(Derf):
    """Derf whose argument is divided by the blended growth of its input scale (module doc).

    In training mode each forward adds mean(x^2) of its micro-batch to a pending sum; the
    trainer folds the pending statistics into the running estimate once per optimizer step
    (the model's end-of-step hook, :meth:`end_optimizer_step`), averaged over all ranks.
    """

    forward_statistics = ("pending_sum", "pending_count")  # see models/activation_checkpoint.py

    name = "derf_ema"
    fix_of = Derf.name

    @classmethod
    def end_optimizer_step(cls, layers: list[DerfEMA]) -> dict[str, torch.Tensor]:
        """The model's end-of-step hook (models/llama.py): fold every layer's pending
        statistics, one all-reduce for all of them; nothing to log."""
        fold_running_scales(layers)
        return {}

    def __init__(
        self,
        dim: int,
        alpha_init: float = 0.5,
        shift_init: float = 0.0,
        momentum: float = 0.99,
        blend: float = 0.5,
        bias: bool = True,
    ):
        super().__init__(dim, alpha_init, shift_init, bias)
        self.momentum, self.blend = momentum, blend
        f64 = torch.float64
        self.register_buffer("running_mean_square", torch.zeros(1, dtype=f64))  # r (not bias-corrected)
        self.register_buffer("reference_mean_square", torch.zeros(1, dtype=f64))  # r*
        self.register_buffer("commits", torch.zeros(1, dtype=f64))  # n
        self.register_buffer("pending_sum", torch.zeros(1, dtype=f64), persistent=False)
        self.register_buffer("pending_count", torch.zeros(1, dtype=f64), persistent=False)

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> DerfEMA:
        return cls(dim, cfg.alpha_init(location), cfg.shift_init, cfg.ema_momentum, cfg.ema_blend, bias=cfg.bias)

    def input_scale(self) -> torch.Tensor:
        return blended_scale(
            self.running_mean_square, self.reference_mean_square, self.commits, self.momentum, self.blend
        ).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.pending_sum += x.detach().float().pow(2).mean().double()
                self.pending_count += 1
        return super().forward(x)

    def commit(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """Fold the step's statistic v = total / count into r and record r* on the first
        commit; a step with no forward (count 0) changes nothing. Tensor ops only, so a
        step costs no host synchronisation."""
        seen = count > 0
        observed = total / count.clamp(min=1)
        first = seen & (self.commits == 0)
        self.reference_mean_square.copy_(torch.where(first, observed, self.reference_mean_square))
        self.running_mean_square.copy_(
            torch.where(seen, ema_update(self.running_mean_square, observed, self.momentum), self.running_mean_square)
        )
        self.commits.add_(seen.to(self.commits.dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for buffer in (
            self.running_mean_square,
            self.reference_mean_square,
            self.commits,
            self.pending_sum,
            self.pending_count,
        ):
            buffer.zero_()

    def diagnostic_extras(self) -> dict[str, float]:
        """The running scale c and the effective alpha alpha / c."""
        scale = float(self.input_scale())
        return {"running_scale": scale, "effective_alpha": float(self.alpha.detach()) / scale}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, blend={self.blend}"


@torch.no_grad()
def commit_running_scales(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Fold every DerfEMA layer's pending statistics into its running estimate.

    One all-reduce carries all layers' statistics, so the buffers stay identical on every
    rank. Call it once per optimizer step, on every rank.
    """
    fold_running_scales([m for m in model.modules() if isinstance(m, DerfEMA)], group)


def fold_running_scales(layers: list[DerfEMA], group: dist.ProcessGroup | None = None) -> None:
    """:func:`commit_running_scales` for the given layers."""
    if not layers:
        return
    stats = torch.cat([torch.cat([m.pending_sum, m.pending_count]) for m in layers]).view(-1, 2)
    collectives.all_reduce_sum(stats, group)
    for layer, (total, count) in zip(layers, stats):
        layer.commit(total, count)
        layer.pending_sum.zero_()
        layer.pending_count.zero_()
