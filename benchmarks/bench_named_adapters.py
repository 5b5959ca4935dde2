"""Many adapters on one model: stacked in one op call vs separate passes, switched off vs the base, hot swap vs reload.

    MLX_FUSED_LORA_FAST_BLAS=1 pytest benchmarks/bench_named_adapters.py --benchmark-only \\
        --benchmark-json benchmarks/results/cpu-named-adapters.json
    python benchmarks/bench_named_adapters.py benchmarks/results/cpu-named-adapters.json --write

The model is a stack of ``DEPTH`` square linear layers of width ``WIDTH`` (tanh between
them), ``TOKENS`` rows of x, float32, eval mode (no dropout): the forward of a model
whose every projection carries the adapters, without attention or norms around them.

- ``stacked``: n adapters of rank ``R`` active on every layer (`set_adapter`), run as one
  fused op per layer over the concatenated rank, against the same work as n separate LoRA
  passes: the base product once plus each adapter's ``s (x A) B`` in plain MLX, PEFT's loop.
- ``reference``: the model with its adapters switched off (`disable_adapters`), against the
  bare base model (plain ``nn.Linear`` layers); target <= 1.02x.
- ``hotswap``: `hotswap_adapter` of a rank-``R`` adapter from disk, against reloading the
  model as mlx-lm's server does when the adapter changes (the model built, its safetensors
  read and assigned, the adapter loaded); target < 1 %. Its model is an mlx-lm Llama with
  Llama-3.2-1B's block shape (CSM's backbone) but 4 layers, bfloat16 (about 0.6 GB), the
  adapter on ``q_proj`` and ``v_proj`` as `finetune`'s default targets.

Each case alternates the two sides round by round (the peer runs in pytest-benchmark's
untimed setup and is timed here), so a burst of load on a shared machine hits both.
"""

import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn

WIDTH, DEPTH, TOKENS, R = 1024, 4, 256, 16
# The hot-swap case's model: Llama-3.2-1B's block shape (CSM's backbone), 4 of its 16 layers,
# bfloat16, its adapter on q_proj and v_proj (finetune's default targets).
SWAP_LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
SWAP_LAYERS, SWAP_VOCAB = 4, 32000
SWAP_CONFIG = {"rank": R, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
STACKS = (1, 2, 4)
ROUNDS = 7
TARGETS = {"reference_over_base": 1.02, "hotswap_over_reload": 0.01}
CONFIG = {"rank": R, "scale": 2.0, "keys": [r"layers.\d+"]}  # every layer of the stack


class Stack(nn.Module):
    def __init__(self, width=WIDTH, depth=DEPTH):
        super().__init__()
        self.layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]

    def __call__(self, x):
        for layer in self.layers:
            x = mx.tanh(layer(x))
        return x


def base_model(width=WIDTH, depth=DEPTH):
    mx.random.seed(0)
    model = Stack(width, depth)
    for layer in model.layers:
        layer.weight = layer.weight / 4
    mx.eval(model.parameters())
    return model


def adapted(n, width=WIDTH, depth=DEPTH):
    """The base model with n rank-R adapters on every layer, lora_b random (so they count)."""
    from mlx_fused_lora.adapters import add_adapter, set_adapter
    from mlx_fused_lora.layers import lora_layers
    from mlx_fused_lora.layers.named import holders

    model = base_model(width, depth)
    for i in range(n):
        add_adapter(model, f"a{i}", CONFIG)
    for _, layer in lora_layers(model):
        for h in holders(layer).values():
            h.lora_b = 0.01 * mx.random.normal(h.lora_b.shape)
    set_adapter(model, [f"a{i}" for i in range(n)])
    model.eval()
    mx.eval(model.parameters())
    return model


def separate_passes(model):
    """PEFT's loop over the same layers and adapters: the base product, then one LoRA pass each."""
    from mlx_fused_lora.layers import lora_layers
    from mlx_fused_lora.layers.named import holders

    layers = [layer for _, layer in lora_layers(model)]

    def forward(x):
        for layer in layers:
            y = layer.linear(x)
            for h in holders(layer).values():
                y = y + h.scale * ((x @ h.lora_a) @ h.lora_b)
            x = mx.tanh(y)
        return x

    return forward


def timed(fn, times):
    def run():
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)

    return run


def alternate(benchmark, ours, peer, **info):
    ours()  # warm-up
    peer()
    peer_times = []
    benchmark.pedantic(ours, setup=timed(peer, peer_times), rounds=ROUNDS, warmup_rounds=0, iterations=1)
    from mlx_fused_lora.fast_blas import active_blas

    benchmark.extra_info.update(info, peer_times_s=peer_times, peer_min_s=min(peer_times), blas=active_blas())


