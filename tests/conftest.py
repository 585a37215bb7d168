"""Shared fixtures. Tests run on CPU; keep shapes tiny."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def clean_gin():
    """A test that parses gin starts and ends with an empty gin config."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
