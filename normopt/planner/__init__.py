"""``normopt plan SPEC``: what a grid can detect before it runs, and what it costs.

* :mod:`normopt.planner.family`: the main family of tests the report would form for a spec
  (its members, their coefficients, the contrast planned for);
* :mod:`normopt.planner.power`: the power of the report's Holm-adjusted test of that contrast,
  by simulating the report's own estimators; the minimum detectable effect and the seeds
  needed;
* :mod:`normopt.planner.spread`: the seed-to-seed spread pooled from a finished or pilot grid,
  with its chi-square interval;
* :mod:`normopt.planner.cost`: runs, steps, tokens and GPU-hours of a spec at any seed count;
* :mod:`normopt.planner.command`: the command line and its text and JSON output.
"""
