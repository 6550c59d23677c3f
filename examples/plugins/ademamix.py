"""AdEMAMix: Adam with a second, slow momentum mixed into the numerator.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", ICLR 2025
(arXiv:2409.03952), Algorithm 1. For a parameter theta with gradient g at step t:

    m1 <- beta1 m1 + (1 - beta1) g                   fast EMA (Adam's first moment)
    m2 <- beta3(t) m2 + (1 - beta3(t)) g             slow EMA, no bias correction
    nu <- beta2 nu + (1 - beta2) g^2
    theta <- theta - lr * ((m1 / (1 - beta1^t) + alpha(t) m2) / (sqrt(nu / (1 - beta2^t)) + eps)
                           + weight_decay * theta)

with the schedulers of section 3 (T the warmup length; none when T = 0):

    alpha(t) = min(t alpha / T, alpha)
    beta3(t) = min(exp(ln(beta1) ln(beta3) / ((1 - t/T) ln(beta3) + (t/T) ln(beta1))), beta3)

alpha = 0 is AdamW. Paper defaults: beta3 = 0.9999, alpha = 5 (8 in some runs), T = the
run's length. Here beta1, beta2, eps, lr and weight decay are AdamW's keys (optim.beta1,
optim.beta2, optim.eps, optim.lr, optim.weight_decay); the plugin's own keys are
optim.ademamix_alpha, optim.ademamix_beta3 and optim.ademamix_warmup (T). It updates every
parameter (like AdamW), keeping three float32 states per parameter.

``normopt train --plugin examples/plugins/ademamix.py optim.name=ademamix``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from normopt.extend import MATH, OPTIMIZERS, OptimizerSpec, component_options, require, role


@dataclass
class AdEMAMixConfig:
    """AdEMAMix's own keys: optim.ademamix_<field>."""

    alpha: float = role(MATH, 5.0, "AdEMAMix: weight of the slow EMA in the update (0 = AdamW)")
    beta3: float = role(MATH, 0.9999, "AdEMAMix: decay of the slow EMA after its warmup")
    warmup: int = role(MATH, 0, "AdEMAMix: steps T of the alpha and beta3 warmup schedulers (0 = none)")

    def validate(self) -> None:
        require(self.alpha >= 0, "optim.ademamix_alpha", "must be >= 0")
        require(0 <= self.beta3 < 1, "optim.ademamix_beta3", "must be in [0, 1)")
        require(self.warmup >= 0, "optim.ademamix_warmup", "must be >= 0 (0 = no warmup)")


def alpha_at(step: int, alpha: float, warmup: int) -> float:
    """alpha(t) = min(t alpha / T, alpha); alpha without warmup."""
    return alpha if warmup <= 0 else min(step * alpha / warmup, alpha)


def beta3_at(step: int, beta1: float, beta3: float, warmup: int) -> float:
    """beta3(t), the slow EMA's decay growing from beta1 to beta3 over T steps (module docstring)."""
    if warmup <= 0 or beta1 <= 0:
        return beta3
    fraction = min(step / warmup, 1.0)
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log_beta1 * log_beta3 / ((1 - fraction) * log_beta3 + fraction * log_beta1)), beta3)


class AdEMAMix(torch.optim.Optimizer):
    """Algorithm 1 of the paper, elementwise (so it runs on FSDP2's sharded parameters as on
    whole ones, with the same numbers)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, warmup=0, eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, warmup=warmup, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2, beta3_final = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg_fast"] = torch.zeros_like(p)
                    state["exp_avg_slow"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"].item())
                grad = p.grad
                alpha = alpha_at(t, group["alpha"], group["warmup"])
                beta3 = beta3_at(t, beta1, beta3_final, group["warmup"])
                m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.lerp_(grad, 1 - beta1)
                m2.lerp_(grad, 1 - beta3)
                nu.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (nu / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m1 / (1 - beta1**t)).add_(m2, alpha=alpha).div_(denominator)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def build_ademamix(groups: list, optim_cfg, device_type: str) -> AdEMAMix:
    """The registry's builder: every group normopt hands over (all of them: not matrices-only)."""
    own = component_options(optim_cfg, "ademamix")
    return AdEMAMix(
        [g.torch_group() for g in groups],
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2, own.beta3),
        alpha=own.alpha,
        warmup=own.warmup,
        eps=optim_cfg.eps,
    )


OPTIMIZERS.register(
    OptimizerSpec("ademamix", build_ademamix, state_bytes=12, config=AdEMAMixConfig)  # m1, m2, nu in float32
)
