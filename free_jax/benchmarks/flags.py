"""Command-line flags the benchmarks share."""

from __future__ import annotations

import argparse


def config_override(text: str) -> tuple[str, int]:
    """`FIELD=VALUE` for `--set`: an integer model field (width, depth, heads, vocabulary).

    >>> config_override("d_model=192")
    ('d_model', 192)
    """
    field, sep, value = text.partition("=")
    if not sep or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(
            f"--set wants FIELD=INTEGER, e.g. d_model=192; got {text!r}"
        )
    return field, int(value)


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    """`--set FIELD=VALUE ...`: override the preset's fields (a candidate shape, no gin needed)."""
    parser.add_argument(
        "--set", type=config_override, nargs="+", default=[], metavar="FIELD=VALUE",
        help="override model fields, e.g. --set d_model=192 num_heads=6 d_ff=768 (integers)",
    )  # fmt: skip
