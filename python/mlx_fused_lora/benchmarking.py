"""The cases the benchmark suite, ``mlx-fused-lora bench`` and the demo measure, defined once.

Each case is a zero-argument callable that runs one forward, or one forward and
backward, and evaluates it. The kinds, side by side on the same inputs:

- ``fused``: FusedLoRALinear (the fused op);
- the peers, in plain MLX:
  - ``plain``: the layer as mlx-lm writes it (mlx-lm's own ``LoRALinear`` when
    installed, else ``PlainLoRALinear``, a faithful copy of its forward);
  - ``plain_compiled``: the same plain layer under ``mx.compile`` (random state
    threaded through, as mlx-lm's trainer does);
  - ``plain_addmm``: ``AddmmLoRALinear`` below, the layer written as well as plain
    MLX allows (adapters cast to x's dtype, no float32 promotion of x, the LoRA term
    accumulated onto the base product by ``addmm``);
- ``limit``: what no LoRA layer can beat: the base GEMM ``x @ W.T`` alone
  (forward) and the two GEMMs ``x @ W.T``, ``dY @ W`` (forward and backward), on
  the CPU through the same BLAS the extension links, elsewhere through MLX.

Forward and backward takes the gradients of x, lora_a and lora_b for a given
output cotangent, as training the adapters of any but the first layer does.

The grid (shapes x dtypes x dropout x pass), the interleaved measurement, the
ratios and the end-to-end training step live here too, so the pytest suite
(``benchmarks/``) and the CLI (``bench.py``) are two runners of the same cases.
"""

import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ._extension import _ext
from .layers import FusedLoRALinear, plain_layer_class

KINDS = ("fused", "plain", "plain_compiled", "plain_addmm", "limit")
PEERS = ("plain", "plain_compiled", "plain_addmm")
PASSES = ("forward", "forward_backward")
DROPOUTS = (0.0, 0.1)
SCALE = 2.0

# The issue's grid. Shapes are M x K x N with K = N, and the LoRA rank r.
FULL_M = (512, 2048, 8192)
FULL_KN = (1024, 2048, 4096)
FULL_R = (8, 16, 64)

# Targets from the core-op issue, checked where the grid has their shape:
# fused / limit per pass, and fused peak memory at p = 0.1 over p = 0.
TARGET_SHAPE = (2048, 2048, 2048, 16, "float32")
TARGETS = {
    ("forward", "time"): 1.10,
    ("forward_backward", "time"): 1.15,
    ("forward_backward", "memory"): 1.01,
}

# On Linux the plain peers run MLX's bundled reference BLAS at ~2 GFLOP/s on this
# CPU: the full peer grid would take about ten hours there. By default on the CPU
# the peers run only where the base GEMM is at most this many GFLOP
# (2 * 512 * 2048 * 2048 or 2 * 2048 * 1024 * 1024, ~1-2 s a call); the fused op
# and the limit run on every shape. 0 means no cap (the default elsewhere).
CPU_PEER_MAX_GFLOP = 4.3


@dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    r: int

    @property
    def gflop(self):
        """GFLOP of the base forward GEMM, 2 M K N."""
        return 2 * self.m * self.k * self.n / 1e9

    @property
    def label(self):
        return f"{self.m}x{self.k}x{self.n} r{self.r}"


@dataclass(frozen=True)
class Group:
    """One side-by-side comparison: every kind in `kinds` on the same inputs."""

    shape: Shape
    dtype: str
    dropout: float
    pass_name: str
    kinds: tuple


def full_shapes():
    return [Shape(m, kn, kn, r) for m in FULL_M for kn in FULL_KN for r in FULL_R]


def quick_shapes():
    # One LLM-width layer: the four peers and the limit in about a minute on 2 cores.
    return [Shape(512, 1024, 1024, 16)]


def parse_shape(text):
    """'MxKxNxR' (or 'MxKxN' with r = 16) -> Shape."""
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) == 3:
        parts.append(16)
    if len(parts) != 4 or min(parts) < 1:
        raise ValueError(f"shape {text!r}: expected MxKxNxR with positive integers, e.g. 512x1024x1024x16")
    return Shape(*parts)


