"""``normopt plan SPEC``: what a grid can detect, how many seeds an effect needs, and the cost.

From a seed-to-seed spread (pooled from a finished or pilot grid with ``--from``, or stated
with ``--sigma``) it gives

(a) the minimum interaction the spec's seeds detect with 80% power (``--power``) under the
    report's own family and Holm adjustment, at the spread and at the upper end of the
    spread's 95% interval;
(b) the seeds per cell needed to detect each ``--effect`` (default the published +0.66 nats
    and a small 0.2);
(c) the cost of each option in runs, steps, tokens and GPU-hours.

Power is simulated through the report's estimators (:mod:`normopt.planner.power`), not a
normal formula. Bad inputs end with exit status 2 and one line.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.cli_args import CommandParser
from normopt.errors import UserError
from normopt.factorial.spec import load_spec
from normopt.factorial.tuning import read_tune_section, tuning_cells
from normopt.planner.cost import (
    Rate,
    gpus_per_run,
    grid_cost,
    measured_rate,
    run_costs,
)
from normopt.planner.family import FamilyPlan, family_plan, skeleton_summary
from normopt.planner.power import (
    DEFAULT_MAX_SEEDS,
    DEFAULT_POWER,
    DEFAULT_SIMULATIONS,
    Batches,
    Detectable,
    Progress,
    SeedsNeeded,
    minimum_detectable,
    power_at,
    seeds_needed,
)
from normopt.planner.spread import Spread, grid_cells, pooled_spread, stated_spread
from normopt.report.cells.axes import axes_from_levels
from normopt.report.stats.multiplicity import ALPHA

PUBLISHED_EFFECT = 0.66  # nats: Derf's interaction penalty with Muon at 1B (arXiv 2604.01563)
SMALL_EFFECT = 0.2
DEFAULT_EFFECTS = (PUBLISHED_EFFECT, SMALL_EFFECT)
EFFECT_NAMES = {PUBLISHED_EFFECT: "the published Derf × Muon penalty at 1B", SMALL_EFFECT: "a small effect"}


def _positive(name: str, value: float | None, integer: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value}")


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="normopt plan",
        description="What a factorial grid can detect before it runs: the minimum detectable interaction at "
        "the spec's seeds (80% power under the report's own family and Holm adjustment), the seeds "
        "per cell an effect needs, and the cost of each option. Power is simulated through the "
        "report's estimators from a seed-to-seed spread: --from a finished or pilot grid, or --sigma.",
    )
    parser.add_argument("spec", help="factorial spec (YAML)")
    spread = parser.add_argument_group("the seed-to-seed spread (one is needed)")
    spread.add_argument(
        "--from",
        dest="from_root",
        default=None,
        metavar="ROOT",
        help="a finished or pilot grid: its final eval losses give the pooled spread and its 95%% "
        "interval, its metrics the measured tokens/s",
    )
    spread.add_argument(
        "--sigma",
        type=float,
        default=None,
        metavar="NATS",
        help="a stated seed-to-seed standard deviation of the final eval loss (used instead of "
        "--from's, whose cells then give the measured tokens/s only)",
    )
    parser.add_argument(
        "--effect",
        type=float,
        action="append",
        default=None,
        metavar="NATS",
        help=f"an interaction to find the seeds for (repeatable; default {PUBLISHED_EFFECT} and {SMALL_EFFECT})",
    )
    parser.add_argument(
        "--power", type=float, default=DEFAULT_POWER, help=f"the power asked for (default {DEFAULT_POWER})"
    )
    parser.add_argument(
        "--target",
        default=None,
        metavar="VARIANT/OPTIM",
        help="the interaction planned for, e.g. derf/muon (default: the first whose norm a fix "
        "repairs, else the first)",
    )
    parser.add_argument(
        "--simulations",
        type=int,
        default=DEFAULT_SIMULATIONS,
        help=f"simulated grids per seed count (default {DEFAULT_SIMULATIONS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="the simulation's random seed (default 0)")
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=DEFAULT_MAX_SEEDS,
        help=f"the most seeds per cell considered (default {DEFAULT_MAX_SEEDS})",
    )
    rate = parser.add_argument_group("GPU-hours (default: the measured tokens/s of --from's cells)")
    rate.add_argument(
        "--tokens-per-s",
        type=float,
        default=None,
        help="a run's training tokens per second on all its GPUs (as metrics.jsonl logs tokens_per_s)",
    )
    rate.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation in (0, 1] (as metrics.jsonl logs mfu); needs --peak-tflops",
    )
    rate.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one GPU, for --mfu")
    rate.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        help="GPUs per run (default: the spec's slurm gpus_per_node x nodes, else 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    return parser


def _check(args: Any) -> None:
    if args.sigma is None and args.from_root is None:
        raise UserError(
            "no seed-to-seed spread to plan with: pass --from ROOT (a finished or pilot grid) or "
            "--sigma NATS (the standard deviation of the final eval loss between seeds)"
        )
    _positive("--sigma", args.sigma)
    for effect in args.effect or ():
        _positive("--effect", effect)
    if not 0 < args.power < 1:
        raise UserError(f"--power must be in (0, 1), got {args.power}")
    _positive("--simulations", args.simulations, integer=True)
    if args.max_seeds < 2:
        raise UserError(f"--max-seeds must be at least 2 (a seed-to-seed spread needs 2 seeds), got {args.max_seeds}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    _positive("--tokens-per-s", args.tokens_per_s)
    _positive("--peak-tflops", args.peak_tflops)
    _positive("--gpus-per-run", args.gpus_per_run, integer=True)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    if (args.mfu is None) != (args.peak_tflops is None):
        raise UserError("--mfu and --peak-tflops go together (GPU-seconds = model FLOPs / (MFU x peak))")
    if args.tokens_per_s is not None and args.mfu is not None:
        raise UserError("give one rate: --tokens-per-s, or --mfu with --peak-tflops")


def make_plan(args: Any, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The plan as plain data (what ``--json`` prints); ``args`` as parsed by the command line."""
    _check(args)
    spec_path = Path(args.spec)
    spec, base, cells = load_spec(spec_path)
    gpus = gpus_per_run(spec, args.gpus_per_run)
    from_cells = summary = None
    if args.from_root is not None:
        from_cells, summary = grid_cells(Path(args.from_root))
    spread = stated_spread(args.sigma) if args.sigma is not None else pooled_spread(Path(args.from_root), summary)

    axes = axes_from_levels(spec["axes"], spec.get("report"))
    plan = family_plan(skeleton_summary(cells, axes), args.target)
    spec_seeds = len(spec["seeds"])
    batches = Batches(plan, args.simulations, args.seed, progress)
    effects = list(args.effect or DEFAULT_EFFECTS)
    sigma, upper = spread.sigma, (spread.ci95[1] if spread.ci95 else None)

    n_a = max(spec_seeds, 2)
    detectable = minimum_detectable(plan, batches.at(n_a), args.power)
    at_spec = [power_at(plan, batches.at(spec_seeds), e / sigma) if spec_seeds >= 2 else None for e in effects]
    needed = [seeds_needed(batches, e / sigma, args.power, args.max_seeds) for e in effects]
    needed_upper = (
        [seeds_needed(batches, e / upper, args.power, args.max_seeds) for e in effects] if upper is not None else None
    )

    tune = read_tune_section(spec, spec_path)
    runs = [] if tune is None else tuning_cells(cells, tune, Path(spec["root"]))
    first_seed = spec["seeds"][0]
    per_seed = run_costs(base, [c for c in cells if c.seed == first_seed])
    tuning = run_costs(base, runs) if runs else []
    rate = _rate(args, from_cells, gpus)
    options = sorted(
        {spec_seeds, *(s.n for s in needed if s.n is not None), *(s.n for s in needed_upper or () if s.n is not None)}
    )
    costs = [grid_cost(per_seed, tuning, n, rate) for n in options]

    return {
        "spec": str(spec_path),
        "root": spec["root"],
        "cells_per_seed": len(per_seed),
        "spec_seeds": spec_seeds,
        "tuning_runs": len(runs),
        "spread": spread.to_json(),
        "family": plan.to_json(),
        "target": plan.target_member.label,
        "kind": plan.target_member.kind,
        "simulation": {
            "simulations": args.simulations,
            "seed": args.seed,
            "alpha": ALPHA,
            "power": args.power,
            "rng": f"random.Random('{args.seed}/n') per seed count n",
        },
        "minimum_detectable": _detectable_json(detectable, sigma, upper, spec_seeds),
        "power_at_spec_seeds": [
            {"effect": e, "effect_sigmas": e / sigma, **(p.to_json() if p else {"power": None})}
            for e, p in zip(effects, at_spec)
        ],
        "seeds_needed": [
            {
                "effect": e,
                "effect_sigmas": e / sigma,
                "name": EFFECT_NAMES.get(e) if args.effect is None else None,
                **_needed_json(s),
                "at_sigma_upper": None if needed_upper is None else _needed_json(needed_upper[i]),
            }
            for i, (e, s) in enumerate(zip(effects, needed))
        ],
        "cost": {"rate": None if rate is None else rate.to_json(), "options": [c.to_json() for c in costs]},
        "assumptions": assumptions(spread, plan, bool(runs)),
    }


