"""The interaction against model size: a size axis's own section of the report.

A spec axis over model size (``model.preset``, ``model.dim``, ``model.n_layers`` or
``model.ffn_hidden``, or the axes ``report.size`` names; :attr:`ReportAxes.size_keys`) is a
stratum: the grid runs at every size and the report estimates every interaction within each size
(:mod:`normopt.report.stats.summary`). This module puts those estimates side by side and asks
whether the interaction changes with the number of parameters.

**Parameters** N of a size: ``count_parameters_without_norms`` of the cells' resolved model at the
config's vocabulary (:func:`normopt.config.size_parameters`): the norm layers' weights and the
embedding scale are left out, so every norm of one shape has the same N (they differ by a few
feature vectors per layer), the N that ``train.tokens_per_param`` uses. **Tokens** T = train.steps x
train.global_batch_size x train.seq_len (what a cell was configured to train on), and T / N the
tokens per parameter.

**The fit** (:func:`weighted_line_fit`), for each interaction I (variant v under optimizer O)
over the k sizes where it is estimated, with x_i = ln N_i and y_i = I_i:

    I_i = a + b x_i,   weights w_i = 1 / se_i^2   (se_i: the Welch standard error of I_i)
    x_w = sum w_i x_i / sum w_i,   S_xx = sum w_i (x_i - x_w)^2
    b = sum w_i (x_i - x_w)(y_i - y_w) / S_xx,   a = y_w - b x_w
    s^2 = sum w_i r_i^2 / (k - 2),   r_i = y_i - a - b x_i
    se(b) = sqrt(s^2 / S_xx),   95% interval b -/+ t_{0.975, k-2} se(b)

The standard errors only weigh the sizes against each other; the slope's standard error comes
from the scatter of the sizes about the line (s = 1 when it is as large as the seeds' standard
errors predict), so it also covers a curve that a line does not follow, with k - 2 degrees of
freedom: 1 with three sizes, hence wide. Where some size's interaction has no standard error
(1 seed), every size weighs the same (w_i = 1). With two sizes there are no degrees of freedom
left: the slope is the line through two points and is not tested; the report gives instead the
difference of the two interactions, a contrast of 8 independent group means with its Welch t
interval. **Verdict**: ``grows`` when the interval of b lies above 0 (the interaction increases
with size), ``shrinks`` when it lies below, ``flat`` (cannot be told apart from flat) when it
includes 0, ``not tested`` with two sizes or fewer. One slope per interaction, each unadjusted:
the slopes are outside the report's main family (exploratory).

**Tokens per parameter** change with size unless the spec holds them fixed, and then the slope
mixes the size with how long each size trained for its size: the section says which
(``train.tokens_per_param`` set alike in every cell, or ratios equal within
:data:`SAME_RATIO_RTOL`), with the actual ratios, and offers ``train.tokens_per_param``
otherwise.

summary.json ``model_size`` (absent without a size axis): ``axes`` (the size keys),
``parameters`` and ``fit`` (the two definitions above, in words), ``sizes`` (per context and size:
``context`` {the other strata's levels}, ``size`` {key: level}, ``label``, ``parameters`` (N, the
most common over the size's cells; ``parameters_by_cell`` the distinct values), ``ln_parameters``,
``tokens`` (``tokens_by_cell``), ``tokens_per_param``, ``tokens_per_param_setting`` (the cells'
train.tokens_per_param where all agree and it is > 0, else None), ``steps`` (distinct),
``learned_no_context`` (its cells that did, by name) and ``interactions`` [{variant, optim,
reference_optim, value, se, df, ci95, n}]), ``fits`` (per
context and interaction: ``variant``, ``optim``, ``reference_optim``, ``k``, ``sizes`` (labels),
``ln_parameters``, ``values``, ``se``, ``weights`` ("inverse variance" | "equal"), ``intercept``,
``slope`` (nats per unit of ln N), ``slope_se``, ``df`` (k - 2), ``t``, ``ci95``, ``p``,
``slope_per_doubling`` and ``ci95_per_doubling`` (times ln 2), ``residual_scale`` (s),
``slope_se_from_seeds`` (1 / sqrt(S_xx): the standard error were the line exact; not used for the
interval), ``difference`` (two sizes: {value, se, df, ci95, p, from, to}), ``verdict``, ``reason``,
``family`` ("exploratory") and ``sentence``) and ``tokens_per_param`` (per context: ``held``
("setting" | "spec" | "no" | "unknown"), ``setting``, ``ratios`` [{label, parameters, tokens,
ratio}], ``spread`` (largest / smallest ratio) and ``sentence``). ``interaction_vs_size.png``
(:func:`plot_model_size`) draws each interaction against N with its intervals and the fitted line.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.axes import ReportAxes, cell_level
from normopt.report.cells.cell_reading import Cell
from normopt.report.stats.contrasts import GroupStats, contrast
from normopt.report.stats.line_fit import slope_verdict, weighted_line_fit
from normopt.report.stats.multiplicity import EXPLORATORY, t_p_value

# tokens per parameter that agree within this relative spread count as held fixed by the spec
SAME_RATIO_RTOL = 0.02
GROWS, SHRINKS, FLAT, NOT_TESTED = "grows", "shrinks", "flat", "not tested"
FIT = (
    "interaction_i = a + b ln N_i by weighted least squares (weights 1/se_i^2, equal where a size's "
    "interaction has no se); se(b) = sqrt(s^2 / S_xx), s^2 = sum w_i r_i^2 / (k - 2); 95% t interval "
    "with k - 2 degrees of freedom (k sizes; none with k = 2: not tested)"
)
PARAMETERS = (
    "count_parameters_without_norms of the cells' model at the config's vocabulary (norm weights and "
    "the embedding scale left out: the same for every norm of a size, the N train.tokens_per_param uses)"
)


def cell_size_parameters(cell: Cell) -> int | None:
    """N of a cell (:func:`normopt.config.size_parameters` of its config.yaml's model and data
    sections, the only ones it reads); None when they cannot be read back."""
    if not cell.config:
        return None
    try:
        sections = json.dumps(
            {k: v for k, v in cell.config.items() if k.startswith(("model.", "data."))}, sort_keys=True
        )
    except (TypeError, ValueError):
        return None
    return _size_parameters(sections)


@lru_cache(maxsize=256)
def _size_parameters(sections: str) -> int | None:
    # cached: reading a config back costs a tenth of a second, and the cells of a size share theirs
    from normopt.config import config_from_dict, nested_config, size_parameters

    try:
        return size_parameters(config_from_dict(nested_config(json.loads(sections))))
    except (UserError, ValueError, TypeError, KeyError, AttributeError):
        return None


def cell_tokens(cell: Cell) -> int | None:
    """train.steps x train.global_batch_size x train.seq_len from the cell's config."""
    parts = [cell.config.get(k) for k in ("train.steps", "train.global_batch_size", "train.seq_len")]
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return None
    return parts[0] * parts[1] * parts[2]


