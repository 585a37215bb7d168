"""Continuous depth-wise batching against batched greedy and synchronized early exit, one run.

    python -m free_jax.benchmarks.depthwise [--slots 8 32] [--requests 64] [--new_tokens 32]
        [--exit_rate 0.5] [--skipped_kv share_loop0|copy_state] [--repeats 3] [--json PATH]

Model: a recursive decoder-only model with random weights (`--d_model` 512, `--d_ff` 2048,
`--layers` L = 6, `--loops` B = 3, cycle sharing, `--lora_rank`), its final norm scaled by
`--sharpen` so that softmax confidences spread over [0, 1]; the vanilla model is the same L layers
unshared (the recursive model's materialised weights, three times the bytes to read per step).
Skipped loops' keys/values: `--skipped_kv` (default share_loop0, which costs nothing; copy_state
computes them, (B - 1) K key/value projections per tick in which some slot exits early). Random weights decode nonsense: the rows compare the cost of the
same work, not quality. Requests: `--requests` random prompts of 1..`--prompt_len` tokens, each
decoding up to `--new_tokens` tokens (EOS ends a request sooner, the same way in every engine).

Forcing exits: the loop-boundary threshold is the (1 - `--exit_rate`) quantile of the first loop's
confidences on the never-exit outputs (teacher-forced), so that about that share of tokens leaves
after loop 1 of B; the others go on and leave at a later boundary if confident, else at the end.

Rows (each at every slot count R; a "batch" is R requests):
  vanilla_greedy      `decode(GreedySpec())` of the vanilla model, batch after batch;
  recursive_greedy    the same on the recursive model (the speed reference: `speedup`);
  engine_never        the depth-wise engine with no early exit (the engine's own overhead);
  synchronized        batched early exit: a batch steps while any member needs the next loop and
                      is refilled only when all its requests are done (`DepthwiseSpec.synchronized`);
  depthwise           continuous depth-wise batching (exits refill their slot at once).
Columns: tokens/s over the median of `--repeats` timed rounds (each round runs every row once,
after a warm-up), speedup over recursive greedy, the exit rate per loop, slot-loops per token
(loop calls x R / tokens: B for greedy when every request runs to the end), block calls per token
(JSON `block_calls_per_token`: calls of one block over all R rows, per generated token), and the
count-based bound B / (mean loops per token): the speedup if every slot-loop advanced a token and a tick cost
what one loop of greedy costs. `of bound` = speedup / bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding.api import decode
from free_jax.decoding.confidence import softmax_margin
from free_jax.decoding.depthwise import depthwise_decode, tick_plan
from free_jax.decoding.specs import SKIPPED_KV, DepthwiseSpec, GreedySpec
from free_jax.models import init_params
from free_jax.models.recursive import RecursiveConfig, RecursiveLM, materialise

ENGINES = ("vanilla_greedy", "recursive_greedy", "engine_never", "synchronized", "depthwise")


def build_model(args) -> tuple[RecursiveConfig, dict]:
    config = RecursiveConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads, d_ff=args.d_ff,
        num_layers=args.layers, num_loops=args.loops, lora_rank=args.lora_rank,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    params = init_params(config, jax.random.key(args.seed))
    norm = params["decoder"]["final_norm"]
    params["decoder"]["final_norm"] = {**norm, "scale": norm["scale"] * args.sharpen}
    return config, params


def requests(args, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, args.prompt_len + 1, size=args.requests).astype(np.int32)
    prompts = rng.integers(3, vocab, size=(args.requests, args.prompt_len)).astype(np.int32)
    return prompts, lengths


def forced_threshold(config, params, prompts, lengths, result, rate: float) -> float:
    """The (1 - rate) quantile of the first loop's softmax-margin confidence on `result`'s tokens,
    teacher-forced on prompt + output (one batched pass over right-padded rows)."""
    first = config.loop_exit_layers[0]
    q, s = prompts.shape
    n = result.tokens_QN.shape[1]
    emitted_QN = np.asarray(result.exit_loop_QN) >= 0
    rows = np.zeros((q, s + n), np.int32)
    for i in range(q):
        rows[i, : lengths[i]] = prompts[i, : lengths[i]]
        rows[i, lengths[i] : lengths[i] + n] = np.asarray(result.tokens_QN)[i]
    forward = jax.jit(
        lambda p, t: RecursiveLM(config).apply(p, t, exit_layers=(first,)).exit_logits[first]
    )
    logits = forward(params, jnp.asarray(rows))
    # Position lengths - 1 + t predicts output token t.
    index_QN = lengths[:, None] - 1 + np.arange(n)[None, :]
    confs = softmax_margin(logits[np.arange(q)[:, None], index_QN].reshape(q * n, -1))
    return float(np.quantile(np.asarray(confs)[emitted_QN.reshape(-1)], 1.0 - rate))


def _greedy_runner(config, params, prompts, lengths, slots: int, new_tokens: int, steps: list):
    """Batch after batch of `slots` requests; appends each round's decode steps to `steps`."""

    def run():
        produced, rounds = 0, 0
        for start in range(0, prompts.shape[0], slots):
            batch = slice(start, start + slots)
            rows = prompts[batch]
            pad = slots - rows.shape[0]  # a short last batch keeps the compiled shape
            result = decode(
                config, params, np.pad(rows, ((0, pad), (0, 0))), GreedySpec(),
                max_decode_len=new_tokens,
                prompt_lengths=np.pad(lengths[batch], (0, pad), constant_values=1),
            )  # fmt: skip
            produced += int(np.asarray(result.lengths)[: rows.shape[0]].sum())
            rounds += int(np.asarray(result.lengths).max())  # the batch steps until its longest
        steps.append(rounds)
        return produced

    return run