def device_dtypes(device=None):
    """fp32 on the CPU; bf16 and fp16 on a GPU."""
    device = mx.default_device() if device is None else device
    return ("float32",) if device == mx.cpu else ("bfloat16", "float16")


def default_peer_max_gflop(device=None):
    device = mx.default_device() if device is None else device
    return CPU_PEER_MAX_GFLOP if device == mx.cpu else 0.0


def grid(shapes, dtypes, dropouts=DROPOUTS, passes=PASSES, peer_max_gflop=0.0):
    """The groups to measure, shape-major so each shape's inputs are made once."""
    groups = []
    for shape in shapes:
        with_peers = not peer_max_gflop or shape.gflop <= peer_max_gflop
        kinds = KINDS if with_peers else ("fused", "limit")
        for dtype in dtypes:
            for p in dropouts:
                for pass_name in passes:
                    groups.append(Group(shape, dtype, float(p), pass_name, kinds))
    return groups


class AddmmLoRALinear(FusedLoRALinear):
    """Benchmark peer, not a product layer: LoRA as well as plain MLX can write it.

    Same parameters as mlx-lm's ``LoRALinear``, but: the adapters are cast to x's
    dtype (bf16 x is never promoted to a float32 copy), dropout is one boolean mask
    and one ``where`` (its 1/(1-p) folded into the scale), and the LoRA term is
    accumulated onto the base product by ``addmm`` (no separate M x N sum). What is
    left between it and the fused op is what plain MLX cannot avoid: the mask and
    dropped copy of x, and the autodiff's stored intermediates.
    """

    def __call__(self, x):
        weight = self.linear.weight
        if "bias" in self.linear:
            base = mx.addmm(self.linear.bias, x, weight.T)
        else:
            base = x @ weight.T
        p = self.dropout if self.training else 0.0
        alpha = self.scale
        if p > 0:
            keep = mx.random.bernoulli(1 - p, x.shape)
            x = mx.where(keep, x, mx.array(0, dtype=x.dtype))
            alpha = self.scale / (1 - p)
        h = x @ self.lora_a.astype(x.dtype)
        return mx.addmm(base, h, self.lora_b.astype(x.dtype), alpha=alpha)


def make_inputs(m, k, n, r, dtype=mx.float32, seed=0):
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    mx.random.seed(seed)
    arrays = dict(
        x=mx.random.normal((m, k)).astype(dtype),
        weight=(mx.random.normal((n, k)) / k**0.5).astype(dtype),
        # Adapters stay float32, as mlx-lm keeps them.
        lora_a=mx.random.normal((k, r)) / k**0.5,
        lora_b=mx.random.normal((r, n)) / r**0.5,
        cotangent=mx.random.normal((m, n)).astype(dtype),
    )
    mx.eval(arrays)
    return arrays


def layer_from_inputs(cls, inputs, dropout, scale=SCALE):
    """A `cls` layer holding make_inputs' weight and adapters, in training mode."""
    k = inputs["x"].shape[-1]
    n, r = inputs["lora_b"].shape[1], inputs["lora_b"].shape[0]
    layer = cls(k, n, r=r, dropout=dropout, scale=scale)
    layer.linear.weight = inputs["weight"]
    layer.lora_a, layer.lora_b = inputs["lora_a"], inputs["lora_b"]
    layer.train()
    return layer


def _layer_passes(layer, inputs, compiled=False):
    x, ct = inputs["x"], inputs["cotangent"]

    def apply(x, lora_a, lora_b):
        layer.lora_a, layer.lora_b = lora_a, lora_b
        return layer(x)

    def forward(x):
        return layer(x)

    def forward_backward(x, lora_a, lora_b, ct):
        return mx.vjp(apply, [x, lora_a, lora_b], [ct])

    if compiled:
        # Dropout draws from the global random state: thread it, as mlx-lm's trainer does.
        state = [mx.random.state]
        forward = mx.compile(forward, inputs=state, outputs=state)
        forward_backward = mx.compile(forward_backward, inputs=state, outputs=state)

    a, b = inputs["lora_a"], inputs["lora_b"]
    return {
        "forward": lambda: mx.eval(forward(x)),
        "forward_backward": lambda: mx.eval(forward_backward(x, a, b, ct)),
    }


