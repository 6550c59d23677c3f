"""Optimizers: AdamW grouping, Muon, NorMuon, Newton-Schulz, per-layer NS step rules, LR schedules.

``normopt.optim.newton_schulz`` is the Newton-Schulz function itself (its module is
``normopt.optim.newton_schulz`` in ``sys.modules`` and stays importable with ``from ...
import``).
"""

from normopt.optim.muon import Muon, NorMuon
from normopt.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, newton_schulz, ns_scalar_map

__all__ = ["Muon", "NorMuon", "newton_schulz", "ns_scalar_map", "QUINTIC", "POLAR_EXPRESS"]