def _rate(args: Any, from_cells, gpus: int) -> Rate | None:
    if args.tokens_per_s is not None:
        return Rate(
            f"stated: {args.tokens_per_s:,.6g} tokens/s per run on {gpus} GPU{'s' if gpus != 1 else ''}",
            tokens_per_s=args.tokens_per_s,
            gpus_per_run=gpus,
        )
    if args.mfu is not None:
        return Rate(
            f"stated: model MFU {args.mfu:.3g} of {args.peak_tflops:g} TFLOP/s per GPU (the model's forward "
            "and backward FLOPs, count_flops_per_token)",
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            gpus_per_run=gpus,
        )
    if from_cells is not None:
        return measured_rate(from_cells, Path(args.from_root), gpus)
    return None


def _detectable_json(d: Detectable, sigma: float, upper: float | None, spec_seeds: int) -> dict[str, Any]:
    return {
        "seeds": d.n,
        "spec_seeds": spec_seeds,
        "effect_sigmas": d.effect,
        "effect": None if d.effect is None else d.effect * sigma,
        "effect_at_sigma_upper": None if d.effect is None or upper is None else d.effect * upper,
        "mc_range": None if d.mc_range is None else [x * sigma for x in d.mc_range],
        **({"power": d.power.to_json()} if d.power else {"power": None}),
    }