def _limit_passes(inputs):
    x, w, ct = inputs["x"], inputs["weight"], inputs["cotangent"]
    if mx.default_device() == mx.cpu:

        def base():
            return _ext.blas_matmul(x, w, transpose_b=True)

        def input_grad():
            return _ext.blas_matmul(ct, w)
    else:

        def base():
            return x @ w.T

        def input_grad():
            return ct @ w

    return {
        "forward": lambda: mx.eval(base()),
        "forward_backward": lambda: mx.eval(base(), input_grad()),
    }


def cases(inputs, dropout, scale=SCALE, kinds=KINDS):
    """{kind: {"forward": fn, "forward_backward": fn}} for each kind in `kinds`."""
    builders = {
        "fused": lambda: _layer_passes(layer_from_inputs(FusedLoRALinear, inputs, dropout, scale), inputs),
        "plain": lambda: _layer_passes(layer_from_inputs(plain_layer_class(), inputs, dropout, scale), inputs),
        "plain_compiled": lambda: _layer_passes(
            layer_from_inputs(plain_layer_class(), inputs, dropout, scale), inputs, compiled=True
        ),
        "plain_addmm": lambda: _layer_passes(layer_from_inputs(AddmmLoRALinear, inputs, dropout, scale), inputs),
        "limit": lambda: _limit_passes(inputs),
    }
    return {kind: builders[kind]() for kind in kinds}


def timed_call(fn):
    """(seconds, peak bytes MLX held, inputs included) of one evaluated call."""
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    fn()
    mx.synchronize()
    return time.perf_counter() - start, mx.get_peak_memory()


# The fused op and the limit are a few per cent apart, so each gets at least this
# many rounds, whatever they cost; a peer 10-100x slower than fused gets as many
# as fit in the budget, at least one.
MIN_ROUNDS = {"fused": 3, "limit": 3}


def rounds_for(first_seconds, budget_s, max_rounds, min_rounds=1):
    """Timed rounds after the warm-up: as many as fit in budget_s, min_rounds to max_rounds."""
    fit = int(budget_s / max(first_seconds, 1e-9))
    return max(1, min(max_rounds, max(min_rounds, fit)))


def measure_interleaved(fns, budget_s=2.0, max_rounds=10, min_rounds=None):
    """{name: {time_s, times_s, peak_memory, rounds}} for zero-argument callables.

    One warm-up each, then the rounds interleaved (a, b, c, a, b, c, ...) so that a
    burst of load on a shared machine lands on every case alike. time_s is the
    best round; peak_memory the smallest peak of the timed rounds. min_rounds:
    {name: at least this many rounds} (default MIN_ROUNDS).
    """
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    warm = {name: timed_call(fn)[0] for name, fn in fns.items()}
    rounds = {name: rounds_for(warm[name], budget_s, max_rounds, min_rounds.get(name, 1)) for name in fns}
    times = {name: [] for name in fns}
    peaks = {name: [] for name in fns}
    for i in range(max(rounds.values(), default=0)):
        for name, fn in fns.items():
            if i < rounds[name]:
                seconds, peak = timed_call(fn)
                times[name].append(seconds)
                peaks[name].append(peak)
    return {
        name: dict(
            time_s=min(times[name]),
            times_s=times[name],
            warmup_s=warm[name],
            peak_memory=min(peaks[name]),
            rounds=rounds[name],
        )
        for name in fns
    }


