"""The singular values Newton-Schulz receives, and how many NS steps they need.

Muon hands NS the momentum matrix G = U S V^T, and NS works on X_0 = G / ||G||_F, whose
singular values are

    sigma_i / ||G||_F,      ||G||_F = sqrt(sum_j sigma_j^2),

all in [0, 1] (``newton_schulz`` adds eps = 1e-7 to the norm; negligible here). After k
steps each of them has become p_k(sigma_i / ||G||_F), the scalar map ``ns_scalar_map``
(the singular vectors never change). A direction is orthonormalized when its output is
near 1; small singular values start near 0 and need more steps to get there.

This module summarizes one matrix by quantiles of its singular values (relative to the
largest and to the Frobenius norm), the deviation |p_k(sigma) - 1| NS leaves at those
quantiles, and the fewest steps that bring them into a band around 1. Everything is pure
math on tensors: no distributed code, no logging.

Default bands (``DEFAULT_BANDS``), the "close enough to 1" interval per coefficient set:

- quintic (3.4445, -4.7750, 2.0315) does not converge to 1. Iterated, its outputs settle
  in [0.6818, 1.1344] (the lower edge is the local minimum p(1.0505) = 0.6818, the upper
  the image of the global maximum p(0.5546) = 1.2024). The band (0.6, 1.25) holds that
  whole cycle with some margin and p maps it into itself (p([0.6, 1.25]) = [0.6818,
  1.2024]), so a singular value that reaches it stays in it, and the steps needed fall
  monotonically with sigma. 5 steps bring every sigma >= 1.3e-3 into it (checked on a
  log grid of sigma with ``ns_scalar_map`` in float64), 6 steps sigma >= 3.8e-4, each
  further step gains a factor ~3.44 (= a, the slope at 0).
- polar_express converges to 1, but its first steps overshoot (step 1 maps 1 to 1.76),
  so a band is only meaningful near the end of its schedule. (0.8, 1.2), within 20% of
  1, is what its 5-step output reaches for every sigma >= 9.3e-4, i.e. the schedule's
  design range [1e-3, 1]; 6 steps give sigma >= 5.5e-4. Because of the overshoot a
  single sigma can pass through the band early and leave it again: use
  ``fewest_ns_steps_joint`` over a whole set of singular values for a configuration.

Both bands are chosen so that the shipped default of 5 steps covers sigma >~ 1e-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from normopt.diagnostics.diagnostic import OPTIMIZER_STEP, Diagnostic, block_index, full_matrix
from normopt.optim.head_blocks import split_heads
from normopt.optim.newton_schulz import CoefficientSpec, coefficients_for_steps, ns_scalar_map
from normopt.parallel import collectives
from normopt.run_dir import RecordKind

Band = tuple[float, float]
SigmaLike = Union[torch.Tensor, float, Sequence[float]]

DEFAULT_LEVELS: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9, 0.99)
DEFAULT_BANDS: dict[str, Band] = {
    "quintic": (0.6, 1.25),
    "polar_express": (0.8, 1.2),
}
DEFAULT_MAX_STEPS = 30


def default_band(coefficients: CoefficientSpec) -> Band:
    """``DEFAULT_BANDS`` entry for a coefficient name; ValueError for custom triples (no
    band is known for them, pass one explicitly)."""
    if isinstance(coefficients, str):
        key = coefficients.strip().lower().replace("-", "_")
        if key in DEFAULT_BANDS:
            return DEFAULT_BANDS[key]
    raise ValueError(f"no default band for NS coefficients {coefficients!r}; pass band=(lo, hi)")


def _check_band(band: Sequence[float]) -> Band:
    lo, hi = (float(v) for v in band)
    if not lo < hi:
        raise ValueError(f"band: expected lo < hi, got {tuple(band)!r}")
    return lo, hi


def _as_float64(sigma: SigmaLike) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()


# --------------------------------------------------------------------------- spectrum


def singular_values(G: torch.Tensor) -> torch.Tensor:
    """The min(m, n) singular values of a matrix, descending, in at least float32.

    bf16/fp16 inputs are promoted to float32 (svdvals needs it); float64 stays float64.
    """
    if G.ndim != 2 or G.numel() == 0:
        raise ValueError(f"singular_values: expected a non-empty matrix, got shape {tuple(G.shape)}")
    dtype = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.svdvals(G.detach().to(dtype))


def relative_singular_values(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_i / sigma_max, sigma_i / ||G||_F) for all min(m, n) singular values, ascending,
    on the CPU. The second is the spectrum of the NS input X_0. An all-zero G gives zeros
    (not NaN).

    A stack (..., m, n), such as the head blocks of a matrix Muon orthogonalises per head
    (``optim.muon_split_heads``), is that many NS inputs: each matrix is taken relative to
    its own sigma_max and Frobenius norm, and the values of all of them are pooled.
    """
    if G.ndim > 2:
        parts = [relative_singular_values(M) for M in G.reshape(-1, *G.shape[-2:])]
        return tuple(torch.cat([part[i] for part in parts]).sort().values for i in (0, 1))  # type: ignore[return-value]
    sigma = singular_values(G).cpu().flip(0)
    top = sigma[-1]
    fro = sigma.square().sum().sqrt()
    rel_max = sigma / top if top > 0 else torch.zeros_like(sigma)
    rel_fro = sigma / fro if fro > 0 else torch.zeros_like(sigma)
    return rel_max, rel_fro


