"""Mixture-of-Recursions against a vanilla model trained here for the same training FLOPs, one run.

    python -m free_jax.benchmarks.recursion_mix [--steps 400] [--loops 2 3] [--slots 8 32]
        [--requests 64] [--new_tokens 32] [--repeats 3] [--work_dir runs/recursion_mix]
        [--json PATH]

Models (Llama-style decoder-only, width `--d_model` 128, 4 query / 2 key-value heads, SwiGLU
`--d_ff` 384, `--layers` L = 8 effective layers): the vanilla model (L unique layers) and one MoR
model per `--loops` N_r (Middle-Cycle: unique first and last layers, a middle block of
K' = (L - 2) / N_r layers run up to N_r times; expert-choice routers, recursion-wise keys/values,
`--router_aux`). Each is trained from scratch by the project's trainer on the built-in
system_translations corpus (English -> German prompt + target rows of 32 + 32 tokens, unpacked,
a 512-piece SentencePiece vocabulary shared by all models), CE (+ the router losses), AdamW 3e-3
with a cosine schedule, batch 16. Re-running resumes from `--work_dir`.

Equal training FLOPs: the vanilla model trains `--steps` steps; a MoR model trains
steps x F_vanilla / F_MoR, with F the forward matmul FLOPs per token (`flops_per_token`: each
layer's weights once per token it runs on, 2 FLOPs per multiply-add, plus the LM head; attention
scores, O(T) per token, are left out at T = 64). Expert-choice runs recursion r on
k_r / T = (N_r - r + 1) / N_r of the tokens, so a MoR token costs 2 + K' (N_r + 1) / 2 layers.

Rows: parameters, training steps, validation loss (CE of the last layer on the validation split),
then per slot count R the greedy decoding of `--requests` validation prompts (up to
`--new_tokens` tokens each): the vanilla model in batches of R (`decode(GreedySpec())`), and each
MoR model three ways: full-depth batches of R (`decode`: every row runs every recursion), the
depth-wise engine with R slots (the routers choose each token's depth, a slot refills at once) and
its synchronized twin (a batch waits for its deepest member). Columns: tokens/s over the median of
`--repeats` rounds after a warm-up, the ratio to the vanilla model's, mean recursions per token and
the BLEU of the decoded outputs against the references (quality first: a fast model that
translates worse is not a win).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from free_jax.decoding.api import decode
from free_jax.decoding.depthwise import depthwise_decode
from free_jax.decoding.specs import DepthwiseSpec, GreedySpec
from free_jax.evaluation import metrics
from free_jax.models.lm_config import LMConfig
from free_jax.models.mor import MoRConfig
from free_jax.training import (
    CheckpointConfig,
    DataConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
    inputs,
    load_trained,
)
from free_jax.training.metrics import read_metrics
from free_jax.training.trainer import train

__all__ = ["flops_per_token", "main", "run"]


def flops_per_token(config: LMConfig) -> float:
    """Forward matmul FLOPs per token: 2 x the weights each token multiplies (see the module
    docstring). A MoR model counts its middle block once per recursion a token runs, at the
    expert-choice capacities (N_r - r + 1) / N_r.

    >>> c = dict(vocab_size=512, d_model=128, num_heads=4, num_kv_heads=2, d_ff=384)
    >>> vanilla = flops_per_token(LMConfig(**c, num_layers=8))
    >>> mor = flops_per_token(MoRConfig(**c, num_layers=8, num_loops=3))
    >>> round(vanilla / mor, 3)   # 8 layers + head against 2 + 2 x (3 + 2 + 1) / 3 = 6 + head
    1.316
    """
    d, kv = config.d_model, config.num_kv_heads * config.head_dim
    attention = d * config.num_heads * config.head_dim * 2 + d * kv * 2  # q, o; k, v
    mlp = d * config.d_ff * (3 if config.family == "llama" else 2)
    layer, head = attention + mlp, d * config.vocab_size
    if isinstance(config, MoRConfig):
        n = config.num_loops
        layers = 2 + config.loop_width * sum((n - r + 1) / n for r in range(1, n + 1))
    else:
        layers = config.num_layers
    return 2.0 * (layers * layer + head)


def _configs(args) -> dict[str, LMConfig]:
    common = dict(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=4, num_kv_heads=2,
        d_ff=args.d_ff, num_layers=args.layers, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    out: dict[str, LMConfig] = {"vanilla": LMConfig(family="llama", **common)}
    for n in args.loops:
        out[f"mor_{n}"] = MoRConfig(
            family="llama", num_loops=n, router_aux=args.router_aux, **common
        )
    return out


def _data(args, tokenizer_path: str | None) -> DataConfig:
    return DataConfig(
        task="system_translations", format="prompt_target", vocab_size=args.vocab,
        max_input_length=32, max_target_length=32, pack=False, eval_examples=args.eval_examples,
        tokenizer_path=tokenizer_path, data_dir=args.data_dir,
    )  # fmt: skip


def _train(args, name: str, config: LMConfig, steps: int, tokenizer_path: str | None):
    optimizer = OptimizerConfig(
        name="adamw", learning_rate=args.learning_rate, schedule="cosine",
        warmup_steps=min(50, steps // 5), end_learning_rate_fraction=0.05, weight_decay=0.01,
        clip_grad_norm=1.0,
    )  # fmt: skip
    run_config = TrainConfig(
        model_dir=os.path.join(args.work_dir, name), train_steps=steps, batch_size=16,
        seed=args.seed, loss=LossConfig(kind="ce"), optimizer=optimizer,
        checkpoint=CheckpointConfig(every=max(steps // 2, 1), keep=1, keep_best=0),
        eval_every=steps, log_every=max(steps // 10, 1), eval_batch_size=64,
        max_decode_length=args.new_tokens, tensorboard=False,
    )  # fmt: skip
    return train(run_config, config, _data(args, tokenizer_path))


def _requests(args, tokenizer_path):
    data = _data(args, tokenizer_path)
    task = inputs.resolve_task(data.task)
    tokenizer = inputs.make_tokenizer(data, task)
    eval_set = inputs.validation_set(data, task, tokenizer, 64, None)
    n = min(args.requests, len(eval_set.inputs))
    s = max(len(x) for x in eval_set.inputs[:n])
    prompts = np.zeros((n, s), np.int32)
    for i, tokens in enumerate(eval_set.inputs[:n]):
        prompts[i, : len(tokens)] = tokens
    lengths = np.asarray(eval_set.prompt_lengths[:n], np.int32)
    refs = [r[0] for r in eval_set.references[:n]]
    return prompts, lengths, refs, tokenizer


def _batched(config, params, prompts, lengths, slots, new_tokens):
    """Greedy `decode` in batches of `slots` (a short last batch padded to the compiled shape)."""
    rows = []
    for start in range(0, prompts.shape[0], slots):
        chunk = prompts[start : start + slots]
        pad = slots - chunk.shape[0]
        out = decode(
            config, params, np.pad(chunk, ((0, pad), (0, 0))), GreedySpec(),
            max_decode_len=new_tokens,
            prompt_lengths=np.pad(lengths[start : start + slots], (0, pad), constant_values=1),
        )  # fmt: skip
        rows.append(np.asarray(out.tokens)[: chunk.shape[0]])
    return np.concatenate(rows), None


def _engine(config, params, prompts, lengths, slots, new_tokens, synchronized):
    spec = DepthwiseSpec(slots=slots, max_new_tokens=new_tokens, synchronized=synchronized)
    out = depthwise_decode(config, params, prompts, lengths, spec)
    return np.asarray(out.tokens_QN), np.asarray(out.exit_loop_QN)


def _count_tokens(tokens_QN, eos: int) -> int:
    total = 0
    for row in tokens_QN:
        stop = np.flatnonzero(row == eos)
        total += int(stop[0]) + 1 if stop.size else row.shape[0]
    return total


def run(args) -> list[dict]:
    configs = _configs(args)
    base_flops = flops_per_token(configs["vanilla"])
    trained, tokenizer_path = {}, None
    for name, config in configs.items():
        steps = max(1, round(args.steps * base_flops / flops_per_token(config)))
        print(f"training {name}: {steps} steps", flush=True)
        result = _train(args, name, config, steps, tokenizer_path)
        _, params, path = load_trained(result.model_dir)
        tokenizer_path = tokenizer_path or path
        # A finished run that is resumed trains and validates nothing: its last validation record.
        validation = result.validation_metrics or read_metrics(result.model_dir, "validation")[-1]
        trained[name] = (config, params, steps, validation["loss"])
    prompts, lengths, refs, tokenizer = _requests(args, tokenizer_path)
    records = []
    for slots in args.slots:
        engines = {}  # engine name -> (model name, runner)
        for name, (config, params, _, _) in trained.items():
            common = (config, params, prompts, lengths, slots, args.new_tokens)
            if name == "vanilla":
                engines[name] = (name, lambda common=common: _batched(*common))
                continue
            engines[f"{name}_full_depth"] = (name, lambda common=common: _batched(*common))
            engines[f"{name}_synchronized"] = (name, lambda c=common: _engine(*c, True))
            engines[f"{name}_depthwise"] = (name, lambda c=common: _engine(*c, False))
        outputs = {name: fn() for name, (_, fn) in engines.items()}  # warm-up (compiles)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, (_, fn) in engines.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        for name, (tokens_QN, loops_QN) in outputs.items():
            model = engines[name][0]
            config, params, steps, loss = trained[model]
            produced = _count_tokens(tokens_QN, config.eos_token_id)
            texts = [tokenizer.decode(row) for row in tokens_QN]
            records.append(dict(
                engine=name, model=model, slots=slots, params=int(
                    sum(x.size for x in jax.tree.leaves(params))),
                train_steps=steps, flops_per_token=flops_per_token(config),
                validation_loss=float(loss), tokens=produced,
                tokens_per_s=produced / statistics.median(times[name]),
                median_s=statistics.median(times[name]),
                recursions_per_token=None if loops_QN is None
                else float(np.mean(loops_QN[loops_QN >= 0] + 1)),
                bleu=metrics.score("bleu", texts, refs)["bleu"],
            ))  # fmt: skip
        vanilla_tps = next(
            r["tokens_per_s"] for r in records if r["slots"] == slots and r["engine"] == "vanilla"
        )
        for r in records:
            if r["slots"] == slots:
                r["speed_vs_vanilla"] = r["tokens_per_s"] / vanilla_tps
    return records


def format_table(records: list[dict]) -> str:
    head = (
        f"{'engine':<22}{'slots':>6}{'params':>9}{'steps':>7}{'val loss':>9}{'BLEU':>7}"
        f"{'tokens/s':>10}{'vs vanilla':>11}{'rec/tok':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        rec = "-" if r["recursions_per_token"] is None else f"{r['recursions_per_token']:.2f}"
        lines.append(
            f"{r['engine']:<22}{r['slots']:>6}{r['params']:>9}{r['train_steps']:>7}"
            f"{r['validation_loss']:>9.3f}{r['bleu']:>7.1f}{r['tokens_per_s']:>10.0f}"
            f"{r['speed_vs_vanilla']:>10.2f}x{rec:>8}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="the vanilla model's training steps")
    p.add_argument("--loops", type=int, nargs="+", default=[2, 3], help="N_r of each MoR model")
    p.add_argument("--slots", type=int, nargs="+", default=[8, 32])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--d_ff", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--router_aux", type=float, default=0.1)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--eval_examples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="runs/recursion_mix")
    p.add_argument("--data_dir", default=None, help="where TFDS prepares the corpus")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for n in args.loops:
        if n not in (2, 3, 4) or (args.layers - 2) % n:
            p.error(
                f"--loops {n}: N_r must be 2, 3 or 4 and divide --layers - 2 = {args.layers - 2}"
            )
    return args


def main(argv=None):
    args = parse_args(argv)
    records = run(args)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
    print(
        f"models: Llama-style d_model={args.d_model} d_ff={args.d_ff} L={args.layers} V={args.vocab}"
        f"; MoR N_r={args.loops} expert-choice, recursion-wise KV, router_aux={args.router_aux}; "
        f"vanilla {args.steps} steps, MoR at equal training FLOPs; {args.requests} validation "
        f"prompts x up to {args.new_tokens} tokens"
    )
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