def _needed_json(s: SeedsNeeded) -> dict[str, Any]:
    return {"seeds": s.n, "max_seeds": s.max_seeds, "power": None if s.power is None else s.power.to_json()}


def assumptions(spread: Spread, plan: FamilyPlan, tuned: bool = False) -> list[str]:
    lines = [
        (
            "seed noise is normal, with the same standard deviation sigma in every cell, independent between cells "
            "(the report's Welch intervals assume independent groups, not equal spreads; unequal spreads lower the "
            "power of a contrast whose noisiest group dominates)"
        ),
        "every cell runs every seed and none is left out (a diverged or missing cell lowers the power)",
    ]
    if tuned:
        lines.append(
            "the evaluation cells of a tuned spec are simulated like any others, each at its chosen value: "
            "the noise of the choice itself is not part of sigma"
        )
    if spread.df is None:
        lines.append(
            "sigma is stated, so its own uncertainty is unknown: with --from a grid's seeds give its 95% "
            "interval, and the plan repeats its answer at the upper end"
        )
    else:
        lines.append(
            f"sigma is estimated on {spread.df} degree{'s' if spread.df != 1 else ''} of freedom; its 95% "
            "chi-square interval's upper end is where the plan repeats its answer (a minimum detectable "
            "effect scales with sigma exactly: every estimator of the report is scale-equivariant)"
        )
    lines.append(
        "the answers are Monte Carlo estimates: ± is one Monte Carlo standard error, and a seed count or "
        "effect near the power asked for may move by one step with another --seed"
    )
    return lines


# --------------------------------------------------------------------------- text