def run(args) -> list[dict]:
    config, params = build_model(args)
    vanilla = config.base
    vanilla_params = jax.jit(lambda p: materialise(config, p))(params)
    prompts, lengths = requests(args, config.vocab_size)
    never_spec = DepthwiseSpec(slots=args.slots[0], max_new_tokens=args.new_tokens)
    never = depthwise_decode(config, params, prompts, lengths, never_spec, threshold=2.0)
    threshold = forced_threshold(config, params, prompts, lengths, never, args.exit_rate)
    records = []
    for slots in args.slots:
        spec = lambda slots=slots, **kw: DepthwiseSpec(
            slots=slots, max_new_tokens=args.new_tokens, skipped_kv=args.skipped_kv, **kw
        )
        greedy_steps: list[int] = []
        engines = {
            "vanilla_greedy": _greedy_runner(vanilla, vanilla_params, prompts, lengths, slots,
                                             args.new_tokens, []),
            "recursive_greedy": _greedy_runner(config, params, prompts, lengths, slots,
                                               args.new_tokens, greedy_steps),
        }  # fmt: skip
        results: dict = {}

        def engine(name, threshold, results=results, spec=spec, **kw):
            def go():
                results[name] = depthwise_decode(
                    config, params, prompts, lengths, spec(**kw), threshold=threshold
                )
                jax.block_until_ready(results[name].tokens_QN)
                return results[name].num_tokens()

            return go

        engines["engine_never"] = engine("engine_never", 2.0)
        engines["synchronized"] = engine("synchronized", threshold, synchronized=True)
        engines["depthwise"] = engine("depthwise", threshold)
        tokens = {name: fn() for name, fn in engines.items()}  # warm-up (compiles)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tps = {n: tokens[n] / statistics.median(ts) for n, ts in times.items()}
        for name in engines:
            record = dict(
                engine=name, slots=slots, tokens=tokens[name], tokens_per_s=tps[name],
                median_s=statistics.median(times[name]),
                speedup_vs_greedy=tps[name] / tps["recursive_greedy"], exit_rate=None,
                bound=1.0, threshold=None,
                # A greedy step runs every layer once over the batch (each call over R rows).
                loop_calls_per_token=greedy_steps[-1] * config.num_loops * slots / tokens[name],
                block_calls_per_token=greedy_steps[-1] * config.num_layers / tokens[name],
            )  # fmt: skip
            if name in results:
                r = results[name]
                loops = np.asarray(r.exit_loop_QN)
                emitted = loops[loops >= 0]
                rate = np.bincount(emitted, minlength=config.num_loops) / emitted.size
                record.update(
                    exit_rate=[float(x) for x in rate],
                    bound=config.num_loops / float(np.mean(emitted + 1)),
                    loop_calls_per_token=int(r.ticks) * slots / emitted.size,
                    ticks=int(r.ticks), busy=int(r.busy),
                    block_calls_per_token=int(r.ticks) * len(tick_plan(config)) / emitted.size,
                    threshold=None if name == "engine_never" else threshold,
                )  # fmt: skip
            record["of_bound"] = record["speedup_vs_greedy"] / record["bound"]
            records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    head = (
        f"{'engine':<18}{'slots':>6}{'tokens/s':>10}{'speedup':>9}{'bound':>7}{'of bound':>9}"
        f"{'loops/tok':>10}  exit rate per loop"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        rate = "-" if r["exit_rate"] is None else " ".join(f"{x:.2f}" for x in r["exit_rate"])
        lines.append(
            f"{r['engine']:<18}{r['slots']:>6}{r['tokens_per_s']:>10.0f}"
            f"{r['speedup_vs_greedy']:>8.2f}x{r['bound']:>6.2f}x{r['of_bound']:>9.0%}"
            f"{r['loop_calls_per_token']:>10.2f}  {rate}"
        )
    by = {(r["engine"], r["slots"]): r for r in records}
    for slots in sorted({r["slots"] for r in records}):
        d, s = by[("depthwise", slots)], by[("synchronized", slots)]
        lines.append(
            f"slots {slots}: depthwise / synchronized = "
            f"{d['tokens_per_s'] / s['tokens_per_s']:.2f}x; depthwise reaches {d['of_bound']:.0%} "
            f"of its bound {d['bound']:.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, nargs="+", default=[8, 32])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--exit_rate", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--lora_rank", type=int, default=0)
    p.add_argument("--sharpen", type=float, default=30.0)
    p.add_argument("--skipped_kv", default="share_loop0", choices=SKIPPED_KV)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not 0.0 < args.exit_rate < 1.0:
        p.error(f"--exit_rate={args.exit_rate} must be in (0, 1)")
    if args.layers % args.loops:
        p.error(f"--layers={args.layers} must be a multiple of --loops={args.loops}")
    return args


def main(argv=None):
    args = parse_args(argv)
    records = run(args)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
    print(
        f"model: random recursive Llama d_model={args.d_model} d_ff={args.d_ff} L={args.layers} "
        f"B={args.loops} cycle, LoRA rank {args.lora_rank}, V={args.vocab}; {args.requests} "
        f"requests x up to {args.new_tokens} tokens; forced first-loop exit rate {args.exit_rate}; "
        f"skipped loops' keys/values: {args.skipped_kv}"
    )
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
