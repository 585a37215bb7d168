"""Interactive generation: one input, any decoder, each token marked by the exit it left from.

    python -m free_jax.generate --checkpoint=demo/model --decoder=free "Could not open file"
    python -m free_jax.generate --checkpoint=... --decoder=free --threshold=0.8 --show_confidence "..."

In a terminal, shallow-exit tokens print in green and deep ones in the default colour (`--color`
forces or disables it); `--show_confidence` appends each token's confidence.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from free_jax.data import get_task
from free_jax.decoding import decode
from free_jax.loading import load_model

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"
DECODERS = {"full": "greedy", "greedy": "greedy", "static": "static", "calm": "calm",
            "free": "free", "free_lossless": "free_lossless"}  # fmt: skip


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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m free_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("text", nargs="+", help="input text (joined with spaces)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--decoder", choices=sorted(DECODERS), default="free")
    p.add_argument("--threshold", type=float, default=None, help="exit threshold (calm/free)")
    p.add_argument("--threshold_file", default=None, help="a threshold.json from calibrate")
    p.add_argument("--exit_layer", type=int, default=None, help="static k / CALM min / FREE S")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--max_decode_len", type=int, default=64)
    p.add_argument("--task", default=None, help="prepend this task's input prefix")
    p.add_argument("--show_confidence", action="store_true")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config, params, tok = load_model(args.checkpoint, args.tokenizer)
    if tok is None:
        raise SystemExit(f"{args.checkpoint}: no tokenizer found; pass --tokenizer")
    text = " ".join(args.text)
    if args.task:
        text = get_task(args.task).prefix + text
    threshold = args.threshold
    if args.threshold_file:
        from free_jax.calibration import load_threshold

        threshold = load_threshold(args.threshold_file).threshold
    method = DECODERS[args.decoder]
    if method in ("calm", "free", "free_lossless") and threshold is None:
        threshold = 0.9
    if method == "static" and args.exit_layer is None:
        args.exit_layer = config.shallow_layer
    ids = tok.encode(text) + [tok.eos_id]
    result = decode(
        config, params, np.asarray([ids], np.int32), method=method,
        max_decode_len=args.max_decode_len, threshold=threshold, exit_layer=args.exit_layer,
        window=args.window,
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