def measure_group(group, inputs, budget_s=2.0, max_rounds=10):
    """Records (one dict per kind) of one group, measured side by side."""
    fns = {kind: passes[group.pass_name] for kind, passes in cases(inputs, group.dropout, kinds=group.kinds).items()}
    results = measure_interleaved(fns, budget_s, max_rounds)
    shape = group.shape
    return [
        dict(
            m=shape.m,
            k=shape.k,
            n=shape.n,
            r=shape.r,
            dtype=group.dtype,
            dropout=group.dropout,
            pass_name=group.pass_name,
            kind=kind,
            **result,
        )
        for kind, result in results.items()
    ]


def calibration_gemm_s(dtype=None, rounds=5):
    """Best time of the 2048^3 base GEMM through the limit path: a load gauge.

    Measured at the start and the end of a run: if it moved, the machine was busy
    and the run's absolute times (not only its ratios) are suspect.
    """
    dtype = dtype or device_dtypes()[0]
    inputs = make_inputs(2048, 2048, 2048, 16, dtype)
    return best_time(_limit_passes(inputs)["forward"], rounds)


def peak_memory(fn):
    """Peak bytes MLX holds while fn runs (its inputs included)."""
    fn()  # warm up: compile caches, allocator
    return timed_call(fn)[1]


def best_time(fn, rounds=3):
    """The fastest of `rounds` runs after one warm-up, in seconds."""
    fn()
    return min(timed_call(fn)[0] for _ in range(rounds))


# ---- ratios: the same for both runners ----


def _group_key(record):
    return (
        record["m"],
        record["k"],
        record["n"],
        record["r"],
        record["dtype"],
        record["pass_name"],
        float(record["dropout"]),
    )


def ratio_rows(records):
    """One row per group: fused / limit, peer / fused, peak MiB of each kind."""
    groups = {}
    for record in records:
        groups.setdefault(_group_key(record), {})[record["kind"]] = record
    rows = []
    for key, kinds in sorted(groups.items()):
        if not {"fused", "limit"} <= kinds.keys():
            continue
        m, k, n, r, dtype, pass_name, p = key
        fused = kinds["fused"]
        row = dict(
            m=m,
            k=k,
            n=n,
            r=r,
            dtype=dtype,
            pass_name=pass_name,
            dropout=p,
            fused_over_limit=fused["time_s"] / kinds["limit"]["time_s"],
            memory_mib={kind: rec["peak_memory"] / 2**20 for kind, rec in kinds.items()},
        )
        for peer in PEERS:
            if peer in kinds:
                row[f"{peer}_over_fused"] = kinds[peer]["time_s"] / fused["time_s"]
                row[f"{peer}_over_limit"] = kinds[peer]["time_s"] / kinds["limit"]["time_s"]
        at_p0 = groups.get((m, k, n, r, dtype, pass_name, 0.0), {}).get("fused")
        if p > 0 and at_p0:
            row["fused_memory_over_p0"] = fused["peak_memory"] / at_p0["peak_memory"]
        rows.append(row)
    return rows


def target_misses(rows):
    """Lines naming each target the rows of the target shape miss."""
    misses = []
    for row in rows:
        if (row["m"], row["k"], row["n"], row["r"], row["dtype"]) != TARGET_SHAPE:
            continue
        for (pass_name, what), bound in TARGETS.items():
            if pass_name != row["pass_name"]:
                continue
            value = row["fused_over_limit"] if what == "time" else row.get("fused_memory_over_p0")
            if value is not None and value > bound:
                misses.append(f"{pass_name} p={row['dropout']}: {what} ratio {value:.3f} > {bound}")
    return misses


