"""Decoding speed of every decoder on one model and one input set, at several batch sizes.

    python -m free_jax.benchmarks.decode [--preset t5-small] [--shallow S] [--max_decode_len 64]
        [--batch_sizes 1 8] [--force_exit_rate 0.7] [--repeats 3] [--json PATH]
        [--cpu_decode_flags]
    python -m free_jax.benchmarks.decode --preset t5-large --shallow 6 --dtype bfloat16   # a GPU
    python -m free_jax.benchmarks.decode --preset demo-small --set d_model=192 d_ff=768
    python -m free_jax.benchmarks.decode --preset pythia-70m      # decoder-only (also gpt2,
        smollm-135m, llama-3.2-1b, ...: any `models.lm_config.LM_PRESETS` name)

Model: random weights of the preset's shape (no checkpoint is read), with EOS's output row zeroed
so that no decoder stops early (a random model would end its sequences at arbitrary points, and
tokens per second would then compare different amounts of work); every decoder produces
`max_decode_len` tokens per example. Inputs: random source tokens, `--source_len` long (for a
decoder-only preset: unpadded prompts of that length, prefilled before decoding).

Forcing exits. Random weights are not confident in any useful way, so `--force_exit_rate p` picks
each early-exit decoder's threshold, for each batch size, by bisection on its measured exit rate
(threshold values are traced, so the search never recompiles): the threshold is set where about a
fraction p of the tokens leaves early on that batch. The table reports the exit rate actually
measured in the timed runs. Without the option the thresholds are `--threshold`.

Columns: tokens/s (produced tokens over the median wall time of `--repeats` rounds after a warm-up
call; each round times every decoder once, so load on a shared machine shifts all of them alike;
the warm-up's extra time is reported apart as compile time), speedup over full greedy at the
same batch size, exit rate p (tokens leaving before the last layer), and the decoder-compute bound:
L / (S + (1 - p)(L - S)) for FREE (S = its shallow layer), L / k for static exit, L / (mean exit
layer) for CALM, 1 for the full model; `bound_ratio` = speedup / bound. The bound counts decoder
layers only; `bound+heads` counts the exit heads too, each worth head/layer layers as timed in the
"step pieces" lines (FREE: one per token and one per deep pass; static: one; CALM: one per tested
layer; the full model: one per token), which is what limits early exiting when the vocabulary is
large and the layers are small. `pieces` is FREE's speedup if its loop cost nothing beyond
those pieces, each deep pass charged what a pass of its width costs here (`pieces_bound`; the
decoder counts its passes at each width), and `of pieces` the measured speedup over it: the loop's
own efficiency. Where torch and transformers are installed, Hugging Face's PyTorch
greedy `generate` runs on the same weights (`hf_greedy`, at its faster of the default and a single
intra-op thread).

Decoders (`--decoders`) are named specs (`decoder_specs`, one dict): "greedy", "static"
(`StaticSpec(k)`, k = `--static_layer` or S), "calm" (`CalmSpec()`: its minimum exit is the spec's
default, layer 1, as in the evaluation suite; the README's table was measured with S), "free"
(`FreeSpec(window=--window)`), "free_norecords" (the same without agreement records),
"free_lossless", "free_deferred" (FREE with deferred deep passes, `decoding/deferral.py`: its policy
is planned per batch size from this batch's measured step pieces and the measured exit rate;
rows report passes, examples served per pass and waits), "sample" (`SampleSpec(top_k=50)`) and
"beam" (`BeamSpec(beam_size=4)`); with many exits at `--exits` (default three spread evenly,
where exit heads go; on random weights every exit reads the shared head, which times the same computation trained heads cost): "free_exits"
(multi-exit FREE), "free_exits_lossless" and "calm_exits" (CALM testing only those layers). Their
bound is L over the mean exit layer (a token waits for the layer it leaves at), like CALM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.benchmarks.decode_bounds import (
    bound_with_heads,
    component_times,
    layer_bound,
    pieces_bound,
    step_costs,
    timed_runs,
)
from free_jax.benchmarks.flags import add_set_flag
from free_jax.decoding import cpu_flags, make_decoder, pass_widths
from free_jax.decoding.deferral import plan_deferral
from free_jax.decoding.specs import (
    DEFAULT_THRESHOLD,
    NEEDS_THRESHOLD,
    BeamSpec,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    SampleSpec,
    Spec,
    StaticSpec,
)
from free_jax.evaluation.suite import spec_fields
from free_jax.generate import threshold_flag
from free_jax.models import T5Config, param_shapes, preset
from free_jax.models.exit_heads import default_exit_head_layers
from free_jax.models.lm_config import LM_PRESETS, lm_preset


def decoder_specs(
    *, window: int = 8, static_k: int = 1, exits: tuple[int, ...] = (1, 2)
) -> dict[str, Spec]:
    """The benchmark's decoders by name: every option of each is its spec's (`exits`: the layers
    of the many-exit decoders)."""
    free = FreeSpec(window=window)
    many = dataclasses.replace(free, exits=tuple(exits))
    return {
        "greedy": GreedySpec(),
        "static": StaticSpec(exit_layer=static_k),
        "calm": CalmSpec(),
        "free": free,
        "free_norecords": dataclasses.replace(free, records=False),
        "free_lossless": dataclasses.replace(free, lossless=True),
        "free_deferred": free,  # its policy (min_waiting, max_wait) is planned per batch size
        "sample": SampleSpec(top_k=50),
        "beam": BeamSpec(beam_size=4),
        "free_exits": many,
        "free_exits_lossless": dataclasses.replace(many, lossless=True),
        "calm_exits": CalmSpec(exits=tuple(exits)),
    }


DECODERS = tuple(decoder_specs())
MANY_EXITS = ("free_exits", "free_exits_lossless", "calm_exits")
DEFAULT_DECODERS = DECODERS[:7]
EARLY_EXIT = tuple(n for n, spec in decoder_specs().items() if isinstance(spec, NEEDS_THRESHOLD))


# ===================================================================== model and inputs


def random_params(config, seed: int = 0, embedding_std: float = 0.3):
    """Random weights of the config's shapes (numpy draws: no compile), EOS never predicted.

    Norm scales are 1, biases 0, kernels N(0, 1/fan_in), position biases N(0, 1), token (and
    learned position) embeddings
    N(0, embedding_std^2). With T5's usual std 1 a random tied model only copies its input token
    (every exit predicts it with the same confidence, so no threshold sets an exit rate); at 0.3
    confidences vary from token to token. EOS's row of the output projection is zeroed: its logit
    is then 0, below the largest logit of a random model.
    """
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(shape.shape, np.float32)
        if "bias" in name:  # decoder-only norms and projections (T5 has none)
            return np.zeros(shape.shape, np.float32)
        if "token_embedder" in name or "position_embedder" in name:
            std = embedding_std
        else:
            std = shape.shape[0] ** -0.5 if "kernel" in name else 1.0
        return rng.normal(0.0, std, size=shape.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config))
    if config.tie_word_embeddings:
        params["token_embedder"]["embedding"][config.eos_token_id] = 0.0
    else:
        params["decoder"]["logits_dense"]["kernel"][:, config.eos_token_id] = 0.0
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, config.weights_dtype), params
    )  # fmt: skip


def model_config(name: str, **overrides):
    """A T5 preset (`models.preset`) or a decoder-only one (`models.lm_config.lm_preset`)."""
    if name in LM_PRESETS:
        return lm_preset(name, **overrides)
    return preset(name, **overrides)


def random_inputs(config, batch: int, source_len: int, seed: int = 0) -> np.ndarray:
    """Random source tokens (T5) or full-width prompts (decoder-only), ids in [2, V)."""
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(2, config.vocab_size, size=(batch, source_len)).astype(np.int32)


# ============================================================================== timing


def plan_for_batch(free_decoder, params, enc, threshold, parts: dict, args) -> dict:
    """FREE deferred's policy at this batch: step costs from this batch's measured pieces
    (`step_costs`), the exit rate measured at `threshold`, `plan_deferral`."""
    config = free_decoder.spec.config
    costs = step_costs(parts, config.shallow_layer)
    p = free_decoder(params, enc, threshold).exit_rate(config.num_decoder_layers)
    policy, table = plan_deferral(
        costs, batch=enc.shape[0], exit_rate=p, window=args.window, length=args.max_decode_len
    )
    return {
        "min_waiting": policy.min_waiting, "max_wait": policy.max_wait, "exit_rate": p,
        "step_costs_ms": {"shallow": costs.shallow, "deep": costs.deep},
        "simulated_gain": table[(1, 0)] / table[(policy.min_waiting, policy.max_wait)],
    }  # fmt: skip


def schedule_stats(result) -> dict:
    """A FREE run's schedule: batch deep passes, examples served per pass, waits."""
    passes = int(np.asarray(result.pass_width_counts).sum())
    served = int(np.asarray(result.num_served).sum())
    return {
        "batch_passes": passes,
        "served_per_pass": served / max(passes, 1),
        "mean_wait": int(np.asarray(result.wait_steps).sum()) / max(served, 1),
        "max_wait": int(np.asarray(result.max_wait).max(initial=0)),
    }


