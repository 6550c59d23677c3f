"""Per-layer Newton-Schulz step counts: the ``optim.ns_steps_per_layer`` rules.

Different matrices may need different numbers of NS steps (their spectra differ by layer
and type, see ``normopt.diagnostics.ns_spectrum``). A rule list names them:

    "layers.0.*=8,re:attention\\.w[qk]=6"

Each rule is ``pattern=steps``, the first matching pattern wins, and matrices no rule
matches keep ``optim.ns_steps``. A pattern is a glob matched against the full parameter
name (``layers.*.attention.wv.weight``, case-sensitive) unless it starts with ``re:``,
in which case the rest is a regular expression searched anywhere in the name.

Everything about the rules lives here: parsing the config string, refusing malformed
rules and invalid regular expressions (config validation calls ``NSStepRules.parse``, so
a bad rule is refused before any work starts, whatever the optimizer), matching a name,
and splitting matrices into one torch param group per step count.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

REGEX_PREFIX = "re:"


def is_step_count(steps: object) -> bool:
    """A valid number of Newton-Schulz steps: an integer >= 1 (every check of one asks here)."""
    return isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1


@dataclass(frozen=True)
class NSStepRule:
    """One ``pattern=steps`` rule; the pattern is compiled (and so checked) on creation."""

    pattern: str
    steps: int
    _regex: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_step_count(self.steps):
            raise ValueError(f"ns_steps rules: steps for {self.pattern!r} must be an integer >= 1, got {self.steps!r}")
        regex = None
        if self.pattern.startswith(REGEX_PREFIX):
            try:
                regex = re.compile(self.pattern[len(REGEX_PREFIX) :])
            except re.error as exc:
                raise ValueError(f"ns_steps rules: {self.pattern!r} is not a valid regular expression ({exc})") from exc
        object.__setattr__(self, "_regex", regex)

    def matches(self, name: str) -> bool:
        """Regex: searched anywhere in ``name``; glob: matched against all of it."""
        if self._regex is not None:
            return self._regex.search(name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


RulesLike = Union["NSStepRules", Mapping[str, int], Sequence[tuple[str, int]], None]


@dataclass(frozen=True)
class NSStepRules:
    """An ordered list of rules; the first one whose pattern matches a name wins."""

    rules: tuple[NSStepRule, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NSStepRules:
        """Rules from the config string ``"layers.0.*=8, re:w2=6"`` (empty: no rules).

        Items are separated by commas and split at their last ``=``; surrounding spaces
        are dropped. Raises ValueError for an item that is not pattern=steps with
        steps >= 1, or whose ``re:`` pattern is not a valid regular expression.
        """
        rules = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            pattern, sep, steps = item.rpartition("=")
            if not sep or not pattern or not re.fullmatch(r"[0-9]{1,6}", steps.strip()) or int(steps) < 1:
                raise ValueError(f"{item!r} is not pattern=steps with steps >= 1")
            try:
                rules.append(NSStepRule(pattern.strip(), int(steps)))
            except ValueError as exc:  # the steps are fine, so the pattern is not
                raise ValueError(f"{item!r}: invalid regular expression ({exc.__cause__})") from None
        return cls(tuple(rules))

    @classmethod
    def of(cls, rules: RulesLike) -> NSStepRules:
        """Rules from (pattern, steps) pairs, a dict (in insertion order), or None.

        Raises ValueError naming ``ns_steps`` for anything that is not a pair of a
        pattern and an integer >= 1.
        """
        if isinstance(rules, NSStepRules):
            return rules
        if not rules:
            return cls()
        pairs = rules.items() if isinstance(rules, Mapping) else rules
        parsed = []
        for pair in pairs:
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"ns_steps rules: expected (pattern, steps) pairs, got {pair!r}")
            pattern, steps = pair
            parsed.append(NSStepRule(str(pattern), steps))
        return cls(tuple(parsed))

    def pairs(self) -> list[tuple[str, int]]:
        """The rules as (pattern, steps) pairs, in order."""
        return [(rule.pattern, rule.steps) for rule in self.rules]

    def steps_for(self, name: str, default: int) -> int:
        """NS steps for the parameter called ``name``: the first matching rule's, else ``default``."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.steps
        return default


def parse_ns_steps_rules(text: str) -> list[tuple[str, int]]:
    """``"layers.0.*=8,re:w2=6"`` -> [("layers.0.*", 8), ("re:w2", 6)] (ValueError if malformed)."""
    return NSStepRules.parse(text).pairs()


def format_ns_steps_rules(rules: Sequence[tuple[str, int]]) -> str:
    """The ``optim.ns_steps_per_layer`` string of (pattern, steps) rules: the inverse of
    :meth:`NSStepRules.parse` (``parse(format(r)).pairs() == r``)."""
    return ",".join(f"{pattern}={steps}" for pattern, steps in rules)


def resolve_ns_steps(name: str, rules: RulesLike, default: int) -> int:
    """Number of NS steps for the parameter called ``name`` (see ``NSStepRules.steps_for``)."""
    return NSStepRules.of(rules).steps_for(name, default)


def ns_steps_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    rules: RulesLike,
    default_steps: int = 5,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split named matrices into torch param groups by their NS step count.

    Each parameter's count is ``rules.steps_for(name, default_steps)``. Returns one group
    per distinct count, in order of first appearance:
    ``{"params": [...], "ns_steps": k, **group_options}``.
    """
    rules = NSStepRules.of(rules)
    groups: dict[int, dict[str, Any]] = {}
    for name, p in named_params:
        k = rules.steps_for(name, default_steps)
        groups.setdefault(k, {"params": [], "ns_steps": k, **group_options})["params"].append(p)
    return list(groups.values())
