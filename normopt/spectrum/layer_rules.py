"""The ``optim.ns_steps_per_layer`` value of a recommendation: steps per depth group as glob
rules over block-index ranges (``normopt spectrum``'s output, :mod:`normopt.spectrum.report`)."""

from __future__ import annotations

from collections.abc import Mapping

from normopt.models.matrix_roles import depth_group
from normopt.optim.ns_rules import format_ns_steps_rules


def index_globs(lo: int, hi: int) -> list[str]:
    """Glob patterns (``fnmatch``: digits and ``[a-b]`` classes) matching exactly the decimal
    integers lo..hi: 0..3 -> ["[0-3]"], 4..15 -> ["[4-9]", "1[0-5]"], 8..23 -> ["[8-9]",
    "1[0-9]", "2[0-3]"]. Each pattern matches numbers of one length only, so
    ``layers.1[0-5].*`` never matches block 1 or block 100."""
    if lo > hi:
        return []
    if len(str(lo)) < len(str(hi)):  # split at the powers of ten: one length per piece
        edge = 10 ** len(str(lo))
        return index_globs(lo, edge - 1) + index_globs(edge, hi)
    return _same_length_globs(str(lo), str(hi))


def _same_length_globs(lo: str, hi: str) -> list[str]:
    """Patterns for the digit strings lo..hi of one length (lo <= hi)."""
    if lo == hi:
        return [lo]
    common = next(i for i, (a, b) in enumerate(zip(lo, hi)) if a != b)
    prefix, rest = lo[:common], len(lo) - common - 1
    a, b = int(lo[common]), int(hi[common])
    low_full, high_full = lo[common + 1 :] == "0" * rest, hi[common + 1 :] == "9" * rest
    digits = lambda x, y: str(x) if x == y else f"[{x}-{y}]"  # noqa: E731
    patterns = []
    if not low_full:  # lo's leading digit with a partial tail
        patterns += [prefix + p for p in _same_length_globs(lo[common:], str(a) + "9" * rest)]
        a += 1
    end = b if high_full else b - 1
    if a <= end:  # whole decades in between
        patterns.append(prefix + digits(a, end) + "[0-9]" * rest)
    if not high_full:
        patterns += [prefix + p for p in _same_length_globs(str(b) + "0" * rest, hi[common:])]
    return patterns


def ns_steps_per_layer(steps_by_group: Mapping[str, int | None], n_layers: int, n_groups: int = 3) -> str:
    """The ``optim.ns_steps_per_layer`` value for a model of ``n_layers`` blocks, each block
    taking its depth group's steps (at least 1, the config's minimum), blocks of groups
    without a recommendation left to optim.ns_steps. Neighbouring blocks with the same steps
    share rules over index ranges (``index_globs``): 24 blocks in three groups read
    "layers.[0-7].*=6,layers.[8-9].*=7,layers.1[0-5].*=7,layers.1[6-9].*=9,layers.2[0-3].*=9"."""
    per_layer = [steps_by_group.get(depth_group(layer, n_layers, n_groups)) for layer in range(n_layers)]
    rules, start = [], 0
    for layer in range(1, n_layers + 1):
        if layer < n_layers and per_layer[layer] == per_layer[start]:
            continue
        if per_layer[start] is not None:
            steps = max(1, per_layer[start])
            rules += [(f"layers.{pattern}.*", steps) for pattern in index_globs(start, layer - 1)]
        start = layer
    return format_ns_steps_rules(rules)