def _most_common(values: Sequence[Any]) -> Any:
    found = [v for v in values if v is not None]
    return Counter(found).most_common(1)[0][0] if found else None


def levels_label(levels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levels.items())


def count_text(n: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def signed_text(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def interval_text(ci: Sequence[float] | None, digits: int = 3) -> str:
    return "no interval" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def ratio_text(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def _groups(summary: Mapping[str, Any]) -> dict[tuple[str, str, str], GroupStats]:
    """(stratum label, variant, optim) -> the group's statistics, from the summary's records."""
    return {
        (levels_label(g.get("stratum") or {}), g["variant"], g["optim"]): GroupStats(g["n"], g["mean"], g["std"], {})
        for g in summary["groups"]
        if g["n"]
    }


def _difference(
    first: Mapping[str, Any], second: Mapping[str, Any], base: str, groups: Mapping[tuple[str, str, str], GroupStats]
) -> dict[str, Any] | None:
    """I(second size) - I(first size): a contrast of the 8 group means of the two interactions,
    Welch t interval."""
    terms = []
    for sign, record in ((-1.0, first), (1.0, second)):
        label = levels_label(record["stratum"])
        v, o, ref = record["variant"], record["optim"], record["reference_optim"]
        for (variant, optim), c in (((v, o), 1.0), ((base, o), -1.0), ((v, ref), -1.0), ((base, ref), 1.0)):
            group = groups.get((label, variant, optim))
            if group is None:
                return None
            terms.append((sign * c, group))
    result = contrast(terms)
    return {
        "value": result.value,
        "se": result.se,
        "df": result.df,
        "ci95": result.ci95,
        "p": t_p_value(result.value, result.se, result.df),
    }


def _fit_sentence(fit: Mapping[str, Any], sizes: Sequence[Mapping[str, Any]]) -> str:
    name = f"**{fit['variant']} × {fit['optim']}**"
    counts = [s["parameters"] for s in sizes if s["label"] in fit["sizes"]]
    span = f"{count_text(min(counts))} → {count_text(max(counts))} parameters" if counts else ""
    head = f"{name} against model size ({fit['k']} sizes{', ' + span if span else ''})"
    if fit["slope"] is None:
        return f"{head}: no fit ({fit['reason']})."
    per_doubling = f"{signed_text(fit['slope_per_doubling'])} per doubling"
    if fit["ci95"] is None:
        text = (
            f"{head}: slope {signed_text(fit['slope'])} nats per unit of ln N ({per_doubling}), not tested: "
            f"with {fit['k']} sizes the line through the points has no degrees of freedom left (k − 2 = 0)"
        )
        diff = fit.get("difference")
        if diff is not None:
            text += (
                f"; the interaction at {fit['sizes'][-1]} minus at {fit['sizes'][0]}: "
                f"{signed_text(diff['value'])} nats {interval_text(diff['ci95'])} (Welch t, the 8 group means)"
            )
        return text + "."
    verdict = {
        GROWS: "the interaction grows with size (the interval lies above 0)",
        SHRINKS: "the interaction shrinks with size (the interval lies below 0)",
        FLAT: "cannot be told apart from flat (the interval includes 0)",
    }[fit["verdict"]]
    weights = "" if fit["weights"] == "inverse variance" else ", equal weights (some size has 1 seed)"
    scatter = (
        ""
        if fit["weights"] != "inverse variance" or fit["residual_scale"] is None
        else f"; the sizes scatter about the line s = {fit['residual_scale']:.2g} times as much as their seeds' "
        "standard errors predict"
    )
    return (
        f"{head}: slope {signed_text(fit['slope'])} nats per unit of ln N {interval_text(fit['ci95'])} "
        f"(weighted least squares{weights}, t with {fit['df']} df), {per_doubling} "
        f"{interval_text(fit['ci95_per_doubling'])}: {verdict}{scatter}."
    )


def _tokens_record(sizes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Whether the tokens per parameter are the same at every size, and the sentence."""
    ratios = [
        {"label": s["label"], "parameters": s["parameters"], "tokens": s["tokens"], "ratio": s["tokens_per_param"]}
        for s in sizes
    ]
    known = [r for r in ratios if r["ratio"] is not None]
    settings = {s["tokens_per_param_setting"] for s in sizes}
    setting = settings.pop() if len(settings) == 1 else None
    listed = " / ".join(f"{ratio_text(r['ratio'])}" for r in ratios)
    out: dict[str, Any] = {"held": "unknown", "setting": setting, "ratios": ratios, "spread": None}
    if len(known) < len(ratios) or not known:
        out["sentence"] = (
            "Tokens per parameter: unknown at some size (a cell's config lacks train.steps, "
            "train.global_batch_size or train.seq_len, or its model cannot be resolved)."
        )
        return out
    spread = max(r["ratio"] for r in known) / min(r["ratio"] for r in known)
    out["spread"] = spread
    if setting is not None:
        out["held"] = "setting"
        out["sentence"] = (
            f"Tokens per parameter are held fixed by train.tokens_per_param = {setting:g} "
            f"(steps rounded up: {listed} at the sizes above, smallest to largest)."
        )
    elif spread <= 1 + SAME_RATIO_RTOL:
        out["held"] = "spec"
        out["sentence"] = (
            f"Tokens per parameter are the same at every size within {SAME_RATIO_RTOL:.0%} "
            f"({listed}): the spec's step counts hold them fixed."
        )
    else:
        out["held"] = "no"
        smallest, largest = known[0], known[-1]
        out["sentence"] = (
            f"Tokens per parameter change with size: {listed} from the smallest model to the largest "
            f"({ratio_text(smallest['ratio'])} at {count_text(smallest['parameters'])} parameters, "
            f"{ratio_text(largest['ratio'])} at {count_text(largest['parameters'])}; {spread:.2g}x between "
            f"the extremes), so the slope mixes model size with how long each size trained for its "
            f"size. To hold them fixed, set train.tokens_per_param in the spec's set: train.steps "
            f"= parameters × ratio / tokens per step, rounded up, at every size."
        )
    return out


def size_analysis(cells: Sequence[Cell], summary: Mapping[str, Any], axes: ReportAxes) -> dict[str, Any] | None:
    """The size section's numbers (summary.json ``model_size``, module docstring); None without a
    size axis."""
    keys = axes.size_keys
    if not keys:
        return None
    others = [k for k in axes.strata if k not in keys]
    base = summary["settings"]["baseline_norm"]
    by_size: dict[tuple[tuple, tuple], list[Cell]] = {}
    for cell in cells:
        context = tuple((k, cell_level(cell, k)) for k in others)
        size = tuple((k, cell_level(cell, k)) for k in keys)
        by_size.setdefault((context, size), []).append(cell)
    order = {k: {level: i for i, level in enumerate(axes.order.get(k, ()))} for k in keys}
    flat = {c["name"] for c in summary["cells"] if c.get("learned_no_context")}
    sizes = []
    for (context, size), members in by_size.items():
        counts = [cell_size_parameters(c) for c in members]
        tokens = [cell_tokens(c) for c in members]
        settings = {float(c.config.get("train.tokens_per_param") or 0.0) for c in members}
        n, t = _most_common(counts), _most_common(tokens)
        stratum = dict(context) | dict(size)
        inter = [
            {key: i[key] for key in ("variant", "optim", "reference_optim", "value", "se", "df", "ci95", "n")}
            for i in summary["interactions"]
            if i.get("stratum") == stratum
        ]
        sizes.append(
            {
                "context": dict(context),
                "size": dict(size),
                "label": levels_label(dict(size)),
                "parameters": n,
                "parameters_by_cell": sorted({c for c in counts if c is not None}),
                "ln_parameters": math.log(n) if n else None,
                "tokens": t,
                "tokens_by_cell": sorted({x for x in tokens if x is not None}),
                "tokens_per_param": t / n if n and t else None,
                "tokens_per_param_setting": settings.pop() if len(settings) == 1 and 0.0 not in settings else None,
                "steps": sorted(
                    {c.config.get("train.steps") for c in members if isinstance(c.config.get("train.steps"), int)}
                ),
                "learned_no_context": sorted(c.name for c in members if c.name in flat),
                "interactions": inter,
                "_stratum": stratum,
                "_order": tuple(order[k].get(level, len(order[k])) for k, level in size),
            }
        )
    contexts = list(dict.fromkeys(tuple(s["context"].items()) for s in sizes))  # in the cells' order
    sizes.sort(
        key=lambda s: (
            contexts.index(tuple(s["context"].items())),
            s["parameters"] is None,
            s["parameters"] or 0,
            s["_order"],
        )
    )
    groups = _groups(summary)
    fits, tokens = [], []
    for context in contexts:
        members = [s for s in sizes if tuple(s["context"].items()) == context]
        tokens.append({"context": dict(context), **_tokens_record(members)})
        pairs = list(dict.fromkeys((i["variant"], i["optim"]) for s in members for i in s["interactions"]))
        for variant, optim in pairs:
            points = [
                (s, i)
                for s in members
                if s["ln_parameters"] is not None
                for i in s["interactions"]
                if (i["variant"], i["optim"]) == (variant, optim)
            ]
            fit = weighted_line_fit(
                [s["ln_parameters"] for s, _ in points], [i["value"] for _, i in points], [i["se"] for _, i in points]
            )
            record = {
                "context": dict(context),
                "variant": variant,
                "optim": optim,
                "reference_optim": points[0][1]["reference_optim"] if points else None,
                "sizes": [s["label"] for s, _ in points],
                "ln_parameters": [s["ln_parameters"] for s, _ in points],
                "values": [i["value"] for _, i in points],
                "se": [i["se"] for _, i in points],
                **fit,
                "slope_per_doubling": None if fit["slope"] is None else fit["slope"] * math.log(2),
                "ci95_per_doubling": None if fit["ci95"] is None else [c * math.log(2) for c in fit["ci95"]],
                "difference": None,
                "family": EXPLORATORY,
            }
            if fit["k"] == 2 and fit["slope"] is not None:
                first, second = ({**i, "stratum": s["_stratum"]} for s, i in points)
                diff = _difference(first, second, base, groups)
                if diff is not None:
                    record["difference"] = {**diff, "from": points[0][0]["label"], "to": points[1][0]["label"]}
            record["verdict"] = slope_verdict(fit)
            record["sentence"] = _fit_sentence(record, members)
            fits.append(record)
    for s in sizes:
        del s["_stratum"], s["_order"]
    return {
        "axes": list(keys),
        "parameters": PARAMETERS,
        "fit": FIT,
        "sizes": sizes,
        "fits": fits,
        "tokens_per_param": tokens,
    }
