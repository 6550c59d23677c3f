"""The report-axes registry: the config keys the report knows by name (a short name for
cell.json, a noun for prose, a default level, a canonical level order). Kept apart from
axes.py, which reads cells and configs, so that the plugin API can offer it without
importing the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from normopt.models.norms import NORMS
from normopt.optim.registry import OPTIMIZERS, REFERENCE_OPTIMIZER
from normopt.registry import Registry

# the norm x optimizer study's two axes (cells and configs name them so)
NORM_KEY, OPTIM_KEY = "model.norm", "optim.name"


@dataclass(frozen=True)
class ReportAxis:
    """A config key the report knows by name (the report-axes registry; a plugin registers
    its own with ``REPORT_AXES.register``): the short name a cell.json may use for it (the
    factorial runner writes it so), how the report's prose names it, its default baseline or
    reference level when a spec names none, and the canonical order of its levels (tables
    follow the spec's order first)."""

    key: str
    short: str
    noun: str
    default_level: str | None = None
    levels: Callable[[], Sequence[str]] | None = None

    @property
    def name(self) -> str:
        return self.key


REPORT_AXES: Registry[ReportAxis] = Registry("report axis", "report axes", section="report")
REPORT_AXES.register(ReportAxis(NORM_KEY, "norm", "norm", "rmsnorm", lambda: tuple(NORMS)))
REPORT_AXES.register(ReportAxis(OPTIM_KEY, "optim", "optimizer", REFERENCE_OPTIMIZER, lambda: tuple(OPTIMIZERS)))