def x_input():
    x = mx.random.normal((TOKENS, WIDTH), key=mx.random.key(1))
    mx.eval(x)
    return x


def test_stacked_vs_separate_passes(benchmark, n):
    model, x = adapted(n), x_input()
    peer = separate_passes(model)
    benchmark.group = f"stacked n={n}"
    alternate(benchmark, lambda: mx.eval(model(x)), lambda: mx.eval(peer(x)), case="stacked", n=n)


def test_reference_vs_base(benchmark):
    from mlx_fused_lora.adapters import disable_adapters

    model, base, x = adapted(2), base_model(), x_input()

    def reference():
        with disable_adapters(model):
            mx.eval(model(x))

    benchmark.group = "reference"
    alternate(benchmark, reference, lambda: mx.eval(base(x)), case="reference")


def swap_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", num_hidden_layers=SWAP_LAYERS, vocab_size=SWAP_VOCAB, rms_norm_eps=1e-5, **SWAP_LLAMA
    )
    return llama.Model(args)


def test_hotswap_vs_reload(benchmark, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_fused_lora.adapters import add_adapter, hotswap_adapter, load_adapters, save_adapters

    mx.random.seed(0)
    model = swap_model()
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    weights = tmp_path / "model.safetensors"
    mx.save_safetensors(str(weights), dict(tree_flatten(model.parameters())))
    add_adapter(model, "voice", SWAP_CONFIG)
    adapter = save_adapters(model, tmp_path / "adapter", name="voice").parent
    model.eval()

    def reload():
        fresh = swap_model()
        fresh.load_weights(str(weights))
        load_adapters(fresh, adapter, name="voice")
        mx.eval(fresh.parameters())

    def swap():
        hotswap_adapter(model, adapter, "voice")
        mx.eval(model.parameters())

    benchmark.group = "hotswap"
    alternate(benchmark, swap, reload, case="hotswap", model_mib=weights.stat().st_size / 2**20)


def pytest_generate_tests(metafunc):
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", STACKS, ids=[f"n{n}" for n in STACKS])


# -- the report: python benchmarks/bench_named_adapters.py RESULTS.json [--write] --


def ratios(path):
    """The figures the README reads, from a pytest-benchmark JSON file of these cases."""
    with open(path) as f:
        data = json.load(f)
    out = {
        "shape": {"width": WIDTH, "depth": DEPTH, "tokens": TOKENS, "rank": R},
        "swap_model": {**SWAP_LLAMA, "layers": SWAP_LAYERS, "vocab": SWAP_VOCAB, "rank": R},
        "stacked": [],
    }
    for bench in data["benchmarks"]:
        info, ours = bench["extra_info"], bench["stats"]["min"]
        peer = info["peer_min_s"]
        out["blas"] = info["blas"]
        if info["case"] == "stacked":
            out["stacked"].append(dict(n=info["n"], stacked_s=ours, separate_s=peer, separate_over_stacked=peer / ours))
        elif info["case"] == "reference":
            out["reference"] = dict(reference_s=ours, base_s=peer, reference_over_base=ours / peer)
        elif info["case"] == "hotswap":
            out["hotswap"] = dict(
                hotswap_s=ours, reload_s=peer, hotswap_over_reload=ours / peer, model_mib=info["model_mib"]
            )
    out["stacked"].sort(key=lambda row: row["n"])
    out["targets"] = {
        "reference_over_base": [TARGETS["reference_over_base"], out["reference"]["reference_over_base"]],
        "hotswap_over_reload": [TARGETS["hotswap_over_reload"], out["hotswap"]["hotswap_over_reload"]],
    }
    return out


def main(argv):
    path = argv[0]
    summary = ratios(path)
    lines = [f"stack of {DEPTH} x {WIDTH}-wide linears, {TOKENS} tokens, rank {R} each, float32, forward"]
    for row in summary["stacked"]:
        lines.append(
            f"  {row['n']} adapters: stacked {row['stacked_s'] * 1e3:.2f} ms, separate passes "
            f"{row['separate_s'] * 1e3:.2f} ms ({row['separate_over_stacked']:.2f}x)"
        )
    ref, swap = summary["reference"], summary["hotswap"]
    lines.append(f"  adapters off / base model: {ref['reference_over_base']:.3f}x (target <= 1.02)")
    lines.append(
        f"  hot swap {swap['hotswap_s'] * 1e3:.2f} ms / reload {swap['reload_s'] * 1e3:.1f} ms of a "
        f"{swap['model_mib']:.0f} MiB model: {100 * swap['hotswap_over_reload']:.2f} % (target < 1 %)"
    )
    print("\n".join(lines))
    if "--write" in argv:
        with open(path) as f:
            data = json.load(f)
        data["summary"] = summary
        data["printed"] = "\n".join(lines)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
