"""Convert a trained decoder-only model into a recursive one, written as a free_jax export.

    python -m free_jax.recursify --model_dir=runs/lm_scratch_cpu --out=runs/recursive/init \\
        --sharing=cycle --num_loops=2 --init=stepwise --lora_rank=0

--model_dir is a training MODEL_DIR (its latest checkpoint, LoRA merged) or a free_jax export
(`python -m free_jax.export`) of a vanilla `LMConfig` model. Its L layers become K shared blocks
looped --num_loops times (`models.recursive`), started by --init (`models.recursive_convert`:
stepwise, average, lower or random) and, at --lora_rank > 0, relaxed by the truncated SVD of each
layer's difference to its block. --out gets `config.json` (a `RecursiveConfig`) and `params/`, as
`free_jax.export` writes them, and the source's tokenizer under the name the loaders look for in a
directory (`spiece.model` for SentencePiece, `tokenizer.json`), so a run starts from it with
`TrainConfig.initial_checkpoint=<out>` and its tokenizer path set to <out> too
(gin_configs/runs/recursive_uptrain.gin). The parameter counts are printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax

from free_jax.checkpoints import load_params, save_params
from free_jax.checkpoints.store import PARAMS_DIR
from free_jax.models.configs import describe_config
from free_jax.models.lm_config import LMConfig
from free_jax.models.recursive import SHARING, count_recursive_params
from free_jax.models.recursive_convert import INITS, to_recursive
from free_jax.training.state import CHECKPOINT_SUBDIR, load_trained


def _tokenizer_file(path: Path) -> Path | None:
    """The tokenizer at `path`: the file itself, or in a directory the first of tokenizer.json,
    spiece.model and *.model (a run may record its checkpoint directory as its tokenizer)."""
    if path.is_file():
        return path
    for pattern in ("tokenizer.json", "spiece.model", "*.model"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    return None


def load_vanilla(model_dir: str) -> tuple[LMConfig, dict, Path | None]:
    """(config, params, tokenizer file or None) of a vanilla decoder-only export or MODEL_DIR."""
    path = Path(model_dir)
    if (path / PARAMS_DIR).is_dir():
        config, params = load_params(path)
        tokenizer = _tokenizer_file(path)
    elif (path / CHECKPOINT_SUBDIR).is_dir():
        config, params, recorded = load_trained(path)
        tokenizer = _tokenizer_file(Path(recorded)) if recorded else None
    else:
        raise FileNotFoundError(
            f"--model_dir={model_dir}: neither a free_jax export ({PARAMS_DIR}/) nor a training "
            f"MODEL_DIR ({CHECKPOINT_SUBDIR}/)"
        )
    if type(config) is not LMConfig:
        raise ValueError(
            f"--model_dir={model_dir} holds a {type(config).__name__}; recursify converts a "
            "vanilla decoder-only model (LMConfig)"
        )
    return config, params, tokenizer


def recursify(
    model_dir: str,
    out: str,
    *,
    sharing: str = "cycle",
    num_loops: int,
    init: str = "stepwise",
    lora_rank: int = 0,
    seed: int = 0,
) -> Path:
    """Writes the recursive version of `model_dir`'s model to `out`; returns `out`'s path."""
    if Path(out).resolve() == Path(model_dir).resolve():
        raise ValueError(f"--out={out} is --model_dir itself; write the recursive model elsewhere")
    if num_loops < 2:
        raise ValueError(f"--num_loops={num_loops}: a recursive model loops at least twice")
    config, params, tokenizer = load_vanilla(model_dir)
    params = jax.tree.map(jax.device_get, params)
    try:
        new_config, new_params = to_recursive(
            config, params, sharing=sharing, num_loops=num_loops, init=init,
            lora_rank=lora_rank, rng=jax.random.key(seed),
        )  # fmt: skip
    except ValueError as e:  # RecursiveConfig's message names the field; say which flags set it
        raise ValueError(
            f"--sharing={sharing} --num_loops={num_loops} --lora_rank={lora_rank} do not fit "
            f"the {config.num_layers}-layer model of {model_dir}: {e}"
        ) from e
    out_path = save_params(out, new_config, new_params)
    if tokenizer is not None:
        # The names `data.load_tokenizer` finds in a directory: a run's tokenizer path can be
        # --out itself, as its initial checkpoint is.
        name = "tokenizer.json" if tokenizer.suffix == ".json" else "spiece.model"
        shutil.copy(tokenizer, out_path / name)
        if name == "tokenizer.json" and (tokenizer.parent / "tokenizer_config.json").exists():
            shutil.copy(tokenizer.parent / "tokenizer_config.json", out_path)
    counts = count_recursive_params(new_config, new_params)
    print(f"{describe_config(new_config)} ({init} init) written to {out_path}")
    print(
        f"parameters: {counts['total']:,} (shared blocks {counts['blocks']:,}, relaxation "
        f"{counts['relax']:,}) vs {counts['vanilla']:,} in the vanilla model "
        f"({counts['total'] / counts['vanilla']:.1%})"
    )
    if tokenizer is None:
        print(f"no tokenizer found beside {model_dir}: runs from {out_path} must name one")
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m free_jax.recursify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model_dir", required=True, help="a training MODEL_DIR or a free_jax export")
    p.add_argument("--out", required=True, help="where the recursive export goes")
    p.add_argument("--sharing", choices=SHARING, default="cycle")
    p.add_argument("--num_loops", type=int, required=True, help="B, loops over the shared blocks")
    p.add_argument("--init", choices=INITS, default="stepwise", help="how the blocks start")
    p.add_argument("--lora_rank", type=int, default=0, help="per-layer relaxation rank (0: none)")
    p.add_argument("--seed", type=int, default=0, help="for --init=random and the adapters")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    recursify(
        args.model_dir, args.out, sharing=args.sharing, num_loops=args.num_loops,
        init=args.init, lora_rank=args.lora_rank, seed=args.seed,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
