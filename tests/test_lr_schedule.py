from types import SimpleNamespace

import pytest

from normopt.optim.lr_schedule import cosine_factor, lr_factor, warmup_factor, wsd_factor


def test_warmup_is_linear_then_flat():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_cosine_runs_from_one_to_min_ratio():
    values = [cosine_factor(s, 100, 10, 0.1) for s in range(100)]
    assert values[9] == 1.0 and values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert cosine_factor(55, 100, 10, 0.1) == pytest.approx(0.55, abs=0.01)


def test_wsd_is_stable_then_decays_linearly():
    values = [wsd_factor(s, 100, 10, 0.0, 0.2) for s in range(100)]
    assert values[10:80] == [1.0] * 70
    assert values[80] == pytest.approx(1 - 1 / 20)
    assert values[-1] == pytest.approx(0.0)


def test_lr_factor_dispatches_by_name():
    cfg = SimpleNamespace(schedule="constant", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(cfg, 50, 100) == 1.0
    cfg.schedule = "wsd"
    assert lr_factor(cfg, 99, 100) == pytest.approx(0.1)
