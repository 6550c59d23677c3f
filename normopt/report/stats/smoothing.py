"""Smoothing of logged loss curves for the report's plots: the centred moving mean the plots
draw (``centred_smooth``, its window matched to an EMA factor by ``centred_half_width``) and
the debiased trailing EMA (``ema_smooth``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def ema_smooth(values: Sequence[float], beta: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing):
    m_t = beta * m_{t-1} + (1 - beta) * x_t with m_{-1} = 0, s_t = m_t / (1 - beta^(t+1)),
    i.e. s_t = sum_i beta^(t-i) x_i / sum_i beta^(t-i). Starting from s_0 = x_0 instead would give
    the first (highest) loss the weight of the whole unseen past and hold the curve up for a
    short run's few logged points. beta = 0: the raw values."""
    smoothed, m = [], 0.0
    for t, x in enumerate(values):
        m = beta * m + (1 - beta) * x
        smoothed.append(m / (1 - beta ** (t + 1)))
    return smoothed


def centred_half_width(smoothing: float) -> int:
    """Half-width (in logged points) of the centred window matching an EMA factor: an EMA of
    factor beta averages over about (1 + beta) / (1 - beta) points, so beta = 0.9 gives 19
    points (half-width 9); beta = 0 gives 0 (the raw values)."""
    return int(round((1 + smoothing) / (1 - smoothing))) // 2


def centred_smooth(values: Sequence[float], half_width: int) -> list[float]:
    """Mean over a window centred on each point: s_t = mean(x_{t-k} .. x_{t+k}), with k shrunk
    near the ends (k = min(half_width, t, n-1-t)) so the window stays centred. Unlike a trailing
    EMA, a falling loss curve is not drawn late (above its logged values). The window never
    spans more than about a tenth of the curve (half_width <= n // 20): on a short, strongly
    curved run a wide mean would lift the curve above its points just as a lag does."""
    half_width = min(half_width, len(values) // 20)
    smoothed = []
    for t in range(len(values)):
        k = min(half_width, t, len(values) - 1 - t)
        smoothed.append(statistics.fmean(values[t - k : t + k + 1]))
    return smoothed
