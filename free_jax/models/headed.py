"""A backbone with self-supervised exit heads, behind the same decoding protocol.

    config = HeadedConfig(base=lm_config, head_layers=(2, 4))
    params = {"backbone": backbone_params, "exit_heads": heads_params}   # exit_heads.py's tree
    decode(config, params, prompts_BS, FreeSpec(), ...)       # FREE's shallow exit reads head 2

Decoders ask for an exit's logits with the layer it sits after (`exit_logits(hidden, layer=k)`):
on a layer with a head the head answers, elsewhere (and for the deep exit, layer L) the backbone's
own final norm and LM head. So static exit at k, CALM's test after layer k and FREE's shallow exit
at S use the trained heads where they exist, with no change to any decoder. FREE's S defaults to
the lowest head layer (the backbone's own default when it sets `shallow_exit_layer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from free_jax.models.exit_config import ExitConfig
from free_jax.models.exit_heads import head_logits
from free_jax.models.protocol import bind, register_family


@dataclasses.dataclass(frozen=True)
class HeadedConfig(ExitConfig):
    """A backbone config plus the layers that carry exit heads; other attributes are the base's.

    Attributes:
      base: the backbone's `T5Config` or `LMConfig`.
      head_layers: decoder layers (1..L) with a head in the params' "exit_heads" tree.
    """

    base: Any
    head_layers: tuple[int, ...]

    def __post_init__(self):
        layers = tuple(int(x) for x in self.head_layers)
        num_layers = self.base.num_decoder_layers
        if not layers or any(not 1 <= x <= num_layers for x in layers):
            raise ValueError(
                f"HeadedConfig.head_layers={self.head_layers!r}: need one or more layers in "
                f"[1, {num_layers}]"
            )
        object.__setattr__(self, "head_layers", tuple(sorted(set(layers))))

    def __getattr__(self, name: str):
        # only reached for attributes the dataclass does not define: the backbone's
        if name in ("base", "head_layers") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def shallow_exit_layer(self) -> int | None:
        if self.base.shallow_exit_layer is not None:
            return self.base.shallow_exit_layer
        below = [x for x in self.head_layers if x < self.base.num_decoder_layers]
        return below[0] if below else None

    def replace(self, **changes: Any) -> HeadedConfig:
        own = {k: changes.pop(k) for k in ("base", "head_layers") if k in changes}
        base = own.pop("base", self.base)
        if changes:
            base = base.replace(**changes)
        return dataclasses.replace(self, base=base, **own)


class HeadedModel:
    """The protocol over a bound backbone and its heads (`params`: backbone + exit_heads)."""

    def __init__(self, config: HeadedConfig, backbone=None, heads=None):
        self.config = config
        self.backbone = backbone
        self.heads = heads

    def bind_params(self, params) -> HeadedModel:
        missing = {"backbone", "exit_heads"} - set(params)
        if missing:
            raise ValueError(
                f"a HeadedConfig model takes params {{'backbone': ..., 'exit_heads': ...}}; "
                f"missing {sorted(missing)}"
            )
        absent = [x for x in self.config.head_layers if f"head_{x}" not in params["exit_heads"]]
        if absent:
            raise ValueError(f"exit_heads has no head for layer(s) {absent} of head_layers")
        backbone = bind(self.config.base, params["backbone"])
        return HeadedModel(self.config, backbone, params["exit_heads"])

    # the backbone's own pieces
    def start(self, *args, **kwargs):
        return self.backbone.start(*args, **kwargs)

    def init_cache(self, batch, length):
        return self.backbone.init_cache(batch, length)

    def embed(self, tokens_BC, offset_B):
        return self.backbone.embed(tokens_BC, offset_B)

    def layers(self, hidden_BCD, **kwargs):
        return self.backbone.layers(hidden_BCD, **kwargs)

    def layer_kv(self, hidden_BCD, layer, offset_B):
        return self.backbone.layer_kv(hidden_BCD, layer, offset_B)

    def final_norm(self, hidden_BTD, layer=None):
        return self.backbone.final_norm(hidden_BTD)

    # the exits: a head where one sits, else the shared final norm and LM head
    def exit_logits(self, hidden_BTD, layer=None):
        if layer is not None and layer in self.config.head_layers:
            return head_logits(self.config.base, self.heads, layer, hidden_BTD)
        return self.backbone.exit_logits(hidden_BTD)


register_family(HeadedConfig, HeadedModel)
