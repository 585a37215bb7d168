"""Calibration figure: what the estimator saw and where it put the threshold.

Top panel: density histograms of the confidences of agreeing and disagreeing tokens, with the
fitted Beta densities. Bottom panel: the posterior P(agree | c) the threshold was read from, the
level zeta, the threshold, and (Beta mixture only) the posterior interval shaded; for Learn-then-Test
the empirical risk on the tested grid and epsilon; for target accuracy the accuracy of the exiting
tokens against the threshold and the target. A never-exit threshold (inf) draws no line.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so it is
safe in tests, servers and notebooks alike.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from free_jax.calibration.common import (
    EPS,
    agree_posterior,
    beta_logpdf,
    clean_inputs,
)
from free_jax.calibration.result import ThresholdResult
from free_jax.calibration.target import exit_accuracy

_AGREE_COLOR = "tab:blue"
_DISAGREE_COLOR = "tab:red"


def plot_calibration(
    result: ThresholdResult,
    confidences: Any,
    agree: Any,
    path: str | os.PathLike,
    *,
    bins: int = 40,
    dpi: int = 120,
    title: str | None = None,
) -> str:
    """Writes a PNG of the calibration to `path` and returns the path.

    Args:
      result: from fit_moments_threshold / fit_bmm_threshold (or load_threshold).
      confidences, agree: the pairs it was fitted on (validated and NaN-filtered as in the fits).
      path: output file; parent directories are created.
      bins: histogram bins over [0, 1].
    """
    data = clean_inputs(confidences, agree)
    path = os.fspath(path)
    fig = Figure(figsize=(7.0, 6.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_h, ax_p = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})

    # ---------------------------------------------------------------- histograms and densities
    edges = np.linspace(0.0, 1.0, bins + 1)
    for mask, label, color in (
        (data.agree_N, f"agree (n={data.n_agree})", _AGREE_COLOR),
        (~data.agree_N, f"disagree (n={data.n_disagree})", _DISAGREE_COLOR),
    ):
        if mask.any():
            ax_h.hist(
                data.conf_N[mask], bins=edges, density=True, alpha=0.35, color=color, label=label
            )
    c = np.linspace(EPS, 1.0 - EPS, 400)
    for params, name, color in (
        (result.agree, "agree", _AGREE_COLOR),
        (result.disagree, "disagree", _DISAGREE_COLOR),
    ):
        if params is not None:
            ax_h.plot(
                c,
                np.exp(beta_logpdf(c, params)),
                color=color,
                lw=2,
                label=f"Beta({params.alpha:.3g}, {params.beta:.3g}) {name}",
            )
    ax_h.set_ylabel("density")
    # Peaked Beta densities run off to infinity at the edges; keep the histograms readable.
    heights = [p.get_height() for p in ax_h.patches]
    if heights:
        ax_h.set_ylim(0.0, 1.3 * max(heights))
    ax_h.legend(fontsize=8, loc="upper left")

    # ---------------------------------------------------------------- what the threshold was read from
    ylabel = "P(agree | c)"
    if result.epsilon is not None:
        ylabel = "empirical risk" if result.estimator == "ltt" else f"{result.estimator} risk"
        if result.tested_thresholds:
            ax_p.step(
                result.tested_thresholds, result.tested_risks, where="post", color="black",
                lw=2, label="empirical risk, tested grid",
            )  # fmt: skip
        ax_p.axhline(result.epsilon, color="gray", ls=":", label=f"epsilon = {result.epsilon:g}")
        top = max([2.0 * result.epsilon, *result.tested_risks])
        ax_p.set_ylim(0.0, 1.1 * top)
    elif result.target is not None:
        ylabel = "accuracy of exiting tokens"
        grid = np.linspace(0.0, 1.0, 401)
        exiting, agreeing = exit_accuracy(data.conf_N, data.agree_N, grid)
        some = exiting > 0
        ax_p.plot(grid[some], agreeing[some] / exiting[some], color="black", lw=2, label=ylabel)
        ax_p.axhline(result.target, color="gray", ls=":", label=f"target = {result.target:g}")
    elif result.curve_c:
        ax_p.plot(result.curve_c, result.curve_p, color="black", lw=2, label="P(agree | c)")
    elif result.agree is not None and result.disagree is not None:
        w = 0.5 if result.agree_weight is None else result.agree_weight
        ax_p.plot(
            c,
            agree_posterior(c, result.agree, result.disagree, w),
            color="black",
            lw=2,
            label="P(agree | c)",
        )
    if result.zeta is not None:
        ax_p.axhline(result.zeta, color="gray", ls=":", label=f"zeta = {result.zeta:g}")
    if result.interval is not None:
        lo, hi = result.interval
        mass = "" if result.interval_mass is None else f"{100 * result.interval_mass:.0f}% "
        for ax in (ax_h, ax_p):
            ax.axvspan(
                lo,
                hi,
                color="orange",
                alpha=0.2,
                label=f"{mass}interval [{lo:.3f}, {hi:.3f}]" if ax is ax_p else None,
            )
    for ax in (ax_h, ax_p) if not result.never_exit else ():
        ax.axvline(
            result.threshold,
            color="orange",
            lw=2,
            label=f"threshold {result.threshold:.3f}" if ax is ax_p else None,
        )
    if result.epsilon is None:
        ax_p.set_ylim(-0.02, 1.02)
    ax_p.set_xlim(0.0, 1.0)
    ax_p.set_xlabel("shallow confidence c" if result.estimator != "ltt-sequence" else "threshold")
    ax_p.set_ylabel(ylabel)
    ax_p.legend(fontsize=8, loc="lower right")

    head = title or f"{result.estimator}: threshold {result.threshold:.3f} (n={result.n})"
    if title is None and result.epsilon is not None:
        head += f", epsilon {result.epsilon:g}, delta {result.delta:g}"
    if result.fallback:
        head += f"\nFALLBACK: {result.fallback_reason}"
    ax_h.set_title(head, fontsize=10)
    fig.tight_layout()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return path
