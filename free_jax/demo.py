"""`make demo`: the shipped demo model, calibrated and compared across every decoder on real text.

Steps (each reuses what a previous run left):
  1. system_translations is prepared from this machine's German gettext catalogs (TFDS, offline);
  2. FREE's threshold is calibrated on validation (gin_configs/runs/demo_calibrate.gin) into
     runs/demo/threshold.json, unless that file exists;
  3. every decoder runs on test examples at batch 8 and 1, the FREE/CALM threshold sweep at both
     (gin_configs/runs/demo_eval.gin); the table, the paths of results.json/md and the plots, and a
     plain verdict on FREE's calibrated threshold at each batch size are printed.
Where the machine has no German catalogs, it says so and shows the same pipeline on python_docstrings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gin

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "demo" / "model"
CATALOGS = Path("/usr/share/locale/de/LC_MESSAGES")

NO_CATALOGS = f"""\
This machine has no German gettext catalogs ({CATALOGS}/*.mo), so the demo task
system_translations cannot be built here. The same pipeline runs on the python_docstrings corpus
(mined from this Python's standard library) with a model trained here:

  make demo-train DEMO_RUN=gin_configs/runs/demo_docstrings_cpu.gin   # about an hour on 2 cores
  .venv/bin/python -m free_jax.calibrate --gin_file=gin_configs/runs/calibrate.gin \\
      --gin.CHECKPOINT="'runs/demo_docstrings'" --gin.TASK="'python_docstrings'"
  .venv/bin/python -m free_jax.evaluate --gin_file=gin_configs/runs/evaluate.gin \\
      --gin.CHECKPOINT="'runs/demo_docstrings'" --gin.TASK="'python_docstrings'" \\
      --gin.THRESHOLD_FILE="'runs/demo_docstrings/threshold.json'" --gin.NUM_EXAMPLES=300
"""


def _run_entry(module, gin_file: str, bindings: list[str]):
    gin.clear_config()
    return module.main([f"--gin_file={gin_file}", *bindings])


def verdict_lines(records: list[dict], floor: float = 0.99) -> list[str]:
    r"""Plain sentences on FREE's calibrated threshold at every batch size: the share of the full
    model's score it keeps and its speed, a warning where it keeps less than `floor`, and the
    fastest swept FREE threshold that keeps at least `floor` there.

    >>> rows = [
    ...     dict(kind="main", method="free", decoder="free (calibrated 0.015)", threshold=0.015,
    ...          batch_size=1, score_ratio_vs_full=0.934, speedup_vs_full=1.11),
    ...     dict(kind="sweep", method="free", decoder="sweep free 0.9", threshold=0.9,
    ...          batch_size=1, score_ratio_vs_full=1.0, speedup_vs_full=1.4)]
    >>> print("\n".join(verdict_lines(rows)))
    batch 1: FREE's calibrated threshold 0.015 keeps 93.4% of the full model's score at 1.11x.
      It LOSES QUALITY: the Beta-mixture criterion lands where shallow and deep disagree too often.
      The sweep's fastest FREE setting keeping >= 99%: threshold 0.9, 100.0% at 1.40x.
    """
    lines = []
    for r in records:
        if r["kind"] != "main" or not r["decoder"].startswith("free (calibrated"):
            continue
        b = r["batch_size"]
        lines.append(
            f"batch {b}: FREE's calibrated threshold {r['threshold']:g} keeps "
            f"{100 * r['score_ratio_vs_full']:.1f}% of the full model's score at "
            f"{r['speedup_vs_full']:.2f}x."
        )
        if r["score_ratio_vs_full"] < floor:
            lines.append(
                "  It LOSES QUALITY: the Beta-mixture criterion lands where shallow and deep "
                "disagree too often."
            )
        good = [
            x for x in records
            if x["kind"] == "sweep" and x["method"] == "free" and x["batch_size"] == b
            and x["score_ratio_vs_full"] >= floor
        ]  # fmt: skip
        if good:
            best = max(good, key=lambda x: x["speedup_vs_full"])
            lines.append(
                f"  The sweep's fastest FREE setting keeping >= {100 * floor:.0f}%: threshold "
                f"{best['threshold']:g}, {100 * best['score_ratio_vs_full']:.1f}% at "
                f"{best['speedup_vs_full']:.2f}x."
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m free_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--num_examples", type=int, default=None, help="test examples (gin: 300)")
    parser.add_argument("--recalibrate", action="store_true", help="refit threshold.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)  # the gin files name demo/model and runs/demo relative to the repository

    if not any(CATALOGS.glob("*.mo")):
        print(NO_CATALOGS)
        return 1
    if not (MODEL / "config.json").exists():
        print(f"The demo model is missing from {MODEL}; `make demo-train` trains it (see README).")
        return 1
    from free_jax import calibrate as calibrate_entry
    from free_jax import evaluate as evaluate_entry

    start = time.perf_counter()
    card = MODEL / "MODEL_CARD.md"
    if card.exists():
        print(card.read_text().split("\n## ", 1)[0].strip(), "\n")
    threshold = REPO / "runs" / "demo" / "threshold.json"
    if threshold.exists() and not args.recalibrate:
        print(f"[1/2] reusing {threshold.relative_to(REPO)} (--recalibrate to refit)")
    else:
        print("[1/2] calibrating FREE's threshold on validation examples")
        _run_entry(calibrate_entry, "gin_configs/runs/demo_calibrate.gin", [])
    print("[2/2] every decoder on test examples, batch 8 and 1, threshold sweeps at both")
    extra = [f"--gin.NUM_EXAMPLES={args.num_examples}"] if args.num_examples else []
    out = _run_entry(evaluate_entry, "gin_configs/runs/demo_eval.gin", extra)
    same = out.get("lossless_equals_full")
    print(f"\nFREE lossless output identical to full greedy on every example: {same}")
    print("\n".join(verdict_lines(out["records"])))
    plot = REPO / "runs" / "demo" / "calibration.png"
    if plot.exists():
        print(f"calibration plot (shallow confidence vs agreement, the fitted threshold): {plot}")
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
