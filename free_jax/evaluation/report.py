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


# Fixed-setting decoders: (colour, marker). FREE's fixed settings get one marker and distinct
# colours in order of appearance, so its several stars stay tellable apart.
_MARKERS = {"greedy": ("k", "s"), "static": ("tab:gray", "v"), "free_lossless": ("tab:green", "D"),
            "calm": ("tab:orange", "P")}  # fmt: skip
_FREE_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _pareto_panel(ax, rows: list[dict], batch: int, free_colour: dict[str, str]) -> None:
    for method, color, label in (("free", "tab:blue", "FREE"), ("calm", "tab:orange", "CALM")):
        pts = sorted(
            (r["speedup_vs_full"], 100 * r["score_ratio_vs_full"], r["threshold"])
            for r in rows
            if r["method"] == method and r["kind"] == "sweep"
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, alpha=0.6, ms=4,
                    label=f"{label} threshold sweep")  # fmt: skip
            for x, y, thr in pts:
                ax.annotate(f"{thr:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=color)  # fmt: skip
    for r in rows:
        if r["kind"] != "main":
            continue
        if r["method"] == "free":
            color = free_colour.setdefault(
                r["decoder"], _FREE_COLOURS[len(free_colour) % len(_FREE_COLOURS)]
            )
            marker = "*"
        else:
            color, marker = _MARKERS.get(r["method"], ("tab:red", "*"))
        ax.scatter(r["speedup_vs_full"], 100 * r["score_ratio_vs_full"], color=color, marker=marker,
                   s=90 if marker == "*" else 50, zorder=3, label=r["decoder"],
                   edgecolors="white", linewidths=0.5)  # fmt: skip
    ax.axhline(99, color="gray", lw=0.8, ls="--", label="99% of full")
    ax.axvline(1, color="gray", lw=0.5)
    ax.set_title(f"batch {batch}", fontsize=10)
    ax.set_xlabel("speedup over full greedy (wall clock, same run)")
    ax.grid(alpha=0.3)


def pareto_plot(records: list[dict], path: str | Path, title: str = "") -> str:
    """Quality (ratio to full) against measured speedup: one panel per batch size, FREE and CALM
    threshold sweeps as curves, every fixed-setting decoder as a point, one legend below."""
    batches = sorted({r["batch_size"] for r in records})
    fig, axes = plt.subplots(1, max(len(batches), 1), figsize=(5.2 * max(len(batches), 1), 4.8),
                             sharey=True, squeeze=False)  # fmt: skip
    free_colour: dict[str, str] = {}
    for ax, batch in zip(axes[0], batches, strict=False):
        _pareto_panel(ax, [r for r in records if r["batch_size"] == batch], batch, free_colour)
    metric = records[0]["metric"].upper() if records else "score"
    axes[0][0].set_ylabel(f"{metric} relative to full model (%)")
    device = records[0]["device"] if records else ""
    fig.suptitle(title or f"quality vs speed ({device})", fontsize=11)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=4, fontsize=7,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def spec_lines(records: list[dict]) -> list[str]:
    """One markdown bullet per decoder naming the spec it ran, e.g.
    "- free (thr=0.8): `FreeSpec(shallow=None, window=8, ...)`" (sweeps share their row's spec)."""
    out, seen = [], set()
    for r in records:
        spec = r.get("spec")
        if spec is None or r["kind"] != "main" or r["decoder"] in seen:
            continue
        seen.add(r["decoder"])
        fields = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "type")
        out.append(f"- {r['decoder']}: `{spec['type']}({fields})`")
    return out


def guarantee_lines(records: list[dict]) -> list[str]:
    """One bullet per row with a Learn-then-Test threshold: its epsilon, delta and the risk
    measured on this split."""
    out = []
    for r in records:
        g = r.get("guarantee")
        if g:
            verdict = "within" if g["measured_risk"] <= g["epsilon"] else "ABOVE"
            out.append(
                f"- {r['decoder']} (batch {r['batch_size']}): epsilon {g['epsilon']:g}, delta "
                f"{g['delta']:g}; measured risk {g['measured_risk']:.4f} over {g['num_tokens']} "
                f"tokens ({verdict} epsilon)"
            )
    return out


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
    guaranteed = guarantee_lines(records)
    if guaranteed:
        md += ["", "Learn-then-Test rows (risk: share of tokens that left early and differ from the "
               "full model's prediction there):", "", *guaranteed]  # fmt: skip
    specs = spec_lines(records)
    if specs:
        md += ["", "Decoder specs (`free_jax.decoding.specs`):", "", *specs]
    Path(paths["md"]).write_text("\n".join(md).strip() + "\n")
    if records:
        paths["pareto"] = pareto_plot(records, out_dir / "pareto.png")
    return paths