def calibrate(decoder, params, enc, target: float, num_layers: int, iterations: int = 6):
    """A threshold whose measured exit rate on `enc` is close to `target` (bisection).

    The bracket spans the confidences of a run where nothing exits and one where everything exits
    at the first chance (CALM reports the exit layer's confidence, so both are needed).
    """
    conf = []
    for threshold in (2.0, -1.0):  # margins lie in [0, 1]
        probe = decoder(params, enc, threshold)
        conf.append(np.asarray(probe.confidence)[np.asarray(probe.exit_layer) > 0])
    conf = np.concatenate(conf)
    lo, hi = float(conf.min()) - 1e-9, float(conf.max())
    best, best_gap = hi, np.inf
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        rate = decoder(params, enc, mid).exit_rate(num_layers)
        if abs(rate - target) < best_gap:
            best, best_gap = mid, abs(rate - target)
        if rate > target:
            lo = mid
        else:
            hi = mid
    return best


def hf_greedy_runner(config, params, enc: np.ndarray, max_decode_len: int):
    """A no-argument function running HF greedy `generate` on the same weights -> tokens [B, N]
    (numpy), or None without torch/transformers. The thread count is chosen here: PyTorch's
    intra-op threads fight for cores on a busy machine, so the default count and a single thread
    are both tried and the faster kept (the peer gets its best configuration)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from free_jax.checkpoints.hf import save_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    seq2seq = isinstance(config, T5Config)
    auto = transformers.T5ForConditionalGeneration if seq2seq else transformers.AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as directory:
        save_hf(directory, config.replace(dtype="float32"), params)
        model = auto.from_pretrained(directory, dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor(enc, device=device)
    # T5: drop the decoder start token; decoder-only: drop the (full-width, unpadded) prompts
    first_new = 1 if seq2seq else enc.shape[1]
    mask = ids != 0 if seq2seq else torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_decode_len,
                do_sample=False, num_beams=1, use_cache=True, pad_token_id=config.eos_token_id,
            )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, first_new:].cpu().numpy()

    timings = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        run()  # warm-up
        timings[threads] = timed_runs(run, 1)[1]
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    run.threads = threads
    return run


# ================================================================================= run


def run(args) -> tuple[list[dict], dict]:
    overrides = dict(dropout_rate=0.0, dtype=args.dtype, **dict(args.set))
    if args.shallow is not None:
        overrides["shallow_exit_layer"] = args.shallow
    config = model_config(args.preset, **overrides)
    num_layers, shallow = config.num_decoder_layers, config.shallow_layer
    static_k = args.static_layer or shallow
    params = random_params(config, args.seed, args.embedding_std)
    enc_all = random_inputs(config, max(args.batch_sizes), args.source_len, args.seed)
    exits = tuple(args.exits) if args.exits else default_exit_head_layers(num_layers, 3)
    specs = decoder_specs(window=args.window, static_k=static_k, exits=exits)
    decoder_for = lambda name: make_decoder(
        config, specs[name], max_decode_len=args.max_decode_len
    )  # fmt: skip

    records, components = [], {}
    for batch in args.batch_sizes:
        enc = enc_all[:batch]
        thresholds = {name: args.threshold for name in EARLY_EXIT}
        if args.force_exit_rate is not None:
            free_like = {"free", "free_norecords", "free_deferred"}
            for name in ("calm", "free", "free_lossless", *MANY_EXITS):
                if name in args.decoders or (name == "free" and free_like & set(args.decoders)):
                    thresholds[name] = calibrate(
                        decoder_for(name), params, enc, args.force_exit_rate, num_layers
                    )
        # the same exit decisions as FREE's
        thresholds["free_norecords"] = thresholds["free_deferred"] = thresholds["free"]
        parts = components[batch] = component_times(config, params, enc, args.window)
        deferral = None
        if "free_deferred" in args.decoders:
            deferral = plan_for_batch(
                decoder_for("free"), params, enc, thresholds["free"], parts, args
            )
            specs["free_deferred"] = dataclasses.replace(
                specs["free"], min_waiting=deferral["min_waiting"], max_wait=deferral["max_wait"]
            )
        runners = {}
        for name in args.decoders:
            decoder, thr = decoder_for(name), thresholds.get(name)
            extra = {"rng": jax.random.key(0)} if isinstance(specs[name], SampleSpec) else {}
            runners[name] = lambda d=decoder, t=thr, x=extra, e=enc: d(params, e, t, **x)
        hf_run = hf_greedy_runner(config, params, enc, args.max_decode_len) if args.hf else None
        if hf_run is not None:
            runners["hf_greedy"] = hf_run
        # Warm-up (compiles), then rounds that time every decoder once each: load on a shared
        # machine then shifts all decoders alike and the medians stay comparable.
        first, results, times = {}, {}, {name: [] for name in runners}
        for name, fn in runners.items():
            t0 = time.perf_counter()
            results[name] = jax.block_until_ready(fn())
            first[name] = time.perf_counter() - t0
        for _ in range(args.repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        base_tps = int(np.asarray(results["greedy"].lengths).sum()) / median["greedy"]
        h = parts["head"] / parts["layer"]  # an exit head, in layers
        for name in runners:
            if name == "hf_greedy":
                hf_tokens = results[name]
                tps = hf_tokens.size / median[name]
                greedy_tokens = np.asarray(results["greedy"].tokens)
                records.append(
                    dict(
                        decoder=name,
                        batch_size=batch,
                        tokens_per_s=tps,
                        speedup_vs_full=tps / base_tps,
                        exit_rate=0.0,
                        bound=1.0,
                        bound_ratio=tps / base_tps,
                        median_s=median[name],
                        compile_s=max(first[name] - median[name], 0.0),
                        threshold=None,
                        tokens=int(hf_tokens.size),
                        torch_threads=hf_run.threads,
                        same_tokens_as_greedy=float(np.mean(hf_tokens == greedy_tokens)),
                    )  # fmt: skip
                )
                continue
            result = results[name]
            tokens = int(np.asarray(result.lengths).sum())
            tps = tokens / median[name]
            p = result.exit_rate(num_layers)
            spec = specs[name]
            bound = layer_bound(spec, result, num_layers, shallow)
            record = dict(
                decoder=name, batch_size=batch, tokens_per_s=tps,
                speedup_vs_full=tps / base_tps, exit_rate=p, bound=bound,
                bound_ratio=tps / base_tps / bound, median_s=median[name],
                compile_s=max(first[name] - median[name], 0.0), threshold=thresholds.get(name),
                tokens=tokens,
                layers_per_token=float(np.asarray(result.layers_computed).sum()) / tokens,
                deep_passes=int(np.asarray(result.num_deep_passes).sum()), spec=spec_fields(spec),
            )  # fmt: skip
            record["bound_with_heads"] = bound_with_heads(spec, result, num_layers, shallow, h)
            record["pieces_bound"] = pieces_bound(spec, result, parts, num_layers, shallow)
            if isinstance(spec, FreeSpec):
                widths = pass_widths(args.window)
                record["pass_width_counts"] = dict(
                    zip(widths, np.asarray(result.pass_width_counts).tolist(), strict=True)
                )
                record.update(schedule_stats(result))
                if name == "free_deferred":
                    record["deferral"] = deferral
            records.append(record)
    return records, components


def format_table(records: list[dict], components: dict) -> str:
    head = (
        f"{'decoder':<15}{'batch':>6}{'tok/s':>9}{'speedup':>9}{'exit p':>8}{'bound':>7}"
        f"{'ratio':>7}{'bound+heads':>12}{'pieces':>8}{'of pieces':>10}{'compile s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        with_heads = r.get("bound_with_heads")
        lines.append(
            f"{r['decoder']:<15}{r['batch_size']:>6}{r['tokens_per_s']:>9.1f}"
            f"{r['speedup_vs_full']:>9.2f}{r['exit_rate']:>8.2f}{r['bound']:>7.2f}"
            f"{r['bound_ratio']:>7.2f}"
            + (f"{with_heads:>12.2f}" if with_heads else f"{'':>12}")
            + (
                f"{pieces:>8.2f}{r['speedup_vs_full'] / pieces:>10.2f}"
                if (pieces := r.get("pieces_bound"))
                else f"{'':>18}"
            )
            + f"{r['compile_s']:>10.1f}"
        )
    lines.append("")
    for batch, parts in components.items():
        deep = ", ".join(f"C={c}: {t:.2f}" for c, t in parts["deep"].items())
        heads = ", ".join(f"C={c}: {t:.2f}" for c, t in parts["head_rows"].items())
        lines.append(
            f"batch {batch} step pieces (ms): one layer {parts['layer']:.2f}, exit head "
            f"{parts['head']:.2f}, deep layers [S, L) {deep}; exit head on C rows {heads}"
        )
    for r in records:
        if r.get("pass_width_counts"):
            counts = ", ".join(f"{c}: {n}" for c, n in r["pass_width_counts"].items())
            lines.append(
                f"{r['decoder']} batch {r['batch_size']} deep passes by width: {counts}; "
                f"{r['served_per_pass']:.2f} waiting examples served per pass, wait mean "
                f"{r['mean_wait']:.2f} / max {r['max_wait']} steps"
            )
        if r.get("deferral"):
            d = r["deferral"]
            lines.append(
                f"{r['decoder']} batch {r['batch_size']} policy: min_waiting {d['min_waiting']}, "
                f"max_wait {d['max_wait']} (step costs: shallow "
                f"{d['step_costs_ms']['shallow']:.3f} ms, pass of 1 "
                f"{d['step_costs_ms']['deep'][1]:.3f} ms; simulated gain "
                f"{d['simulated_gain']:.2f}x over no deferral)"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="t5-small")
    add_set_flag(parser)
    parser.add_argument("--shallow", type=int, default=None, help="FREE's S (default L/4)")
    parser.add_argument("--static_layer", type=int, default=None, help="static exit k (default S)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max_decode_len", type=int, default=64)
    parser.add_argument("--source_len", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--decoders", nargs="+", default=list(DEFAULT_DECODERS), choices=DECODERS)
    parser.add_argument(
        "--exits", type=int, nargs="+", default=None,
        help="the many-exit decoders' layers (default: 3 spread evenly, as exit heads are)",
    )  # fmt: skip
    parser.add_argument("--force_exit_rate", type=float, default=None)
    parser.add_argument("--threshold", type=threshold_flag, default=DEFAULT_THRESHOLD)
    parser.add_argument("--embedding_std", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_hf", dest="hf", action="store_false")
    parser.add_argument("--json", default=None, help="write one record per decoder and batch")
    parser.add_argument(
        "--cpu_decode_flags", action="store_true",
        help="compile with free_jax.decoding.cpu_flags (cheaper skinny matmuls on a CPU)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # full greedy first: the baseline every ratio refers to
    args.decoders = ["greedy", *[d for d in args.decoders if d != "greedy"]]
    return args


def main(argv=None):
    args = parse_args(argv)
    xla_flags = cpu_flags.apply() if args.cpu_decode_flags else os.environ.get("XLA_FLAGS", "")
    records, components = run(args)
    for record in records:
        record["xla_flags"] = xla_flags
    print(
        f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; {args.preset}"
        f"{''.join(f' {k}={v}' for k, v in args.set)}"
    )
    print(f"XLA_FLAGS: {xla_flags or '(none)'}")
    print(format_table(records, components))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
