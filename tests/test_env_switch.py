"""The package's on/off environment variables: one reader, the usual spellings, a warning for the rest (issue 18, item 9)."""

import os
import subprocess
import sys
import warnings

import pytest
from mlx_fused_lora import env_switch, fast_blas
from mlx_fused_lora.env_switch import switch

VAR = "MLX_FUSED_LORA_TEST_SWITCH"


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_on_spellings(monkeypatch, value):
    monkeypatch.setenv(VAR, value)
    assert switch(VAR, default=False) is True


@pytest.mark.parametrize("value", ["0", "false", "False", "NO", "off", "oFF"])
def test_off_spellings(monkeypatch, value):
    monkeypatch.setenv(VAR, value)
    assert switch(VAR, default=True) is False


def test_unset_or_empty_is_the_default(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    assert switch(VAR, default=True) is True and switch(VAR, default=False) is False
    monkeypatch.setenv(VAR, "")
    assert switch(VAR, default=True) is True


def test_anything_else_keeps_the_default_and_warns_once_naming_variable_value_and_spellings(monkeypatch):
    monkeypatch.setenv(VAR, "ture")
    monkeypatch.setattr(env_switch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert switch(VAR, default=True) is True
        assert switch(VAR, default=True) is True  # asked again: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"{VAR}='ture'" in message and "1/true/yes/on" in message and "0/false/no/off" in message
    assert "keeping the default, on" in message


def _fast_blas_enabled(value, code):
    env = {**os.environ, fast_blas.ENV_VAR: value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast BLAS is a no-op off Linux")
def test_every_switch_reads_the_same_spellings():
    """The issue's case: ``true`` left fast BLAS off at import, ``false`` left it on in the CLI."""
    at_import = "import mlx_fused_lora; from mlx_fused_lora import fast_blas; print(fast_blas.is_enabled())"
    in_cli = "from mlx_fused_lora import fast_blas; fast_blas.enable_for_cli([]); print(fast_blas.is_enabled())"
    assert _fast_blas_enabled("true", at_import) == "True"
    assert _fast_blas_enabled("false", in_cli) == "False"
    assert _fast_blas_enabled("Off", in_cli) == "False"
    assert _fast_blas_enabled("YES", at_import) == "True"


def test_the_gpu_kernels_switch_reads_the_same_spellings(monkeypatch):
    """``MLX_FUSED_LORA_GPU_KERNELS`` where the GPU backend reads it, with MLX's device answers
    stubbed to a CUDA GPU (this machine has none)."""
    from types import SimpleNamespace

    from mlx_fused_lora.ops.backends import gpu

    stub = SimpleNamespace(
        gpu="gpu",
        default_device=lambda: "gpu",
        cuda=SimpleNamespace(is_available=lambda: True),
        metal=SimpleNamespace(is_available=lambda: False),
    )
    monkeypatch.setattr(gpu, "mx", stub)
    for value, expected in (("off", None), ("FALSE", None), ("0", None), ("on", "cuda"), ("True", "cuda")):
        monkeypatch.setenv(gpu.ENABLE_VARIABLE, value)
        assert gpu.available_backend() == expected, value
    monkeypatch.delenv(gpu.ENABLE_VARIABLE)
    assert gpu.available_backend() == "cuda"  # on by default
