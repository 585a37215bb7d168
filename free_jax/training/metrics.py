"""Where training numbers go: MODEL_DIR/metrics.jsonl, TensorBoard, and a tqdm progress bar.

metrics.jsonl holds one object per record, e.g.

    {"step": 100, "split": "train", "loss": 3.21, "ce_deep": 3.0, "tokens_per_s": 5123.4}
    {"step": 100, "split": "validation", "bleu": 12.3, "ce_layer2": 3.9, ...}

A resumed run first drops the records after the checkpoint it restarts from (`truncate_after`), so
the file always reads as one uninterrupted trajectory.

TensorBoard files are written with `tensorboardX` when it is installed (no TensorFlow needed);
without it only the JSONL file is written.
"""

from __future__ import annotations

import json
import math
import time

from etils import epath


def _plain(value):
    """JSON-safe Python scalar (NaN/inf become strings JSON accepts back via float())."""
    value = float(value) if not isinstance(value, (str, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl and scalars to TensorBoard under MODEL_DIR."""

    def __init__(self, model_dir, tensorboard: bool = True):
        self.path = epath.Path(model_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(epath.Path(model_dir) / "tb"))

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def truncate_after(self, step: int) -> None:
        """Drops records with step > `step` (a restart replays those steps; 0 when it starts over).

        The kept records go to a temporary file that then replaces metrics.jsonl, so a crash here
        leaves either the old file or the new one, never half of it. A torn last line (a kill
        mid-write) is dropped too.
        """
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        steps = [_step_of(line) for line in lines]
        kept = [line for line, s in zip(lines, steps) if s is not None and s <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in sorted(values.items())})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) or hasattr(value, "dtype"):
                    self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a whole JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


def read_metrics(model_dir, split: str | None = "train") -> list[dict]:
    """The records of metrics.jsonl (of one split, or all with split=None), in file order."""
    path = epath.Path(model_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


class Progress:
    """A tqdm bar over training steps showing loss and tokens/s; tqdm itself gives the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")
        self._last_time = time.perf_counter()
        self._tokens = 0

    def update(self, steps: int, tokens: int, loss: float) -> float:
        """Advances the bar; returns tokens/s since the previous call."""
        now = time.perf_counter()
        rate = tokens / max(now - self._last_time, 1e-9)
        self._last_time = now
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self._bar.update(steps)
        return rate

    def write(self, message: str) -> None:
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
