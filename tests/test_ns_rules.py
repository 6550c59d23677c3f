"""Per-layer NS step rules: parsing, validation, first-match resolution, grouping."""

from __future__ import annotations

import pytest
import torch

from normopt.config import load_config
from normopt.errors import UserError
from normopt.optim.ns_rules import (
    NSStepRule,
    NSStepRules,
    ns_steps_param_groups,
    parse_ns_steps_rules,
    resolve_ns_steps,
)


def test_parse_ns_steps_rules():
    assert parse_ns_steps_rules("") == []
    assert parse_ns_steps_rules("layers.0.*=8, re:w2=6") == [("layers.0.*", 8), ("re:w2", 6)]
    for bad in ["layers.0", "x=0", "=3", "x=y"]:
        with pytest.raises(ValueError):
            parse_ns_steps_rules(bad)


def test_resolve_ns_steps_globs_regexes_and_default():
    rules = [
        ("layers.0.*", 8),
        ("re:attention\\.w[qk]", 3),
        ("*.feed_forward.w2.weight", 7),
    ]
    assert resolve_ns_steps("layers.0.attention.wq.weight", rules, 5) == 8  # first match wins
    assert resolve_ns_steps("layers.3.attention.wk.weight", rules, 5) == 3
    assert resolve_ns_steps("layers.3.attention.wv.weight", rules, 5) == 5
    assert resolve_ns_steps("layers.3.feed_forward.w2.weight", rules, 5) == 7
    assert resolve_ns_steps("anything", None, 4) == 4
    assert resolve_ns_steps("layers.1.x", {"layers.1.*": 2}, 5) == 2
    with pytest.raises(ValueError, match="ns_steps"):
        resolve_ns_steps("a", [("a", 0)], 5)
    with pytest.raises(ValueError, match="ns_steps"):
        resolve_ns_steps("a", ["a"], 5)


def test_the_string_and_the_pairs_give_the_same_rules():
    text = "layers.0.*=8, re:attention\\.w[qk]=3 ,*.w2.weight=7,"
    rules = NSStepRules.parse(text)
    assert rules == NSStepRules.of(parse_ns_steps_rules(text)) == NSStepRules.of(rules)
    assert rules.pairs() == [("layers.0.*", 8), ("re:attention\\.w[qk]", 3), ("*.w2.weight", 7)]
    assert rules.steps_for("layers.3.attention.wk.weight", 5) == 3
    assert NSStepRules.parse("").steps_for("anything", 4) == 4


def test_globs_match_the_whole_name_and_regexes_search_anywhere():
    assert NSStepRule("re:w2", 3).matches("layers.1.ffn.w2.weight")
    assert not NSStepRule("w2", 3).matches("layers.1.ffn.w2.weight")
    assert NSStepRule("*w2*", 3).matches("layers.1.ffn.w2.weight")
    assert not NSStepRule("Layers.*", 3).matches("layers.1.ffn.w2.weight")  # case-sensitive


def test_an_invalid_regex_is_refused_when_the_rules_are_built():
    with pytest.raises(ValueError, match=r"^'re:\[=3': invalid regular expression \(unterminated"):
        NSStepRules.parse("layers.0.*=8,re:[=3")
    with pytest.raises(ValueError, match="ns_steps rules: 're:\\[' is not a valid regular expression"):
        NSStepRules.of([("re:[", 3)])
    with pytest.raises(UserError, match=r"^optim.ns_steps_per_layer: 're:\[=3': invalid regular expression"):
        load_config(None, ["optim.name=adamw", "optim.ns_steps_per_layer=re:[=3"])


def test_param_groups_by_step_count_keep_first_appearance_order():
    named = [
        (name, torch.nn.Parameter(torch.zeros(2, 2)))
        for name in ("layers.0.a", "layers.1.a", "layers.0.b", "layers.2.a")
    ]
    groups = ns_steps_param_groups(named, NSStepRules.parse("layers.0.*=8"), 5, lr=0.1)
    assert [(g["ns_steps"], len(g["params"]), g["lr"]) for g in groups] == [(8, 2, 0.1), (5, 2, 0.1)]
    assert groups[0]["params"][1] is named[2][1]


def test_formatted_rules_parse_back():
    from normopt.optim.ns_rules import NSStepRules, format_ns_steps_rules

    rules = [("layers.[0-7].*", 6), ("re:attn\\.w[qk]", 8), ("layers.1[0-5].*", 7)]
    assert NSStepRules.parse(format_ns_steps_rules(rules)).pairs() == rules
    assert format_ns_steps_rules([]) == ""
