"""The ``diagnostics`` config section: what the run measures about itself (never the math)."""

from __future__ import annotations

from dataclasses import dataclass

from normopt.key_roles import EXECUTION, require, role


@dataclass
class DiagnosticsConfig:
    """What the run measures about itself; diagnostics observe the run and never change it."""

    interval: int = role(EXECUTION, 50, "norm stats, spectral norms, NS spectrum and isotropy every N steps (0 = off)")
    probe_sequences: int = role(EXECUTION, 8, "validation windows in the fixed probe batch of the norm stats")
    power_iterations: int = role(
        EXECUTION, 2, "power iterations per spectral-norm estimate, warm-started from the last call's vector"
    )
    ns_spectrum: bool = role(EXECUTION, True, "Muon/NorMuon runs: singular values of the matrices NS receives")
    ns_band: str = role(
        EXECUTION, "", "'lo,hi' target band of NS output singular values; empty = per the NS coefficients"
    )
    isotropy: bool = role(EXECUTION, True, "singular-value entropy of each block matrix's update and weight")
    tail_buckets: int = role(EXECUTION, 10, "eval loss by token-frequency bucket at every evaluation (0 = off)")
    histograms: bool = role(EXECUTION, True, "TensorBoard histograms of pre-activations and spectral norms")

    def validate(self) -> None:
        require(self.interval >= 0, "diagnostics.interval", "must be >= 0 (0 = off)")
        require(self.probe_sequences >= 1, "diagnostics.probe_sequences", "must be at least 1")
        require(self.power_iterations >= 1, "diagnostics.power_iterations", "must be at least 1")
        require(self.tail_buckets >= 0, "diagnostics.tail_buckets", "must be >= 0 (0 = off)")
        if self.ns_band:
            parts = self.ns_band.split(",")
            try:
                lo, hi = (float(x) for x in parts)
            except ValueError:
                lo = hi = float("nan")
            require(
                len(parts) == 2 and 0 < lo < 1 < hi,
                "diagnostics.ns_band",
                f"expected 'lo,hi' with 0 < lo < 1 < hi, got {self.ns_band!r}",
            )
