"""The end-to-end case: a compiled training step of a small Llama-style model, fused vs mlx-lm's layers."""

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..layers import FusedLoRALinear, plain_layer_class
from .grid import SCALE
from .timing import measure_interleaved


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
