"""The interaction against model size: a size axis's own section of the report.

A spec axis over model size (``model.preset``, ``model.dim``, ``model.n_layers`` or
``model.ffn_hidden``, or the axes ``report.size`` names; :attr:`ReportAxes.size_keys`) is a
stratum: the grid runs at every size and the report estimates every interaction within each size
(:mod:`normopt.report.statistics`). This module puts those estimates side by side and asks
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
from normopt.report.axes import ReportAxes, cell_level
from normopt.report.cell_reading import Cell
from normopt.report.contrasts import GroupStats, contrast
from normopt.report.multiplicity import EXPLORATORY, t_p_value
from normopt.report.student_t import t_interval

# tokens per parameter that agree within this relative spread count as held fixed by the spec
SAME_RATIO_RTOL = 0.02
GROWS, SHRINKS, FLAT, NOT_TESTED = "grows", "shrinks", "flat", "not tested"
VERDICT_WORDS = {GROWS: "grows", SHRINKS: "shrinks", FLAT: "cannot be told apart from flat", NOT_TESTED: "not tested"}
FIT = (
    "interaction_i = a + b ln N_i by weighted least squares (weights 1/se_i^2, equal where a size's "
    "interaction has no se); se(b) = sqrt(s^2 / S_xx), s^2 = sum w_i r_i^2 / (k - 2); 95% t interval "
    "with k - 2 degrees of freedom (k sizes; none with k = 2: not tested)"
)
PARAMETERS = (
    "count_parameters_without_norms of the cells' model at the config's vocabulary (norm weights and "
    "the embedding scale left out: the same for every norm of a size, the N train.tokens_per_param uses)"
)


# --------------------------------------------------------------------------- the fit


def weighted_line_fit(
    x: Sequence[float], y: Sequence[float], se: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """y_i = a + b x_i by weighted least squares (module docstring): weights 1/se_i^2 when every
    se_i is a positive number, else equal weights; the slope's standard error from the weighted
    residual scatter, its 95% t interval and two-sided p-value with k - 2 degrees of freedom.
    With k = 2 the slope is the line through the points and se, df, ci95 and p are None; with
    fewer than 2 points or one distinct x there is no slope."""
    k = len(x)
    if len(y) != k or (se is not None and len(se) != k):
        raise ValueError("x, y and se must have the same length")
    inverse = se is not None and k > 0 and all(s is not None and s > 0 and math.isfinite(s) for s in se)
    w = [1.0 / s**2 for s in se] if inverse else [1.0] * k
    out: dict[str, Any] = {
        "k": k,
        "weights": "inverse variance" if inverse else "equal",
        "intercept": None,
        "slope": None,
        "slope_se": None,
        "df": None,
        "t": None,
        "ci95": None,
        "p": None,
        "residual_scale": None,
        "slope_se_from_seeds": None,
        "reason": None,
    }
    if k < 2:
        out["reason"] = "fewer than 2 sizes"
        return out
    total = sum(w)
    x_w = sum(wi * xi for wi, xi in zip(w, x)) / total
    y_w = sum(wi * yi for wi, yi in zip(w, y)) / total
    s_xx = sum(wi * (xi - x_w) ** 2 for wi, xi in zip(w, x))
    if s_xx <= 1e-12 * total * max(1.0, x_w * x_w):
        out["reason"] = "every size has the same number of parameters"
        return out
    slope = sum(wi * (xi - x_w) * (yi - y_w) for wi, xi, yi in zip(w, x, y)) / s_xx
    out.update(intercept=y_w - slope * x_w, slope=slope, slope_se_from_seeds=1.0 / math.sqrt(s_xx) if inverse else None)
    df = k - 2
    if df == 0:
        out.update(df=0, reason="two sizes: the line through two points leaves k - 2 = 0 degrees of freedom")
        return out
    residual = sum(wi * (yi - out["intercept"] - slope * xi) ** 2 for wi, xi, yi in zip(w, x, y))
    s2 = residual / df
    slope_se = math.sqrt(s2 / s_xx)
    out.update(
        df=df,
        slope_se=slope_se,
        residual_scale=math.sqrt(s2),
        t=None if slope_se == 0 else slope / slope_se,
        ci95=t_interval(slope, slope_se, df),
        p=t_p_value(slope, slope_se, df),
    )
    return out


def slope_verdict(fit: Mapping[str, Any]) -> str:
    """grows / shrinks (the slope's 95% interval lies above / below 0), flat (it includes 0),
    not tested (no interval)."""
    ci = fit.get("ci95")
    if ci is None:
        return NOT_TESTED
    return GROWS if ci[0] > 0 else SHRINKS if ci[1] < 0 else FLAT


# --------------------------------------------------------------------------- per size


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


def _label(levels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levels.items())


def _count(n: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    return "no interval" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _ratio(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def _groups(summary: Mapping[str, Any]) -> dict[tuple[str, str, str], GroupStats]:
    """(stratum label, variant, optim) -> the group's statistics, from the summary's records."""
    return {
        (_label(g.get("stratum") or {}), g["variant"], g["optim"]): GroupStats(g["n"], g["mean"], g["std"], {})
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
        label = _label(record["stratum"])
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
    span = f"{_count(min(counts))} → {_count(max(counts))} parameters" if counts else ""
    head = f"{name} against model size ({fit['k']} sizes{', ' + span if span else ''})"
    if fit["slope"] is None:
        return f"{head}: no fit ({fit['reason']})."
    per_doubling = f"{_num(fit['slope_per_doubling'])} per doubling"
    if fit["ci95"] is None:
        text = (
            f"{head}: slope {_num(fit['slope'])} nats per unit of ln N ({per_doubling}), not tested: "
            f"with {fit['k']} sizes the line through the points has no degrees of freedom left (k − 2 = 0)"
        )
        diff = fit.get("difference")
        if diff is not None:
            text += (
                f"; the interaction at {fit['sizes'][-1]} minus at {fit['sizes'][0]}: "
                f"{_num(diff['value'])} nats {_ci(diff['ci95'])} (Welch t, the 8 group means)"
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
        f"{head}: slope {_num(fit['slope'])} nats per unit of ln N {_ci(fit['ci95'])} "
        f"(weighted least squares{weights}, t with {fit['df']} df), {per_doubling} "
        f"{_ci(fit['ci95_per_doubling'])}: {verdict}{scatter}."
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
    listed = " / ".join(f"{_ratio(r['ratio'])}" for r in ratios)
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
            f"({_ratio(smallest['ratio'])} at {_count(smallest['parameters'])} parameters, "
            f"{_ratio(largest['ratio'])} at {_count(largest['parameters'])}; {spread:.2g}x between "
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
                "label": _label(dict(size)),
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


# --------------------------------------------------------------------------- the plot


def plot_model_size(summary: Mapping[str, Any], path) -> bool:
    """One panel per context: each interaction against N (log axis) with its 95% Welch t
    interval per size (none with 1 seed) and the fitted line a + b ln N, its slope and interval
    in the legend. False (nothing drawn) without fits."""
    section = summary.get("model_size")
    if not section or not any(f["slope"] is not None for f in section["fits"]):
        return False
    from normopt.report.plots import figure, variant_styles

    styles = variant_styles(summary)
    contexts = [t["context"] for t in section["tokens_per_param"]]
    fig = figure(figsize=(max(6.4, 5.2 * len(contexts)), 4.2))
    axes = fig.subplots(1, len(contexts), squeeze=False)[0]
    optims = list(dict.fromkeys(f["optim"] for f in section["fits"]))
    for ax, context in zip(axes, contexts):
        for fit in (f for f in section["fits"] if f["context"] == context):
            color, marker = styles.get(fit["variant"], ("C0", "o"))
            linestyle = ("-", "--", ":", "-.")[optims.index(fit["optim"]) % 4]
            n = [math.exp(x) for x in fit["ln_parameters"]]
            low = [v - (c[0] if c else v) for v, c in zip(fit["values"], _cis(summary, fit))]
            high = [(c[1] if c else v) - v for v, c in zip(fit["values"], _cis(summary, fit))]
            ax.errorbar(n, fit["values"], yerr=[low, high], fmt=marker, color=color, capsize=3, ms=5)
            if fit["slope"] is not None:
                grid = [min(n) * (max(n) / min(n)) ** (i / 40) for i in range(41)]
                label = f"{fit['variant']} × {fit['optim']}: b = {fit['slope']:+.3f}" + (
                    f" {_ci(fit['ci95'])} (t, {fit['df']} df)" if fit["ci95"] else " (not tested)"
                )
                ax.plot(
                    grid,
                    [fit["intercept"] + fit["slope"] * math.log(g) for g in grid],
                    color=color,
                    linestyle=linestyle,
                    lw=1.2,
                    label=label,
                )
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N (norm weights left out; log axis)")
        ax.set_ylabel("interaction (nats)")
        ax.set_title(_label(context) or "interaction against model size", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "interaction at each size, 95% Welch t interval (none with 1 seed)\nline: the weighted fit I = a + b ln N",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return True


def _cis(summary: Mapping[str, Any], fit: Mapping[str, Any]) -> list[Sequence[float] | None]:
    """The 95% interval of ``fit``'s interaction at each of its sizes."""
    out = []
    for label in fit["sizes"]:
        size = next(s for s in summary["model_size"]["sizes"] if s["label"] == label and s["context"] == fit["context"])
        found = next(i for i in size["interactions"] if (i["variant"], i["optim"]) == (fit["variant"], fit["optim"]))
        out.append(found["ci95"])
    return out


# --------------------------------------------------------------------------- markdown


def _context_prefix(record: Mapping[str, Any]) -> str:
    label = _label(record.get("context") or {})
    return f"[{label}] " if label else ""


def size_answer_lines(summary: Mapping[str, Any]) -> list[str]:
    """One answer line per fit, with its context's tokens-per-parameter state."""
    section = summary.get("model_size")
    if not section:
        return []
    held = {tuple(t["context"].items()): t for t in section["tokens_per_param"]}
    lines = []
    for fit in section["fits"]:
        tokens = held.get(tuple(fit["context"].items())) or {"held": "unknown"}
        note = ""
        if tokens["held"] == "setting":
            note = f" Tokens per parameter held fixed (train.tokens_per_param = {tokens['setting']:g})."
        elif tokens["held"] == "spec":
            note = " Tokens per parameter the same at every size."
        elif tokens["held"] == "no":
            note = (
                f" Tokens per parameter change with size ({tokens['spread']:.2g}x between the extremes: "
                "section Interaction against model size)."
            )
        lines.append(f"- {_context_prefix(fit)}{fit['sentence']}{note}")
    return lines


def _size_table(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    from normopt.report.tables import markdown_table

    section = summary["model_size"]
    members = [s for s in section["sizes"] if s["context"] == context]
    pairs = list(dict.fromkeys((i["variant"], i["optim"]) for s in members for i in s["interactions"]))
    rows = []
    for s in members:
        found = {(i["variant"], i["optim"]): i for i in s["interactions"]}
        steps = " / ".join(str(x) for x in s["steps"]) or "?"
        row = [
            s["label"],
            "?" if s["parameters"] is None else f"{_count(s['parameters'])} ({s['parameters']:,})",
            "—" if s["ln_parameters"] is None else f"{s['ln_parameters']:.3f}",
            steps,
            "?" if s["tokens"] is None else _count(s["tokens"]),
            _ratio(s["tokens_per_param"]),
        ]
        for pair in pairs:
            i = found.get(pair)
            row.append(
                "—"
                if i is None
                else f"{_num(i['value'])} {_ci(i['ci95'])}"
                if i["ci95"] is not None
                else _num(i["value"])
            )
        rows.append(row)
    header = [
        "size",
        "parameters N",
        "ln N",
        "steps",
        "tokens T",
        "T / N",
        *[f"{v} × {o} interaction, 95% CI (Welch t)" for v, o in pairs],
    ]
    return markdown_table(header, rows)


def _fit_table(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    from normopt.report.tables import markdown_table

    rows = []
    for fit in summary["model_size"]["fits"]:
        if fit["context"] != context:
            continue
        rows.append(
            [
                f"{fit['variant']} × {fit['optim']}",
                str(fit["k"]),
                fit["weights"],
                _num(fit["intercept"]),
                _num(fit["slope"]),
                "—" if fit["slope_se"] is None else f"{fit['slope_se']:.3f}",
                "—" if fit["df"] is None else str(fit["df"]),
                _ci(fit["ci95"]),
                _num(fit["slope_per_doubling"]),
                "—" if fit["residual_scale"] is None else f"{fit['residual_scale']:.2f}",
                VERDICT_WORDS[fit["verdict"]],
            ]
        )
    return markdown_table(
        [
            "interaction",
            "sizes k",
            "weights",
            "intercept a",
            "slope b (nats per unit ln N)",
            "se(b)",
            "df (k − 2)",
            "95% CI of b (t)",
            "b × ln 2 (per doubling)",
            "scatter s",
            "verdict",
        ],
        rows,
    )


def size_section(summary: Mapping[str, Any], plot: str | None = None) -> list[str]:
    """The report.md section: what is fitted, the verdicts, the tokens per parameter, the tables
    and ``plot`` (its file name, when drawn)."""
    section = summary.get("model_size")
    if not section:
        return []
    keys = ", ".join(f"`{k}`" for k in section["axes"])
    parts = [
        "## Interaction against model size",
        "",
        (
            f"The size axis {keys}: each interaction estimated within each size (as in the section Interaction), "
            "against the number of parameters N: the model's parameters without its norm layers' weights and "
            "embedding scale (the same for every norm of a size; the N that train.tokens_per_param uses), at "
            "the config's vocabulary. Tokens T = steps × global batch × sequence length. The fit: "
            "I_i = a + b ln N_i by weighted least squares over the k sizes, weights 1/se_i² (se_i the Welch "
            "standard error of I_i; equal weights where a size has 1 seed); se(b) = sqrt(s² / S_xx) with "
            "s² = Σ w_i r_i² / (k − 2) the weighted scatter about the line (s = 1: as large as the seeds "
            "predict) and S_xx = Σ w_i (ln N_i − mean_w)²; the 95% interval is b ∓ t_{0.975, k−2} se(b), so "
            "with 3 sizes it has 1 degree of freedom, and with 2 sizes none: the slope is then not tested "
            "and the difference of the two interactions is given with its Welch t interval. Verdict: grows "
            "(interval above 0), shrinks (below 0), cannot be told apart from flat (includes 0). One "
            "unadjusted test per interaction, outside the main family."
        ),
        "",
    ]
    for context in [t["context"] for t in section["tokens_per_param"]]:
        if context:
            parts += [f"### {_label(context)}", ""]
        parts += [f"- {fit['sentence']}" for fit in section["fits"] if fit["context"] == context]
        parts += [f"- {t['sentence']}" for t in section["tokens_per_param"] if t["context"] == context]
        parts += [
            f"- At {s['label']}, {len(s['learned_no_context'])} cell(s) learned almost no context "
            f"({', '.join(s['learned_no_context'])}): the interaction there measures noise more than the "
            "norm or the optimizer, and so does the fit through it."
            for s in section["sizes"]
            if s["context"] == context and s["learned_no_context"]
        ]
        parts += ["", _size_table(summary, context), ""]
        if any(fit["context"] == context for fit in section["fits"]):
            parts += [_fit_table(summary, context), ""]
    if plot:
        parts += [f"![model_size]({plot})", ""]
    return parts