def format_ratio_table(rows):
    """The ratio table as lines of text (times: best rounds; memory: MLX's peak, MiB)."""

    def ratio(row, name):
        return f"{row[name]:.2f}x" if name in row else "-"

    def mib(row, kind):
        return f"{row['memory_mib'][kind]:.1f}" if kind in row["memory_mib"] else "-"

    header = (
        f"{'M x K x N  r':<20}{'dtype':<9}{'pass':<8}{'p':>4}{'fused/limit':>12}"
        f"{'plain/fused':>12}{'compiled/f':>11}{'addmm/f':>9}"
        f"{'MiB: fused':>11}{'plain':>7}{'compiled':>9}{'addmm':>7}{'limit':>7}"
    )
    lines = [header]
    for row in rows:
        label = f"{row['m']}x{row['k']}x{row['n']} {row['r']}"
        pass_label = "fwd" if row["pass_name"] == "forward" else "fwd+bwd"
        lines.append(
            f"{label:<20}{row['dtype']:<9}{pass_label:<8}{row['dropout']:>4}"
            f"{row['fused_over_limit']:>11.3f}x{ratio(row, 'plain_over_fused'):>12}"
            f"{ratio(row, 'plain_compiled_over_fused'):>11}{ratio(row, 'plain_addmm_over_fused'):>9}"
            f"{mib(row, 'fused'):>11}{mib(row, 'plain'):>7}{mib(row, 'plain_compiled'):>9}"
            f"{mib(row, 'plain_addmm'):>7}{mib(row, 'limit'):>7}"
        )
    return lines


# ---- the end-to-end case: a training step of a small Llama-style model ----


@dataclass(frozen=True)
class TinyLlamaConfig:
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    vocab: int
    batch: int
    seq: int
    r: int = 16
    dropout: float = 0.1

    @property
    def tokens(self):
        return self.batch * self.seq


E2E_QUICK = TinyLlamaConfig(dim=256, layers=2, heads=4, mlp_dim=688, vocab=1024, batch=2, seq=128)
E2E_FULL = TinyLlamaConfig(dim=512, layers=4, heads=8, mlp_dim=1376, vocab=2048, batch=4, seq=128)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads)

    def __call__(self, x):
        b, t, d = x.shape

        def split(y):
            return y.reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = self.rope(q), self.rope(k)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.dim)
        self.self_attn = _Attention(config.dim, config.heads)
        self.post_attention_layernorm = nn.RMSNorm(config.dim)
        self.mlp = _MLP(config.dim, config.mlp_dim)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """A small Llama-style decoder (mlx-lm's module names), for the end-to-end case."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab, config.dim)
        self.layers = [_Block(config) for _ in range(config.layers)]
        self.norm = nn.RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab, bias=False)

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def lora_model(config, layer_cls, seed=0):
    """TinyLlama with the same base weights for any layer_cls, every projection adapted."""
    mx.random.seed(seed)
    model = TinyLlama(config)
    model.freeze()
    for block in model.layers:
        for part_name, names in PROJECTIONS:
            part = getattr(block, part_name)
            for name in names:
                setattr(
                    part,
                    name,
                    layer_cls.from_base(getattr(part, name), r=config.r, dropout=config.dropout, scale=SCALE),
                )
    model.train()
    mx.eval(model.parameters())
    return model


def training_step(config, layer_cls, seed=0):
    """A zero-argument callable: one compiled training step (loss, grads, Adam), evaluated."""
    model = lora_model(config, layer_cls, seed)
    optimizer = optim.Adam(learning_rate=1e-4)
    mx.random.seed(seed + 1)
    tokens = mx.random.randint(0, config.vocab, (config.batch, config.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model, inputs, targets):
        logits = model(inputs)
        return nn.losses.cross_entropy(logits, targets, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets):
        loss, grads = loss_and_grad(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    def run():
        mx.eval(step(inputs, targets), state)

    return run


def measure_end_to_end(config, budget_s=4.0, max_rounds=10):
    """Tokens per second and peak memory of a training step, fused vs mlx-lm's layers."""
    plain_cls = plain_layer_class()
    fns = {"fused": training_step(config, FusedLoRALinear), "plain": training_step(config, plain_cls)}
    results = measure_interleaved(fns, budget_s, max_rounds)
    for result in results.values():
        result["tokens_per_s"] = config.tokens / result["time_s"]
    return dict(
        config=dict(config.__dict__, tokens=config.tokens),
        plain_layer=f"{plain_cls.__module__}.{plain_cls.__name__}",
        results=results,
        speedup=results["plain"]["time_s"] / results["fused"]["time_s"],
        memory_ratio=results["plain"]["peak_memory"] / results["fused"]["peak_memory"],
    )
