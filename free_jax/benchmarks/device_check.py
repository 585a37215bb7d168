"""One command for a machine with an accelerator: the decode table and training throughput.

    python -m free_jax.benchmarks.device_check [--out DIR]      # under 8 minutes on one GPU/TPU

On an accelerator: the decode benchmark (`benchmarks/decode.py`, random weights, exit rate forced
to 0.7) for the t5-small and t5-large shapes in bfloat16 at batch 1, 8 and 32 — full greedy, CALM,
FREE, FREE with deferred deep passes (its policy planned on the device) and FREE lossless — and the
training step's tokens/s for the demo model and t5-small. On a CPU it runs a reduced version (the
tiny preset, batch 1 and 2, 8 tokens), which is what the tests run. Writes DIR/device_check.json
(every record) and DIR/device_check.md (the tables, with the device), and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax

from free_jax.benchmarks import decode as decode_bench
from free_jax.benchmarks import train_step as train_bench

DECODERS = ("greedy", "calm", "free", "free_deferred", "free_lossless")


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode-table run."""

    preset: str
    dtype: str
    batch_sizes: tuple[int, ...]
    max_decode_len: int
    source_len: int
    repeats: int


def plan(reduced: bool) -> tuple[list[Case], dict]:
    """(decode cases, training-benchmark settings) for an accelerator or the reduced CPU run."""
    if reduced:
        return [Case("tiny", "float32", (1, 2), 8, 6, 1)], dict(
            models=("tiny",), batch_size=2, length=8, steps=1, warmup=1
        )
    cases = [
        Case("t5-small", "bfloat16", (1, 8, 32), 64, 64, 3),
        Case("t5-large", "bfloat16", (1, 8, 32), 64, 64, 3),
    ]
    return cases, dict(models=("demo", "t5-small"), batch_size=16, length=64, steps=10, warmup=2)


def run(out_dir: str | Path, reduced: bool | None = None) -> dict:
    """Runs the check; returns {"device", "decode", "train", "tables"} and writes the files."""
    device = jax.devices()[0]
    reduced = device.platform == "cpu" if reduced is None else reduced
    cases, train = plan(reduced)
    start = time.perf_counter()
    decode_records, tables = [], []
    for case in cases:
        args = decode_bench.parse_args([
            "--preset", case.preset, "--dtype", case.dtype, "--max_decode_len",
            str(case.max_decode_len), "--source_len", str(case.source_len), "--repeats",
            str(case.repeats), "--force_exit_rate", "0.7", "--no_hf", "--batch_sizes",
            *map(str, case.batch_sizes), "--decoders", *DECODERS,
        ])  # fmt: skip
        records, components = decode_bench.run(args)
        for r in records:
            r["preset"], r["dtype"] = case.preset, case.dtype
        decode_records += records
        tables.append(f"### {case.preset} ({case.dtype})\n\n```\n"
                      f"{decode_bench.format_table(records, components)}\n```")  # fmt: skip
    train_records = [
        train_bench.benchmark(
            name, train["batch_size"], train["length"], train["steps"], train["warmup"], "free"
        )
        for name in train["models"]
    ]
    lines = ["| model | params | step s | tokens/s |", "|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['params_M']:.1f}M | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} |"
        for r in train_records
    ]
    tables.append("### training step (FREE loss)\n\n" + "\n".join(lines))
    name = f"{device.platform} {device.device_kind} (x{jax.device_count()})"
    wall = time.perf_counter() - start
    result = {
        "device": name, "reduced": reduced, "wall_s": wall, "decode": decode_records,
        "train": train_records,
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(result, indent=2, default=float))
    header = f"# device check: {name}{' (reduced)' if reduced else ''}, {wall:.0f} s\n\n"
    result["tables"] = header + "\n\n".join(tables) + "\n"
    (out / "device_check.md").write_text(result["tables"])
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("runs", "device_check"))
    parser.add_argument("--reduced", action="store_true", help="the CPU version anywhere")
    args = parser.parse_args(argv)
    result = run(args.out, True if args.reduced else None)
    print(result["tables"])
    print(f"wrote {Path(args.out) / 'device_check.json'} and device_check.md")
    return result


if __name__ == "__main__":
    main()
