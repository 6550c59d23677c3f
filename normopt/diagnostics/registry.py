"""The diagnostics registry: the diagnostics a run can collect, each a
:class:`~normopt.diagnostics.diagnostic.Diagnostic` in its own module.

The collector runs them in this order within each phase of a diagnosed step
(``when``), and the report reads every kind registered here. Adding a diagnostic is one
module with its class and one line here, or ``DIAGNOSTICS.register`` in a plugin
(:mod:`normopt.plugins`); its own config keys join the ``diagnostics`` section.
"""

from __future__ import annotations

from normopt.diagnostics.diagnostic import WHEN, Diagnostic
from normopt.diagnostics.isotropy import Isotropy
from normopt.diagnostics.norm_stats import NormStats
from normopt.diagnostics.ns_spectrum import NSSpectrum
from normopt.diagnostics.spectral_norm import SpectralNorm
from normopt.diagnostics.tail_tokens import TailTokenLoss
from normopt.registry import Registry


# one line per diagnostic; the order is the order of records within a phase of a step
def _problem(cls) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Diagnostic)):
        return "register a Diagnostic subclass"
    if cls.when not in WHEN:
        return f"when is {cls.when!r}, not one of {', '.join(WHEN)}"
    return None


DIAGNOSTICS: Registry[type[Diagnostic]] = Registry("diagnostic", "diagnostics", section="diagnostics", check=_problem)
for _cls in (NormStats, SpectralNorm, NSSpectrum, Isotropy, TailTokenLoss):
    DIAGNOSTICS.register(_cls)
