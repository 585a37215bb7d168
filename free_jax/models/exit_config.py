"""What every family's config shares for early exit: FREE's default S, the exit-layer check, the
dtypes, `replace` and the JSON round trip. A mixin of frozen config dataclasses that define `num_decoder_layers`,
`shallow_exit_layer`, `dtype` and `param_dtype`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp


class ExitConfig:
    """Methods over `num_decoder_layers` (L) and `shallow_exit_layer` shared by T5 and LM configs."""

    @property
    def shallow_layer(self) -> int:
        """FREE's S: the configured value, else round(L / 4) clipped into [1, L)."""
        if self.shallow_exit_layer is not None:
            return self.shallow_exit_layer
        num_layers = self.num_decoder_layers
        return max(1, min(num_layers - 1, round(num_layers / 4)))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    def check_exit_layer(self, layer: int, what: str = "exit layer") -> None:
        """Rejects an exit that is not a proper intermediate decoder layer."""
        num_layers = self.num_decoder_layers
        if not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ValueError(
                f"{what}={layer!r} is outside the valid range [1, {num_layers}) for a decoder with "
                f"{num_layers} layers (the deep exit {num_layers} is always computed)"
            )

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>"):
        """The config `to_json` wrote; invalid JSON or an unknown field is an error naming
        `source` (the file), and the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of {cls.__name__} fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)
