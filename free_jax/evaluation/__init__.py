"""Evaluation: metrics, every decoder on the same inputs with timing, reports and plots."""

from free_jax.evaluation.metrics import score
from free_jax.evaluation.report import markdown_table, pareto_plot, write_report
from free_jax.evaluation.runner import DecoderChoice, EvalSettings, make_batches, run_decoder
from free_jax.evaluation.suite import SuiteSpec, run_suite

__all__ = [
    "DecoderChoice",
    "EvalSettings",
    "SuiteSpec",
    "make_batches",
    "markdown_table",
    "pareto_plot",
    "run_decoder",
    "run_suite",
    "score",
    "write_report",
]
