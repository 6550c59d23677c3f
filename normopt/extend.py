"""What a plugin imports: every registry (norms, optimizers, attentions, feed-forwards,
diagnostics, report axes) and the interface each kind of component answers, in one place
(docs/extending.md walks through each kind with the examples in
``examples/plugins/``).

A plugin is a Python file, a package or an installed module that registers components when
normopt imports it (:mod:`normopt.plugins` says from where). It registers either at import
(``NORMS.register(MyNorm)`` after ``from normopt.extend import NORMS, NormLayer``) or, to keep
the module importable with torch alone (what ``normopt export --format hf`` needs to carry a
norm into transformers), in a function ``normopt_plugin(normopt)`` that normopt calls with
this module once the file is imported.
"""

from __future__ import annotations

from normopt.diagnostics.diagnostic import (
    EVALUATION as AFTER_EVALUATION,
)
from normopt.diagnostics.diagnostic import (
    OPTIMIZER_STEP as AFTER_OPTIMIZER_STEP,
)
from normopt.diagnostics.diagnostic import (
    STEP as AFTER_STEP,
)
from normopt.diagnostics.diagnostic import (
    Diagnostic,
    DiagnosticRun,
    block_index,
    block_matrices,
    full_matrix,
)
from normopt.diagnostics.registry import DIAGNOSTICS
from normopt.errors import UserError
from normopt.key_roles import EVALUATION, EXECUTION, LENGTH, MATH, require, role
from normopt.models.components import ATTENTIONS, FEED_FORWARDS
from normopt.models.gqa import GroupedQueryAttention
from normopt.models.norm_layer import Location, NormConfig, NormLayer
from normopt.models.norms import NORMS
from normopt.models.swiglu import SwiGLU
from normopt.optim.registry import OPTIMIZERS
from normopt.optim.spec import OptimizerSpec
from normopt.registry import component_options
from normopt.report.cells.report_axes import REPORT_AXES, ReportAxis

__all__ = [
    "AFTER_EVALUATION",
    "AFTER_OPTIMIZER_STEP",
    "AFTER_STEP",
    "ATTENTIONS",
    "DIAGNOSTICS",
    "Diagnostic",
    "DiagnosticRun",
    "EVALUATION",
    "EXECUTION",
    "FEED_FORWARDS",
    "GroupedQueryAttention",
    "LENGTH",
    "Location",
    "MATH",
    "NORMS",
    "NormConfig",
    "NormLayer",
    "OPTIMIZERS",
    "OptimizerSpec",
    "REPORT_AXES",
    "ReportAxis",
    "SwiGLU",
    "UserError",
    "block_index",
    "block_matrices",
    "component_options",
    "full_matrix",
    "norm_layer",
    "require",
    "role",
]


def norm_layer(cls: type) -> type[NormLayer]:
    """A :class:`NormLayer` made of a torch-only layer class that answers the NormLayer
    interface itself (``name``, ``from_config``, ``param_count``, ``core``, and
    ``reset_parameters``; optionally ``preactivation``, ``saturating_function``,
    ``supports_bias``, ``diagnostic_extras``, ``config``): for a plugin whose module must
    stay importable without normopt. Its parameters, forward and state dict are ``cls``'s."""
    if issubclass(cls, NormLayer):
        return cls
    return type(cls.__name__, (cls, NormLayer), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
