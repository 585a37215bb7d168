"""Interactive generation: one input, any decoder, each token marked by the exit it left from.

    python -m free_jax.generate --checkpoint=demo/model --decoder=free "Could not open file"
    python -m free_jax.generate --checkpoint=... --decoder=free --threshold=0.8 --show_confidence \\
        "..."
    python -m free_jax.generate --checkpoint=... --decoder=calm --exit_layer=2 \\
        --measure=softmax_max "..."

`--decoder` is a method of `free_jax.decoding.specs` ("full" is greedy); the decoder options
build its spec through `specs.spec_for` (an option the method has no field for is an error). In a
terminal, shallow-exit tokens print in green and deep ones in the default colour (`--color`
forces or disables it); `--show_confidence` appends each token's confidence.

An input longer than `--max_input_length` tokens (default 64, evaluate's and calibrate's) is cut to
its first tokens with a warning, as evaluation's pipeline cuts it; a prompt to a model with learned
positions (GPT-2) is also cut to leave room for `--max_decode_len` new tokens in its table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import jax
import numpy as np

from free_jax.data import default_bos_id, get_task
from free_jax.decoding import MEASURES, decode
from free_jax.decoding.api import check_threshold
from free_jax.decoding.specs import DEFAULT_THRESHOLD, METHODS, NEEDS_THRESHOLD, spec_for
from free_jax.loading import load_confidence_head, load_model
from free_jax.models import T5Config

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"
ALIASES = {"full": "greedy"}
# Flags that are `spec_for` keywords (unset: the spec's default applies).
SPEC_OPTIONS = ("exit_layer", "window", "measure", "rollback", "records", "position_temp", "top_k",
                "temperature", "beam_size", "length_penalty")  # fmt: skip
# The spec fields `--exit_layer` sets: static's k, CALM's minimum exit, FREE's S.
EXIT_FIELDS = {"exit_layer", "min_exit", "shallow"}
# evaluate.max_input_length's and calibrate.max_input_length's default: generate sees an input as
# evaluation scores it.
DEFAULT_MAX_INPUT_LENGTH = 64


def input_ids(tok, config, text: str, max_input_length: int, max_decode_len: int) -> list[int]:
    """The model's input ids for `text`, cut to `max_input_length` with a warning on stderr.

    T5: the text's first `max_input_length - 1` tokens and EOS (as `data.pipeline` cuts them). A
    decoder-only model: [BOS] + the text, its first `max_input_length` tokens (as
    `data.lm_pipeline` cuts prompts), and with learned positions (GPT-2) no more than its position
    table leaves room for after `max_decode_len` new tokens.
    """
    if max_input_length < 2:
        raise SystemExit(f"--max_input_length={max_input_length}: must be at least 2")
    if isinstance(config, T5Config):
        ids = tok.encode(text) + [tok.eos_id]  # T5's encoder input ends with EOS
        limit = max_input_length
        kept = ids if len(ids) <= limit else ids[: limit - 1] + [tok.eos_id]
    else:  # a decoder-only model continues the prompt: [BOS] + text, as it was trained
        bos = default_bos_id(getattr(config, "bos_token_id", None), config.eos_token_id)
        ids = ([] if bos is None else [bos]) + tok.encode(text)
        if not ids:
            raise SystemExit("an empty prompt: give some text to continue")
        limit = max_input_length
        if config.positions == "learned":  # a position table: prompt + new tokens must fit it
            room = config.max_position_embeddings - max_decode_len
            if room < 1:
                raise SystemExit(
                    f"--max_decode_len={max_decode_len} leaves no room for a prompt within the "
                    f"model's {config.max_position_embeddings} learned positions"
                )
            limit = min(limit, room)
        kept = ids[:limit]
    if len(ids) > limit:
        print(
            f"warning: the input has {len(ids)} tokens; cut to its first {limit} "
            f"(--max_input_length={max_input_length})",
            file=sys.stderr,
        )
    return kept


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds (decoding prefixes keeps SentencePiece's word-initial spaces)."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]))
        pieces.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return pieces


def render(pieces, exit_layers, confidences, num_layers, color: bool, show_conf: bool) -> str:
    out = []
    for piece, layer, conf in zip(pieces, exit_layers, confidences):
        shallow = layer < num_layers
        text = piece
        if show_conf:
            text += f"{DIM if color else ''}[{'S' if shallow else 'D'}{layer} {conf:.2f}]"
            text += RESET if color else ""
        out.append(f"{GREEN}{text}{RESET}" if color and shallow else text)
    return "".join(out)


def threshold_flag(text: str) -> float:
    """--threshold's type: any real number ("nan" is not one: a NaN threshold never exits)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        check_threshold(value, repr(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m free_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("text", nargs="+", help="input text (joined with spaces)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--decoder", choices=sorted({*METHODS, *ALIASES}), default="free")
    p.add_argument("--threshold", type=threshold_flag, default=None,
                   help=f"exit when confidence > this (calm/free; default {DEFAULT_THRESHOLD}); "
                        "any real number: below 0 always exits, 1 or more never")  # fmt: skip
    p.add_argument("--threshold_file", default=None, help="a threshold.json from calibrate")
    spec = p.add_argument_group("decoder options (fields of the method's spec; default: its own)")
    spec.add_argument("--exit_layer", type=int, default=None,
                      help="static k (default S) / CALM's minimum exit / FREE's S")  # fmt: skip
    spec.add_argument("--window", type=int, default=None, help="FREE's stack window W")
    spec.add_argument("--measure", choices=MEASURES, default=None, help="confidence measure")
    spec.add_argument("--rollback", type=float, default=None,
                      help="FREE: reject shallow tokens whose deep CE exceeds this")  # fmt: skip
    spec.add_argument("--no_records", dest="records", action="store_const", const=False,
                      default=None, help="FREE without agreement records")  # fmt: skip
    spec.add_argument("--position_temp", type=float, default=None, help="threshold decay")
    spec.add_argument("--top_k", type=int, default=None, help="sample: top-k (0: all)")
    spec.add_argument("--temperature", type=float, default=None, help="sample: temperature")
    spec.add_argument("--beam_size", type=int, default=None, help="beam: beams")
    spec.add_argument("--length_penalty", type=float, default=None, help="beam: length penalty")
    p.add_argument("--confidence_head", default=None,
                   help="for --measure=learned: a file from loading.save_confidence_head")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max_decode_len", type=int, default=64)
    p.add_argument("--max_input_length", type=int, default=DEFAULT_MAX_INPUT_LENGTH,
                   help="input tokens kept (longer inputs are cut, with a warning)")  # fmt: skip
    p.add_argument("--task", default=None, help="prepend this task's input prefix")
    p.add_argument("--show_confidence", action="store_true")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p.parse_args(argv)