def _quantiles(values: torch.Tensor, levels: Sequence[float]) -> list[float]:
    """torch.quantile's 'linear' rule: sort ascending, read position (n - 1) * level,
    interpolate linearly between the two neighbours (numpy's default)."""
    q = torch.tensor([float(v) for v in levels], dtype=values.dtype)
    if q.numel() == 0 or ((q < 0) | (q > 1)).any():
        raise ValueError(f"levels: expected at least one level in [0, 1], got {tuple(levels)!r}")
    return torch.quantile(values, q, interpolation="linear").tolist()


def singular_value_quantiles(G: torch.Tensor, levels: Sequence[float] = DEFAULT_LEVELS) -> dict[str, list[float]]:
    """Quantiles of G's singular values at ``levels`` (level 0.01 = near the smallest).

    Returns {"sv_rel_max": quantiles of sigma_i / sigma_max,
             "sv_rel_fro": quantiles of sigma_i / ||G||_F (what NS sees)},
    over the min(m, n) singular values, with torch.quantile's linear interpolation (see
    ``_quantiles``). An all-zero G gives all zeros.
    """
    rel_max, rel_fro = relative_singular_values(G)
    return {"sv_rel_max": _quantiles(rel_max, levels), "sv_rel_fro": _quantiles(rel_fro, levels)}


# --------------------------------------------------------------------------- NS response


def ns_output_deviation(
    sigma_rel_fro: SigmaLike, steps: int = 5, coefficients: CoefficientSpec = "quintic"
) -> torch.Tensor:
    """|p_k(sigma) - 1| elementwise, p_k = ``ns_scalar_map`` with k = ``steps``.

    ``sigma_rel_fro`` are singular values of the NS input X_0 (a float, a sequence or a
    tensor); the result is a float64 tensor of the same shape (0-dim for a float).
    """
    return (ns_scalar_map(_as_float64(sigma_rel_fro), steps, coefficients) - 1.0).abs()


def _in_band_by_step(sigma: torch.Tensor, band: Band, coefficients: CoefficientSpec, max_steps: int) -> torch.Tensor:
    """Boolean (max_steps + 1, *sigma.shape): row k says lo <= p_k(sigma) <= hi."""
    lo, hi = _check_band(band)
    out = sigma
    rows = [(out >= lo) & (out <= hi)]
    for triple in coefficients_for_steps(coefficients, max_steps):
        out = ns_scalar_map(out, 1, triple)  # p_{k+1} = step k applied to p_k: one pass, not k
        rows.append((out >= lo) & (out <= hi))
    return torch.stack(rows)


def _first_true(flags: torch.Tensor) -> int | None:
    hits = flags.nonzero()
    return int(hits[0]) if hits.numel() else None


def _first_true_per_column(table: torch.Tensor) -> list[int | None]:
    return [_first_true(table[:, i]) for i in range(table.shape[1])]


