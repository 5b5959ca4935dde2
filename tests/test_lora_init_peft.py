"""Our inits against PEFT's own on the same W: pissa, pissa_niter_N, olora, gaussian, and PiSSA's
conversion to plain LoRA (``save_pretrained(path_initial_model_for_weight_conversion=...)``).

Skipped where torch or peft is missing (the ``peft`` extra). PEFT's ``lora_A.weight (r, in)``
is our ``lora_a.T`` and ``lora_B.weight (out, r)`` our ``lora_b.T``; its ``scaling`` is our
``scale`` (``lora_alpha / r``).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fused_lora.adapters import AdapterSet, ModuleAdapter, convert_to_lora, read_adapters
from mlx_fused_lora.bench import peft_peer
from mlx_fused_lora.layers import init_lora

pytestmark = pytest.mark.skipif(not peft_peer.available(), reason="needs torch and peft (pip install '.[peft]')")

R, ALPHA = 4, 10.0  # scale 2.5


def weight(out_dims=40, in_dims=64, seed=0):
    rng = np.random.default_rng(seed)
    k = min(out_dims, in_dims)
    u, _ = np.linalg.qr(rng.standard_normal((out_dims, k)))
    v, _ = np.linalg.qr(rng.standard_normal((in_dims, k)))
    return ((u * 0.8 ** np.arange(k)) @ v.T).astype(np.float32)  # a decaying spectrum


def peft_init(w, method, r=R, alpha=ALPHA):
    """(PEFT's model, its lora_a, lora_b in our layout, its new base weight) for one Linear of weight w."""
    torch = peft_peer.import_torch()
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                self.lin.weight.copy_(torch.from_numpy(w))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin"], r=r, lora_alpha=alpha, init_lora_weights=method))
    lin = model.base_model.model.lin
    a = lin.lora_A["default"].weight.detach().numpy().T.copy()
    b = lin.lora_B["default"].weight.detach().numpy().T.copy()
    return model, a, b, lin.base_layer.weight.detach().numpy().copy()


def ours(w, method, **kwargs):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = mx.array(w)
    init = init_lora(lin, R, ALPHA / R, method, **kwargs)
    base = np.array(init.base.weight) if init.changes_base else w
    return np.array(init.lora_a), np.array(init.lora_b), base


def aligned(a, ref, axis):
    """``a`` with each rank component's sign flipped to agree with ``ref`` (SVD / QR signs are free)."""
    signs = np.sign(np.sum(a * ref, axis=axis, keepdims=True))
    return a * signs


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_and_olora_match_peft(method):
    w = weight()
    _, pa, pb, pbase = peft_init(w, method)
    a, b, base = ours(w, method)
    np.testing.assert_allclose(base, pbase, atol=2e-6)
    np.testing.assert_allclose(aligned(a, pa, 0), pa, atol=2e-5)
    np.testing.assert_allclose(aligned(b, pb, 1), pb, atol=2e-5)


def test_pissa_niter_matches_peft_closely_and_exactly_keeps_w():
    w = weight()
    _, pa, pb, pbase = peft_init(w, "pissa_niter_4")
    a, b, base = ours(w, "pissa_niter_4", key=mx.random.key(0))
    for aa, bb, bs in ((a, b, base), (pa, pb, pbase)):  # each keeps W exactly
        np.testing.assert_allclose(bs + (ALPHA / R) * (aa @ bb).T, w, atol=2e-6)
    # both approximate exact PiSSA's residual; ours, with oversampling, at least as closely
    _, _, exact = ours(w, "pissa")
    ours_off, peft_off = np.linalg.norm(base - exact), np.linalg.norm(pbase - exact)
    print(f"pissa_niter_4 residual off the exact one: ours {ours_off:.3g}, PEFT {peft_off:.3g}")
    assert ours_off <= peft_off and ours_off < 1e-3 * np.linalg.norm(w)


def test_gaussian_matches_peft_in_distribution_and_orientation():
    w = weight(64, 512)
    _, pa, pb, _ = peft_init(w, "gaussian", r=16, alpha=32.0)
    init = init_lora(nn.Linear(512, 64), 16, 2.0, "gaussian", key=mx.random.key(0))
    a = np.array(init.lora_a)
    assert a.shape == pa.shape == (512, 16) and np.array(init.lora_b).shape == pb.shape == (16, 64)
    assert abs(a.std() / pa.std() - 1) < 0.05 and abs(pa.std() * 16 - 1) < 0.05
    assert not np.any(pb) and not np.any(np.array(init.lora_b))


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_pissa_conversion_matches_peft_save_pretrained(tmp_path):
    torch = peft_peer.import_torch()
    w = weight()
    model, a0, b0, _ = peft_init(w, "pissa")
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as plain LoRA
    model.save_pretrained(str(tmp_path / "initial"))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.add_(0.1 * torch.randn_like(lin.lora_A["default"].weight))
        lin.lora_B["default"].weight.add_(0.1 * torch.randn_like(lin.lora_B["default"].weight))
    a = lin.lora_A["default"].weight.detach().numpy().T.copy()
    b = lin.lora_B["default"].weight.detach().numpy().T.copy()
    model.peft_config["default"].init_lora_weights = "pissa"
    model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )

    theirs = read_adapters(tmp_path / "converted")[0]
    trained = AdapterSet({"lin": ModuleAdapter(mx.array(a), mx.array(b), ALPHA / R)}, init_lora_weights="pissa")
    initial = AdapterSet({"lin": ModuleAdapter(mx.array(a0), mx.array(b0), ALPHA / R)})
    mine = convert_to_lora(trained, initial)
    assert theirs.init_lora_weights is mine.init_lora_weights is True
    m, t = mine.modules["lin"], theirs.modules["lin"]
    assert (m.r, m.scale) == (t.r, t.scale) == (2 * R, ALPHA / R)  # PEFT doubles r and lora_alpha
    np.testing.assert_allclose(np.array(m.lora_a), np.array(t.lora_a), atol=1e-6)
    np.testing.assert_allclose(np.array(m.lora_b), np.array(t.lora_b), atol=1e-6)
