"""Every decoder and the training step lower for GPU and TPU (`jax.export`, no device needed)."""

import pytest

from free_jax.benchmarks import lowering
from free_jax.models import preset
from free_jax.models.lm_config import lm_preset


@pytest.mark.parametrize(
    "family, config",
    [
        ("t5", preset("tiny")),
        pytest.param("llama", lm_preset("tiny-llama"), marks=pytest.mark.slow),
    ],
)
def test_every_decoder_lowers_for_gpu_and_tpu(family, config):
    specs = lowering.decoder_specs(config.num_decoder_layers)
    assert {"free_deferred", "free_exits", "calm_exits", "beam"} <= set(specs)
    for name, spec in specs.items():
        for platform in lowering.PLATFORMS:
            size = lowering.lower_decoder(config, spec, platform)
            assert size > 10_000, (family, name, platform)


def test_the_training_step_lowers_for_gpu_and_tpu():
    for platform in lowering.PLATFORMS:
        assert lowering.lower_train_step(preset("tiny"), platform) > 10_000