def decoder_spec(args, config):
    """The spec `--decoder` and the decoder options name (static's k defaults to the config's S).

    An option the method's spec has no field for is an error, not silently dropped.
    """
    method = ALIASES.get(args.decoder, args.decoder)
    options = {
        name: getattr(args, name) for name in SPEC_OPTIONS if getattr(args, name) is not None
    }
    if method == "static":
        options.setdefault("exit_layer", config.shallow_layer)
    spec = spec_for(method, **options)
    fields = {f.name for f in dataclasses.fields(spec)}
    if fields & EXIT_FIELDS:
        fields.add("exit_layer")
    unknown = [name for name in options if name not in fields]
    if unknown:
        options_text = ", ".join(f"--{name}" for name in unknown)
        raise SystemExit(f"--decoder={args.decoder} takes no {options_text}")
    return spec


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config, params, tok = load_model(args.checkpoint, args.tokenizer)
    if tok is None:
        raise SystemExit(f"{args.checkpoint}: no tokenizer found; pass --tokenizer")
    spec = decoder_spec(args, config)
    text = " ".join(args.text)
    if args.task:
        text = get_task(args.task).prefix + text
    threshold = args.threshold
    if args.threshold_file:
        from free_jax.calibration import load_threshold

        threshold = load_threshold(args.threshold_file).threshold
    if isinstance(spec, NEEDS_THRESHOLD) and threshold is None:
        threshold = DEFAULT_THRESHOLD
    head = None
    if args.confidence_head:
        head = load_confidence_head(args.confidence_head, config)
    ids = input_ids(tok, config, text, args.max_input_length, args.max_decode_len)
    result = decode(
        config, params, np.asarray([ids], np.int32), spec, max_decode_len=args.max_decode_len,
        threshold=threshold, confidence_params=head, rng=jax.random.key(args.seed),
    )  # fmt: skip
    n = int(np.asarray(result.lengths)[0])
    out_ids = [int(t) for t in np.asarray(result.tokens)[0, :n] if t != tok.eos_id]
    layers = np.asarray(result.exit_layer)[0, : len(out_ids)]
    confs = np.asarray(result.confidence)[0, : len(out_ids)]
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    pieces = token_pieces(tok, out_ids)
    line = render(pieces, layers, confs, config.num_decoder_layers, color, args.show_confidence)
    print(line)
    shallow = int((layers < config.num_decoder_layers).sum())
    print(
        f"[{args.decoder}: {len(out_ids)} tokens, {shallow} left at a shallow exit, "
        f"{int(np.asarray(result.num_deep_passes)[0])} deep passes]",
        file=sys.stderr,
    )
    return tok.decode(out_ids)


if __name__ == "__main__":
    main()