def _nats(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _power_text(p: Mapping[str, Any] | None) -> str:
    if not p or p.get("power") is None:
        return "no test"
    return f"{p['power']:.3f} ± {p['mcse']:.3f}"


def _tokens(x: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return str(x)


def render_text(plan: Mapping[str, Any]) -> str:
    fam, spread, sim = plan["family"], plan["spread"], plan["simulation"]
    lines = [
        f"plan of {plan['spec']}: {plan['cells_per_seed']} cells per seed, {plan['spec_seeds']} seed"
        f"{'s' if plan['spec_seeds'] != 1 else ''} per cell"
        + (f", {plan['tuning_runs']} tuning runs" if plan["tuning_runs"] else "")
    ]
    if spread["df"] is None:
        lines.append(f"spread: sigma = {spread['sigma']:.4g} nats, stated (--sigma); its uncertainty is unknown")
    else:
        lo, hi = spread["ci95"]
        lines.append(
            f"spread: sigma = {spread['sigma']:.4g} nats, {spread['source']} ({spread['groups']} groups, "
            f"{spread['cells']} cells, {spread['df']} degrees of freedom"
            + (f"; {spread['left_out']} cells left out" if spread["left_out"] else "")
            + f"); 95% chi-square interval [{lo:.4g}, {hi:.4g}]"
        )
    low, high = fam["size"]
    size = (
        f"{low} tests"
        if low == high
        else f"{low} to {high} tests (a share is tested only where its norm's "
        f"{'gap' if fam['single'] else 'interaction'} is estimated > 0)"
    )
    lines.append(f"family: the report's main family, {size}, Holm-adjusted at {sim['alpha']:.0%}:")
    for m in fam["members"]:
        lines.append(f"  - {m['label']}" + ("   <- planned for" if m["label"] == fam["target"] else ""))
    shifted = ", ".join(fam["shift"])
    lines.append(
        f"alternative: true mean +δ in {shifted}"
        + (" (its fixes recover nothing)" if len(fam["shift"]) > 1 else "")
        + ", 0 in every other group; "
        + (
            f"also non-zero: {', '.join(fam['non_null'])}"
            if fam["non_null"]
            else "every other member's true value is 0"
        )
    )
    lines.append(
        f"simulation: {sim['simulations']} simulated grids per seed count (seed {sim['seed']}); detected = "
        f"Holm-adjusted p < {sim['alpha']:g} with the estimate's sign; ± = one Monte Carlo standard error"
    )
    lines.append("")
    d = plan["minimum_detectable"]
    lines.append(
        f"(a) the smallest {fam['target']} detected with {sim['power']:.0%} power at {d['seeds']} seeds per cell:"
    )
    if d["spec_seeds"] < 2:
        lines.append(
            f"    at the spec's {d['spec_seeds']} seed nothing is tested (no seed-to-seed variance: the "
            "report gives no interval or p-value); at 2 seeds:"
        )
    if d["effect"] is None:
        lines.append("    none: no effect up to 10^4 sigma reaches that power")
    else:
        mc = d["mc_range"]
        where = f"; Monte Carlo range {_nats(mc[0])} to {_nats(mc[1])}" if mc else ""
        lines.append(
            f"    {_nats(d['effect'])} nats ({d['effect_sigmas']:.3g} sigma; power there "
            f"{_power_text(d['power'])}{where})"
        )
        if d["effect_at_sigma_upper"] is not None:
            lines.append(
                f"    {_nats(d['effect_at_sigma_upper'])} nats at sigma's upper 95% bound "
                f"({spread['ci95'][1]:.4g} nats)"
            )
    if plan["spec_seeds"] >= 2:
        lines.append(
            f"    power at {plan['spec_seeds']} seeds: "
            + "; ".join(f"+{p['effect']:g} nats {_power_text(p)}" for p in plan["power_at_spec_seeds"])
        )
    lines.append(f"(b) seeds per cell to detect an effect with {sim['power']:.0%} power (at most {plan_max(plan)}):")
    for s in plan["seeds_needed"]:
        name = f"; {s['name']}" if s.get("name") else ""
        text = (
            f"more than {s['max_seeds']} (power {_power_text(s['power'])} at {s['max_seeds']})"
            if s["seeds"] is None
            else f"{s['seeds']} seeds (power {_power_text(s['power'])})"
        )
        up = s["at_sigma_upper"]
        if up is not None:
            text += (
                f"; at sigma's upper bound more than {up['max_seeds']}"
                if up["seeds"] is None
                else f"; at sigma's upper bound {up['seeds']}"
            )
        lines.append(f"    +{s['effect']:g} nats ({s['effect_sigmas']:.3g} sigma{name}): {text}")
    cost = plan["cost"]
    rate = cost["rate"]
    lines.append(
        "(c) cost"
        + (
            f" (GPU-hours: {rate['source']})"
            if rate
            else " (GPU-hours: none; pass --from a grid with metrics, --tokens-per-s, or --mfu with --peak-tflops)"
        )
        + ":"
    )
    header = ["seeds per cell", "runs", "steps", "tokens", "GPU-hours"]
    rows = []
    for c in cost["options"]:
        label = f"{c['seeds']}" + (" (the spec's)" if c["seeds"] == plan["spec_seeds"] else "")
        runs = f"{c['runs']}" + (f" ({c['tuning_runs']} tuning)" if c["tuning_runs"] else "")
        rows.append(
            [
                label,
                runs,
                f"{c['steps']:,}",
                _tokens(c["tokens"]),
                "—" if c["gpu_hours"] is None else f"{c['gpu_hours']:,.3g}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("    " + "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan["assumptions"]]
    return "\n".join(lines)


def plan_max(plan: Mapping[str, Any]) -> int:
    return plan["seeds_needed"][0]["max_seeds"] if plan["seeds_needed"] else DEFAULT_MAX_SEEDS


def plan_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = make_plan(args, Progress(lambda line: print(line, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render_text(plan))
    return 0
