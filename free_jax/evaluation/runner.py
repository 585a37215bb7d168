"""Every decoder on the same inputs, in one run: outputs, quality, wall-clock speed, exit statistics.

Decoders are jitted once per shape; each one is warmed up on the first batch (its compile time is
reported apart) and then timed over all batches with `block_until_ready`. Tokenisation happens
before any timing. Speedups are ratios to the full model's wall time measured in the same run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from free_jax.calibration import OnlineThreshold
from free_jax.data import default_bos_id, eval_batches, lm_eval_batches, load_source
from free_jax.decoding import make_decoder
from free_jax.decoding.api import check_threshold
from free_jax.decoding.specs import DEFAULT_THRESHOLD, NEEDS_THRESHOLD, FreeSpec, Spec, method_name
from free_jax.evaluation import metrics
from free_jax.models import T5Config
from free_jax.models.field_types import check_field_types


@dataclasses.dataclass(frozen=True)
class DecoderChoice:
    """One row of the results table: a decoding spec and the threshold it runs at.

    Attributes:
      name: the row label, e.g. "free (adaptive)".
      spec: the method's spec (`free_jax.decoding.specs`): every option of the decoder.
      threshold: the exit threshold (CALM and FREE; None for the others and when adaptive); a
        tuple, one per exit, for specs with many `exits`.
      adaptive: FREE with the online Beta-mixture threshold, refitted between batches (needs a
        `FreeSpec` that keeps its agreement records).
      guarantee: (epsilon, delta) of a Learn-then-Test threshold: the suite then measures the risk
        it bounds on this row's outputs.
    """

    name: str
    spec: Spec
    threshold: float | tuple[float, ...] | None = None
    adaptive: bool = False
    guarantee: tuple[float, float] | None = None

    def __post_init__(self):
        if self.adaptive and not (isinstance(self.spec, FreeSpec) and self.spec.records):
            raise ValueError(
                f"{self.name}: the adaptive threshold refits on FREE's agreement records; it needs "
                f"a FreeSpec with records=True, got {self.spec!r}"
            )
        if isinstance(self.spec, NEEDS_THRESHOLD) and self.threshold is None and not self.adaptive:
            raise ValueError(f"{self.name}: {type(self.spec).__name__} needs a threshold")

    @property
    def method(self) -> str:
        """The spec's method name ("greedy", "static", "calm", "free", "free_lossless", ...)."""
        return method_name(self.spec)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How decoders are run and timed (what each decoder does is its spec's business).

    Attributes:
      max_decode_len: N, output tokens per example.
      adaptive_estimator: "svi", "nuts" or "moments" for the online threshold.
      adaptive_initial_threshold: used until the first successful fit.
      adaptive_max_examples: refits stop (the threshold freezes) after this many examples
        (the paper: 300).
      zeta: the posterior agreement level the threshold is read at.
    """

    max_decode_len: int = 64
    adaptive_estimator: str = "svi"
    adaptive_initial_threshold: float = DEFAULT_THRESHOLD
    adaptive_max_examples: int = 300
    zeta: float = 0.4

    def __post_init__(self):
        check_field_types(self)
        check_threshold(self.adaptive_initial_threshold, "EvalSettings.adaptive_initial_threshold")


@dataclasses.dataclass
class EvalBatch:
    """Tokenised inputs of one batch (fixed shapes) and the texts needed for scoring.

    Attributes:
      encoder_tokens_BS: [B, S] int32 T5 encoder tokens, or a decoder-only model's right-padded
        prompts ([BOS] + task prefix + input).
      num_real: rows that are real examples (the rest is padding).
      references: per real example, its reference text(s).
      prompt_lengths_B: [B] int32 prompt lengths (decoder-only; None for T5).
    """

    encoder_tokens_BS: np.ndarray
    num_real: int
    references: list
    prompt_lengths_B: np.ndarray | None = None

    @property
    def decode_kwargs(self) -> dict:
        """What a decoder call needs besides the tokens (the prompt lengths, if any)."""
        if self.prompt_lengths_B is None:
            return {}
        return {"prompt_lengths": self.prompt_lengths_B}


@dataclasses.dataclass
class DecoderRun:
    """What one decoder produced and cost over the whole evaluation set."""

    choice: DecoderChoice
    batch_size: int
    tokens: list[np.ndarray]  # per example, up to EOS (included)
    exit_layers: list[np.ndarray]
    wall_s: float
    compile_s: float
    num_tokens: int
    num_examples: int
    layers_computed: int
    deep_passes: int
    batch_layers_computed: int
    num_steps: int
    thresholds_used: list
    records_confidence: np.ndarray
    records_agree: np.ndarray
    online: OnlineThreshold | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.wall_s, 1e-9)

    @property
    def examples_per_s(self) -> float:
        return self.num_examples / max(self.wall_s, 1e-9)

    def exit_rate(self, num_layers: int) -> float:
        flat = np.concatenate(self.exit_layers) if self.exit_layers else np.zeros(0)
        return float((flat < num_layers).mean()) if flat.size else 0.0

    @property
    def layers_per_token(self) -> float:
        return self.layers_computed / max(self.num_tokens, 1)

    @property
    def deep_passes_per_token(self) -> float:
        return self.deep_passes / max(self.num_tokens, 1)


def make_batches(raw_batches: Iterable[dict], limit: int | None = None) -> list[EvalBatch]:
    """Materialises `free_jax.data.eval_batches` output (optionally only the first `limit` examples)."""
    out, seen = [], 0
    for raw in raw_batches:
        num_real = int(raw["num_real"])
        if limit is not None:
            num_real = min(num_real, limit - seen)
        if num_real <= 0:
            break
        refs = list(raw["references"][:num_real])
        if "prompt_tokens" in raw:  # decoder-only: prompts and their lengths
            enc = np.asarray(raw["prompt_tokens"], np.int32).copy()
            lengths = np.asarray(raw["prompt_lengths"], np.int32).copy()
            enc[num_real:] = 0
            lengths[num_real:] = 1  # padding rows: a one-token prompt (discarded)
            out.append(EvalBatch(enc, num_real, refs, lengths))
        else:
            enc = np.asarray(raw["encoder_input_tokens"], np.int32).copy()
            enc[num_real:] = 0
            out.append(EvalBatch(enc, num_real, refs))
        seen += num_real
    return out


def split_batches(
    task,
    tokenizer,
    split: str,
    *,
    data_dir: str | None,
    batch_size: int,
    max_input_length: int,
    max_target_length: int,
    limit: int | None,
    config=None,
) -> list[EvalBatch]:
    """The first `limit` examples of a task's split (all when None), tokenized, in fixed batches.

    Every example goes to this process (evaluation and calibration score whole splits). With a
    decoder-only `config` the inputs become prompts ([BOS] when the model uses one, then the task
    prefix and the input, at most `max_input_length` tokens) that the model continues.
    """
    source = load_source(task, split, data_dir=data_dir)
    common = dict(
        batch_size=batch_size, max_target_length=max_target_length, shard_index=0, shard_count=1
    )
    if config is not None and not isinstance(config, T5Config):
        bos = default_bos_id(getattr(config, "bos_token_id", None), config.eos_token_id)
        raw = lm_eval_batches(
            source, task, tokenizer, max_prompt_length=max_input_length, bos_id=bos, **common
        )
    else:
        raw = eval_batches(source, task, tokenizer, max_input_length=max_input_length, **common)
    return make_batches(raw, limit=limit)


def rebatch(batches: Sequence[EvalBatch], batch_size: int) -> list[EvalBatch]:
    """The same examples in batches of another size (the last one padded with zero rows)."""
    rows = [b.encoder_tokens_BS[i] for b in batches for i in range(b.num_real)]
    refs = [r for b in batches for r in b.references]
    prompts = batches[0].prompt_lengths_B is not None if batches else False
    lengths = [b.prompt_lengths_B[i] for b in batches for i in range(b.num_real)] if prompts else []
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = np.zeros((batch_size, rows[0].shape[0]), np.int32)
        enc[: len(chunk)] = np.stack(chunk)
        batch_lengths = None
        if prompts:
            batch_lengths = np.ones((batch_size,), np.int32)
            batch_lengths[: len(chunk)] = lengths[start : start + batch_size]
        out.append(EvalBatch(enc, len(chunk), refs[start : start + batch_size], batch_lengths))
    return out


def run_decoder(
    choice: DecoderChoice,
    config: T5Config,
    params,
    batches: Sequence[EvalBatch],
    settings: EvalSettings,
    *,
    confidence_params=None,
    progress: bool = True,
) -> DecoderRun:
    """Decodes every batch with one decoder; times it after a warm-up call on the first batch.

    `confidence_params` (a `ConfidenceHead`'s) reach the decoder when its spec's measure is
    "learned".
    """
    decoder = make_decoder(config, choice.spec, max_decode_len=settings.max_decode_len)
    extra = {}
    if getattr(choice.spec, "measure", None) == "learned":
        if confidence_params is None:
            raise ValueError(
                f"{choice.name}: measure 'learned' needs a ConfidenceHead's parameters "
                "(evaluate.confidence_head / calibrate.confidence_head in gin)"
            )
        extra["confidence_params"] = confidence_params
    online = None
    if choice.adaptive:
        online = OnlineThreshold(
            estimator=settings.adaptive_estimator,
            initial_threshold=settings.adaptive_initial_threshold,
            max_examples=settings.adaptive_max_examples,
            zeta=settings.zeta,
        )

    def threshold_now() -> float | None:
        return online.threshold if online is not None else choice.threshold

    start = time.perf_counter()
    first = batches[0]
    jax.block_until_ready(
        decoder(params, first.encoder_tokens_BS, threshold_now(), **first.decode_kwargs, **extra)
    )
    compile_s = time.perf_counter() - start

    run = DecoderRun(
        choice=choice, batch_size=int(batches[0].encoder_tokens_BS.shape[0]), tokens=[],
        exit_layers=[], wall_s=0.0, compile_s=compile_s, num_tokens=0, num_examples=0,
        layers_computed=0, deep_passes=0, batch_layers_computed=0, num_steps=0,
        thresholds_used=[], records_confidence=np.zeros(0), records_agree=np.zeros(0, bool),
        online=online,
    )  # fmt: skip
    conf_parts, agree_parts = [], []
    bar = tqdm(batches, desc=f"{choice.name} (batch {run.batch_size})", disable=not progress)
    for batch in bar:
        threshold = threshold_now()
        enc = jnp.asarray(batch.encoder_tokens_BS)
        t0 = time.perf_counter()
        result = jax.block_until_ready(
            decoder(params, enc, threshold, **batch.decode_kwargs, **extra)
        )
        run.wall_s += time.perf_counter() - t0
        n = batch.num_real
        lengths = np.asarray(result.lengths)[:n]
        tokens = np.asarray(result.tokens)[:n]
        exits = np.asarray(result.exit_layer)[:n]
        for i in range(n):
            run.tokens.append(tokens[i, : lengths[i]])
            run.exit_layers.append(exits[i, : lengths[i]])
        run.num_tokens += int(lengths.sum())
        run.num_examples += n
        run.layers_computed += int(np.asarray(result.layers_computed)[:n].sum())
        run.deep_passes += int(np.asarray(result.num_deep_passes)[:n].sum())
        run.batch_layers_computed += int(result.batch_layers_computed)
        run.num_steps += int(result.num_steps)
        run.thresholds_used.append(
            float("nan") if threshold is None else np.asarray(threshold, float).tolist()
        )
        valid = np.asarray(result.records.valid)[:n]
        conf = np.asarray(result.records.confidence)[:n][valid]
        agree = np.asarray(result.records.agree)[:n][valid]
        conf_parts.append(conf)
        agree_parts.append(agree)
        if online is not None and not online.frozen:
            # Host-side refit between jitted calls: the next threshold is a traced argument.
            online.update(conf, agree, num_examples=n)
    run.records_confidence = np.concatenate(conf_parts) if conf_parts else np.zeros(0)
    run.records_agree = np.concatenate(agree_parts) if agree_parts else np.zeros(0, bool)
    return run


def score_run(
    run: DecoderRun,
    batches: Sequence[EvalBatch],
    detokenize: Callable[[np.ndarray], str],
    metric: str,
) -> tuple[dict[str, float], list[str]]:
    """Task metric of a run's outputs against the references, plus the decoded texts."""
    predictions = [detokenize(t) for t in run.tokens]
    references = [r for b in batches for r in b.references]
    if metric != "squad":
        references = [r[0] if isinstance(r, list | tuple) else r for r in references]
    scores = metrics.score(metric, predictions, references)
    scores["loop_rate"] = metrics.loop_rate(predictions)
    return scores, predictions
