"""results.json, results.md (the table a paper would print) and the quality-versus-speed Pareto plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(x, digits=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def markdown_table(records: list[dict], kind: str = "main") -> str:
    """One row per decoder and batch size; quality and speed side by side."""
    rows = [r for r in records if r["kind"] == kind]
    if not rows:
        return ""
    metric = rows[0]["metric"].upper()
    head = (
        f"| decoder | batch | {metric} | vs full | speedup | tokens/s | exit rate | layers/token "
        "| bound | same as full | loops |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['decoder']} | {r['batch_size']} | {_fmt(r['score'])} | "
            f"{_fmt(100 * r['score_ratio_vs_full'], 1)}% | {_fmt(r['speedup_vs_full'])}x | "
            f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(r['exit_rate'])} | {_fmt(r['layers_per_token'])} | "
            f"{_fmt(r['bound'])} | {_fmt(100 * r['same_outputs_as_full'], 0)}% | "
            f"{_fmt(100 * r['loop_rate'], 1)}% |"
        )
    return "\n".join(lines)


def pareto_plot(records: list[dict], path: str | Path, title: str = "") -> str:
    """Quality (ratio to full) against measured speedup, FREE and CALM threshold sweeps as curves."""
    batch = records[0]["batch_size"] if records else None
    rows = [r for r in records if r["batch_size"] == batch]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method, color, label in (("free", "tab:blue", "FREE"), ("calm", "tab:orange", "CALM")):
        pts = sorted(
            (r["speedup_vs_full"], 100 * r["score_ratio_vs_full"], r["threshold"])
            for r in rows
            if r["method"] == method and r["kind"] == "sweep"
        )
        if pts:
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{label} sweep"
            )
            for x, y, thr in pts:
                ax.annotate(
                    f"{thr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    markers = {
        "greedy": ("k", "s"),
        "static": ("tab:gray", "v"),
        "free_lossless": ("tab:green", "D"),
    }
    for r in rows:
        if r["kind"] != "main":
            continue
        color, marker = markers.get(r["method"], ("tab:red", "*"))
        ax.scatter(r["speedup_vs_full"], 100 * r["score_ratio_vs_full"], color=color, marker=marker,
                   s=60, zorder=3, label=r["decoder"])  # fmt: skip
    ax.axhline(99, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup over full greedy (wall clock, same run)")
    ax.set_ylabel(f"{rows[0]['metric'].upper() if rows else 'score'} relative to full model (%)")
    ax.set_title(title or f"quality vs speed, batch {batch}, {rows[0]['device'] if rows else ''}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_report(records: list[dict], out_dir: str | Path, header: str = "") -> dict[str, str]:
    """Writes results.json, results.md and pareto.png under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / "results.json"), "md": str(out_dir / "results.md")}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(records, indent=2, default=float))
    tmp.replace(paths["json"])  # never leave a half-written results file
    md = [header, "", markdown_table(records, "main")]
    sweep = markdown_table(records, "sweep")
    if sweep:
        md += ["", "Threshold sweep:", "", sweep]
    Path(paths["md"]).write_text("\n".join(md).strip() + "\n")
    if records:
        paths["pareto"] = pareto_plot(records, out_dir / "pareto.png")
    return paths