def fewest_ns_steps_many(
    sigma_rel_fro: SigmaLike,
    band: Band | None = None,
    coefficients: CoefficientSpec = "quintic",
    max_steps: int = DEFAULT_MAX_STEPS,
) -> list[int | None]:
    """``fewest_ns_steps`` for each of several singular values (flattened), in one pass."""
    sigma = _as_float64(sigma_rel_fro).reshape(-1)
    band = default_band(coefficients) if band is None else band
    return _first_true_per_column(_in_band_by_step(sigma, band, coefficients, max_steps))


def fewest_ns_steps(
    sigma_rel_fro: float,
    band: Band | None = None,
    coefficients: CoefficientSpec = "quintic",
    max_steps: int = DEFAULT_MAX_STEPS,
) -> int | None:
    """Smallest k >= 0 with lo <= p_k(sigma) <= hi, or None if no k <= ``max_steps`` does.

    p_k is ``ns_scalar_map`` (k steps of ``coefficients``), sigma a singular value of the
    NS input X_0 = G / ||G||_F; ``band`` defaults to ``DEFAULT_BANDS[coefficients]``.
    k = 0 means sigma is in the band already.
    """
    return fewest_ns_steps_many([float(sigma_rel_fro)], band, coefficients, max_steps)[0]


def fewest_ns_steps_joint(
    sigma_rel_fro: SigmaLike,
    band: Band | None = None,
    coefficients: CoefficientSpec = "quintic",
    max_steps: int = DEFAULT_MAX_STEPS,
) -> int | None:
    """Smallest k >= 0 with lo <= p_k(sigma) <= hi for every given sigma at once (None if
    no k <= ``max_steps``, or no sigma given).

    For the quintic band, which p maps into itself, this is the max of the per-sigma
    answers; for overshooting schedules (polar_express) it can be larger.
    """
    sigma = _as_float64(sigma_rel_fro).reshape(-1)
    if sigma.numel() == 0:
        return None
    band = default_band(coefficients) if band is None else band
    return _first_true(_in_band_by_step(sigma, band, coefficients, max_steps).all(dim=1))


# --------------------------------------------------------------------------- record


def ns_spectrum_record(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSpec = "quintic",
    levels: Sequence[float] = DEFAULT_LEVELS,
    band: Band | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    momentum: torch.Tensor | None = None,
) -> dict:
    """Everything the diagnostics log says about one matrix G handed to NS (or a stack of the
    matrices NS runs on separately, pooled as in ``relative_singular_values``):

    - "sv_rel_max", "sv_rel_fro": quantiles at ``levels`` (``singular_value_quantiles``)
    - "momentum_sv_rel_max", "momentum_sv_rel_fro": the same quantiles of the momentum
      buffer m. Pass ``momentum`` = m when it differs from G (Nesterov: G = g + beta m; one
      more SVD); leave it None when G is m itself (no Nesterov): G's quantiles are repeated.
    - "ns_steps": ``steps``, the configuration the deviations below are measured at
    - "ns_out_dev": |p_steps(q) - 1| at each sv_rel_fro quantile q
    - "ns_out_max_dev": max over ALL singular values sigma of X_0 of |p_steps(sigma) - 1|
    - "min_ns_steps": ``fewest_ns_steps`` of each sv_rel_fro quantile (None if not reached)
    - "min_ns_steps_all": ``fewest_ns_steps_joint`` of all sv_rel_fro quantiles
    - "rank": min(rows, cols), the number of singular values (sv_rel_fro of a fixed spectral
      shape scales as rank^(-1/2): the spectrum fit's trivial exponent comes from it)

    Plain floats, ints and None, ready for JSON.
    """
    band = default_band(coefficients) if band is None else _check_band(band)
    rel_max, rel_fro = relative_singular_values(G)
    q_max, q_fro = _quantiles(rel_max, levels), _quantiles(rel_fro, levels)
    in_band = _in_band_by_step(_as_float64(q_fro), band, coefficients, max_steps)
    m_quantiles = (
        {"sv_rel_max": list(q_max), "sv_rel_fro": list(q_fro)}
        if momentum is None
        else singular_value_quantiles(momentum, levels)
    )
    return {
        "sv_rel_max": q_max,
        "sv_rel_fro": q_fro,
        "momentum_sv_rel_max": m_quantiles["sv_rel_max"],
        "momentum_sv_rel_fro": m_quantiles["sv_rel_fro"],
        "ns_steps": steps,
        "ns_out_dev": ns_output_deviation(q_fro, steps, coefficients).tolist(),
        "ns_out_max_dev": float(ns_output_deviation(rel_fro, steps, coefficients).max()),
        "min_ns_steps": _first_true_per_column(in_band),  # = fewest_ns_steps_many(q_fro, ...)
        "min_ns_steps_all": _first_true(in_band.all(dim=1)),  # = fewest_ns_steps_joint(q_fro, ...)
        "rank": min(G.shape[-2:]),
    }


