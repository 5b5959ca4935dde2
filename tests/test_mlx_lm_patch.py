"""``patch_mlx_lm`` covers every name mlx-lm builds or checks LoRA layers by (issue 18, item
16c-d), and ``python -m mlx_fused_lora.lm_lora`` without mlx-lm is one line (item 14)."""

import subprocess
import sys

import mlx.nn as nn
import pytest
from mlx_fused_lora import FusedLoRALinear
from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear

pytest.importorskip("mlx_lm")

import mlx_lm.tuner.dora as mlx_lm_dora  # noqa: E402
import mlx_lm.tuner.lora as mlx_lm_lora  # noqa: E402
import mlx_lm.tuner.utils as tuner_utils  # noqa: E402
from mlx_fused_lora.lm_lora import patch_mlx_lm, unpatch_mlx_lm  # noqa: E402
from test_mlx_lm_integration import lora_modules, make_llama, mlx_lm_classes  # noqa: E402

ORIGINAL_LORA, ORIGINAL_DORA = mlx_lm_lora.LoRALinear, mlx_lm_dora.DoRALinear


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    mlx_lm_classes(monkeypatch)


def test_remove_lora_layers_unwraps_mlx_lm_layers_made_before_the_patch_and_ours():
    model = make_llama()
    config = {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    bases = [block.self_attn.q_proj for block in model.layers]
    tuner_utils.linear_to_lora_layers(model, 1, config)  # mlx-lm's own, before the patch
    patch_mlx_lm()
    for block in model.layers[:-1]:  # built by mlx-lm's name after the patch: ours
        block.self_attn.q_proj = mlx_lm_lora.LoRALinear.from_base(block.self_attn.q_proj, r=2)
    kinds = {type(m) for m in lora_modules(model).values()}
    assert kinds == {ORIGINAL_LORA, FusedLoRALinear}
    tuner_utils.remove_lora_layers(model)
    assert not lora_modules(model)
    assert [block.self_attn.q_proj for block in model.layers] == bases


@pytest.mark.parametrize(
    "module, name, ours, original",
    [
        (tuner_utils, "LoRALinear", FusedLoRALinear, ORIGINAL_LORA),
        (tuner_utils, "DoRALinear", FusedDoRALinear, ORIGINAL_DORA),
        (mlx_lm_lora, "LoRALinear", FusedLoRALinear, ORIGINAL_LORA),
        (mlx_lm_dora, "DoRALinear", FusedDoRALinear, ORIGINAL_DORA),
    ],
)
def test_every_name_builds_ours_and_recognises_both(module, name, ours, original):
    patch_mlx_lm()
    patch_mlx_lm()  # idempotent
    cls = getattr(module, name)
    built = [cls(16, 8, r=2), cls.from_base(nn.Linear(16, 8), r=2), original.from_base(nn.Linear(16, 8), r=2)]
    assert [type(layer) for layer in built] == [ours] * 3  # mlx-lm's own from_base builds by the module's name
    assert isinstance(built[0], cls) and issubclass(ours, cls)
    assert {"parameters", "fuse", "from_base"} <= set(dir(cls))  # e.g. MagicMock(spec=LoRALinear) in mlx-lm's tests
    assert isinstance(original(16, 8, r=2), cls)  # mlx-lm's own layer (as made before the patch) counts
    unpatch_mlx_lm()
    assert getattr(module, name) is original


def test_mlx_lm_conversion_builds_fused_layers_for_lora_and_dora():
    patch_mlx_lm()
    for use_dora, expected in ((False, FusedLoRALinear), (True, FusedDoRALinear)):
        model = make_llama()
        tuner_utils.linear_to_lora_layers(model, 2, {"rank": 2, "scale": 1.0, "dropout": 0.0}, use_dora=use_dora)
        assert {type(m) for m in lora_modules(model).values()} == {expected}


def test_lm_lora_without_mlx_lm_is_one_line():
    # mlx-lm made unimportable in a fresh interpreter, as if it were not installed
    code = (
        "import runpy, sys; sys.modules['mlx_lm'] = None; sys.argv = ['lm_lora', '--help'];"
        "runpy.run_module('mlx_fused_lora.lm_lora', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "mlx-fused-lora[lm]"' in lines[0], proc.stderr
