"""What a normalization layer does to its input, measured on a probe batch.

For a bounded layer y = g * f(z) + b with z its pre-activation (DyT: z = alpha x, f = tanh;
Derf: z = alpha x + s, f = erf; derf_ema: z = alpha x / c + s, f = erf) and for a
normalising (unbounded) layer such as RMSNorm (y = g * x / rms(x)) or LayerNorm, three
numbers per layer; each layer supplies its own z and core (see
:class:`~normopt.models.norm_layer.NormLayer`), so nothing here names a norm:

* saturation: the share of pre-activations where f's slope is below 10% of its maximum,
      tanh: 1 - tanh(z)^2 < 0.1  <=>  |z| > atanh(sqrt(0.9)) ~ 1.818
      erf:  exp(-z^2) < 0.1       <=>  |z| > sqrt(ln 10)    ~ 1.517
  (f'(z) / f'(0) for both). Unbounded layers have no saturation (None).
* scale_across_tokens: does a token with twice the RMS come out larger? The least-squares
  slope of log rms(core(x)_t) on log rms(x_t) over the probe's tokens t, where core is the
  layer without its affine g, b (g and b are the same for every token). 1 = the scale
  passes through (identity), 0 = it is discarded (RMSNorm, or erf saturated to +-1).
* linearity_within_token: is the relative size of features within a token preserved? The
  mean over tokens of R^2 = corr(x_t, core(x_t))^2 across the token's features: 1 for any
  map that is linear within a token (identity, RMSNorm), 2/pi ~ 0.637 for a hard sign of
  Gaussian features (fully saturated erf or tanh).

Layers with numbers of their own add them (derf_ema: its running scale c and effective
alpha alpha / c).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from normopt.diagnostics.diagnostic import Diagnostic, DiagnosticRun, full_matrix
from normopt.metrics.record_fields import mapping_field, optional_metric
from normopt.models.norm_layer import NormLayer
from normopt.run_dir import RecordKind

SLOPE_FRACTION = 0.1
SATURATION_THRESHOLD = {
    "tanh": math.atanh(math.sqrt(1.0 - SLOPE_FRACTION)),  # 1 - tanh^2 = 0.1
    "erf": math.sqrt(math.log(1.0 / SLOPE_FRACTION)),  # exp(-z^2) = 0.1
}


def saturation_share(z: torch.Tensor, function: str) -> float:
    """Share of entries of z with f'(z) < 0.1 f'(0), i.e. |z| > SATURATION_THRESHOLD[f]."""
    return float((z.float().abs() > SATURATION_THRESHOLD[function]).float().mean())


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """rms over the last (feature) dim, one value per token: sqrt(mean_i x_i^2)."""
    return x.float().pow(2).mean(dim=-1).sqrt()


def scale_across_tokens(x: torch.Tensor, y: torch.Tensor) -> float:
    """beta = cov(log r_x, log r_y) / var(log r_x) over tokens, r = token_rms; NaN when
    all tokens have the same input scale (the slope is undefined)."""
    lx = token_rms(x).clamp_min(1e-30).log().flatten().double()
    ly = token_rms(y).clamp_min(1e-30).log().flatten().double()
    dx = lx - lx.mean()
    var = (dx * dx).mean()
    if float(var) <= 1e-12 * max(1.0, float(lx.abs().max())) ** 2:
        return float("nan")
    return float((dx * (ly - ly.mean())).mean() / var)


def linearity_within_token(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of corr(x_t, y_t)^2 across features; tokens whose input or output
    is constant (no defined correlation) are left out; NaN if none is left."""
    x = x.double().flatten(0, -2)
    y = y.double().flatten(0, -2)
    dx = x - x.mean(dim=-1, keepdim=True)
    dy = y - y.mean(dim=-1, keepdim=True)
    sxx, syy, sxy = (dx * dx).sum(-1), (dy * dy).sum(-1), (dx * dy).sum(-1)
    scale_x, scale_y = x.abs().amax(-1).clamp_min(1e-300), y.abs().amax(-1).clamp_min(1e-300)
    defined = (sxx > 1e-20 * scale_x**2 * x.shape[-1]) & (syy > 1e-20 * scale_y**2 * y.shape[-1])
    if not bool(defined.any()):
        return float("nan")
    r2 = sxy[defined] ** 2 / (sxx[defined] * syy[defined])
    return float(r2.mean())


def norm_layer_stats(module: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """The per-layer record (see the module docstring) and the pre-activations (for a
    histogram; None for an unbounded layer)."""
    if not isinstance(module, NormLayer):
        raise TypeError(f"not a normopt norm layer: {type(module).__name__}")
    z, core = module.preactivation(x), module.core(x)
    record = {
        "type": module.name,
        "saturation": saturation_share(z, module.saturating_function) if z is not None else None,
        "alpha": float(module.alpha.detach()) if hasattr(module, "alpha") else None,
        "shift": float(module.shift.detach()) if hasattr(module, "shift") else None,
        "scale_across_tokens": scale_across_tokens(x, core),
        "linearity_within_token": linearity_within_token(x, core),
        "input_rms": float(token_rms(x).mean()),
    }
    record.update(module.diagnostic_extras())
    return record, z


# --------------------------------------------------------------------------- the diagnostic


class NormStats(Diagnostic):
    """Per norm layer, on the probe batch: saturation, alpha, shift, scale_across_tokens,
    linearity_within_token, input_rms (module docstring), and what a layer adds of its own;
    the embedding scale, when the model has one. Every record's ``layers``: name -> stats."""

    name = RecordKind.NORM
    help = "norm-layer statistics on a fixed probe batch (saturation, scale and linearity)"
    keys = ("interval", "probe_sequences", "histograms")

    def __init__(self, run: DiagnosticRun):
        super().__init__(run)
        self.norm_layers = {name: m for name, m in run.model.named_modules() if isinstance(m, NormLayer)}

    @torch.no_grad()
    def collect(self, step: int, **inputs) -> dict:
        """Forward the probe batch with hooks on every norm layer (eval mode: derf_ema's
        running scale is not touched, so training is unchanged)."""
        stats: dict[str, dict] = {}
        preacts: dict[str, torch.Tensor] = {}

        def hook(name):
            def capture(module, args, output):
                stats[name], z = norm_layer_stats(module, args[0])
                if z is not None:
                    preacts[name] = z

            return capture

        model = self.run.model
        handles = [m.register_forward_hook(hook(n)) for n, m in self.norm_layers.items()]
        was_training = model.training
        model.eval()
        try:
            model(self.run.probe_inputs)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        for name, z in preacts.items():
            self.run.histogram(f"diag_norm/{name}/preactivation", z, step)
        record: dict = {"layers": stats}
        scale = getattr(model, "embed_scale", None)
        if scale is not None:  # a collective on sharded models: every rank calls this
            record["embed_scale"] = float(full_matrix(scale).detach())
        return record

    @classmethod
    def mirror(cls, record, tensorboard, histograms: bool) -> None:
        if "embed_scale" in record:
            tensorboard.add_scalar("diag_norm/embed_scale", record["embed_scale"], record["step"])

    @staticmethod
    def read(record) -> dict[str, float]:
        """Layer name -> saturation, for the layers of the record that report one."""
        found = {}
        for name, layer in mapping_field(record, "layers").items():
            if not isinstance(layer, Mapping):
                raise ValueError(f"layer {name!r} is not an object")
            value = optional_metric(layer.get("saturation"))
            if value is not None:
                found[str(name)] = value
        return found