# --------------------------------------------------------------------------- the diagnostic


def parse_band(text: str, coefficients) -> tuple[float, float]:
    """``diagnostics.ns_band`` ("lo,hi"), or the coefficients' default band when empty."""
    if text:
        lo, hi = (float(x) for x in text.split(","))
        return lo, hi
    return default_band(coefficients)


class NSSpectrum(Diagnostic):
    """Per matrix Newton-Schulz receives, right after the optimizer step: the singular-value
    quantiles of its input, the NS output's deviation from 1 and the fewest NS steps into the
    band (:func:`ns_spectrum_record`), from exactly the matrix the step handed to NS (in
    float32); with Nesterov also the quantiles of the momentum buffer itself. An expert stack
    is analysed per expert, a matrix orthogonalised per head by its head blocks. Runs for the
    optimizers whose spec says they report it (Muon, NorMuon)."""

    name = RecordKind.NS_SPECTRUM
    when = OPTIMIZER_STEP
    help = "singular values of the matrices Newton-Schulz receives, and the NS steps they need"
    keys = ("interval", "ns_spectrum", "ns_band")

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.ns_spectrum

    def _ns_inputs(self):
        """(name, group, U, m) for every matrix the step just handed to NS: U the matrix NS
        received (``ns_input``) and m the momentum buffer, or None when U is the buffer
        itself (no Nesterov)."""
        name_of = {id(p): name for name, p in self.run.model.named_parameters()}
        for optimizer in self.run.optimizers.reporting(self.name):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.ndim not in (2, 3):
                        continue
                    U = optimizer.ns_input(p)
                    if U is None:
                        continue
                    yield name_of[id(p)], group, U, optimizer.momentum_buffer(p) if group["nesterov"] else None

    @torch.no_grad()
    def collect(self, step: int, **inputs) -> dict | None:
        """Gather each matrix (all ranks, in the same order), analyse matrix i on rank
        i % world_size, collect the records on every rank. With Nesterov the momentum
        buffer is gathered and analysed too (its quantiles differ from the NS input's);
        without, the NS input is the buffer and its quantiles are reused."""
        todo = list(self._ns_inputs())
        if not todo:
            return None
        rank, world_size = self.run.rank, self.run.world_size
        mine: dict[str, dict] = {}
        coefficients = None
        band = None
        names: list[str] = []
        for name, group, U, buf in todo:
            full, momentum = full_matrix(U), None if buf is None else full_matrix(buf)
            coefficients = group["ns_coefficients"]
            band = parse_band(self.run.cfg.ns_band, coefficients)
            # an expert stack (E, rows, cols) is E matrices, named <stack>.<expert>
            parts = (
                [(name, full, momentum)]
                if full.ndim == 2
                else [(f"{name}.{e}", full[e], None if momentum is None else momentum[e]) for e in range(full.shape[0])]
            )
            # a matrix orthogonalised per head: its head blocks are what NS receives
            layout = group.get("head_blocks")
            for part_name, part, part_momentum in parts:
                if len(names) % world_size == rank:
                    blocks = split_heads(part.float(), layout)
                    momentum_blocks = None if part_momentum is None else split_heads(part_momentum.float(), layout)
                    record = ns_spectrum_record(
                        blocks, group["ns_steps"], coefficients, DEFAULT_LEVELS, band, momentum=momentum_blocks
                    )
                    mine[part_name] = {
                        "layer": block_index(name),
                        **record,
                        **({} if layout is None else {"head_blocks": list(layout)}),
                    }
                names.append(part_name)
        if world_size > 1:
            mine = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
        ordered = {name: mine[name] for name in names}
        return {
            "experts": "per expert (<stack>.<e>)",
            "coefficients": coefficients if isinstance(coefficients, str) else "custom",
            "levels": list(DEFAULT_LEVELS),
            "band": list(band),
            "matrices": ordered,
        }
