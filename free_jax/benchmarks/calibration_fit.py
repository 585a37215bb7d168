"""Fit time of each threshold estimator on synthetic agreement records.

    python -m free_jax.benchmarks.calibration_fit [--sizes 1000 10000] [--repeats 5] [--json PATH]

Data: agree ~ Bernoulli(0.7); confidences Beta(8, 2) for agreeing and Beta(2, 5) for disagreeing
tokens. For each estimator and size the first call is timed separately (for the NumPyro fits it
includes XLA compilation; their model sees the data only through six sufficient statistics, so the
compiled program is shared by every size and only the very first call pays it), then the median of
`--repeats` further calls is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from free_jax.calibration import fit_bmm_threshold, fit_moments_threshold

ESTIMATORS = {
    "moments": lambda c, y, seed: fit_moments_threshold(c, y),
    "svi": lambda c, y, seed: fit_bmm_threshold(c, y, method="svi", seed=seed),
    "nuts": lambda c, y, seed: fit_bmm_threshold(c, y, method="nuts", seed=seed),
}


def synthetic_records(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    agree_N = rng.random(n) < 0.7
    conf_N = np.where(agree_N, rng.beta(8.0, 2.0, n), rng.beta(2.0, 5.0, n))
    return conf_N, agree_N


def _timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def run(sizes: list[int], repeats: int, estimators: list[str]) -> dict:
    device = jax.devices()[0]
    rows = []
    for name in estimators:
        fit = ESTIMATORS[name]
        for n in sizes:
            conf_N, agree_N = synthetic_records(n)
            first_s, result = _timed(fit, conf_N, agree_N, 0)
            times = [_timed(fit, conf_N, agree_N, seed)[0] for seed in range(1, repeats + 1)]
            rows.append(
                {
                    "estimator": name,
                    "n": n,
                    "first_call_s": first_s,
                    "median_s": statistics.median(times),
                    "repeats": repeats,
                    "threshold": result.threshold,
                    "interval": result.interval,
                }
            )
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "rows": rows,
    }


def format_table(report: dict) -> str:
    lines = [
        f"device: {report['device_kind']} (platform {report['platform']}, jax "
        f"{report['jax_version']})",
        f"{'estimator':<10} {'n':>7} {'first call s':>13} {'median s':>10} {'threshold':>10}  "
        "interval",
    ]
    for r in report["rows"]:
        interval = (
            "-" if r["interval"] is None else f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
        )
        lines.append(
            f"{r['estimator']:<10} {r['n']:>7} {r['first_call_s']:>13.4f} {r['median_s']:>10.4f} "
            f"{r['threshold']:>10.3f}  {interval}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS)
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    report = run(args.sizes, args.repeats, args.estimators)
    print(format_table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
