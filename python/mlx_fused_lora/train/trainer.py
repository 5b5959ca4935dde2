"""`CSMLoRATrainer`: LoRA fine-tuning of CSM, compiled, checkpointed and resumable.

The flow, as in mlx-lm's tuner: load the model (`load_csm`), put LoRA layers in
(`apply_lora`: `FusedLoRALinear`, or mlx-lm's `LoRALinear` for the baseline), build the
samples (`data.build_dataset`), then `train()` runs one compiled step per optimizer step
(gradient accumulation over micro-batches, AdamW with decoupled weight decay, global-norm
clipping, warmup + schedule), validates, logs ``metrics.jsonl``, checkpoints and writes
the outputs of ``save_mode``.

Reproducibility, which is what makes resume exact: the batch order is a function of
``(seed, batch index)`` (`data.batch_order`), and before each optimizer step the MLX random
state is re-seeded from ``(seed, step, rank)``; the compiled step threads that state, so
LoRA dropout keys and the decoder's frame choice are a function of the step too. (MLX
0.32's ``mx.random.state`` cannot be assigned from Python, so re-seeding is how it is
restored; the checkpoint records the key for inspection.) A run resumed from the
checkpoint of step ``s`` therefore computes bit for bit what the uninterrupted run did
after step ``s`` on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from ..csm import CSM, apply_lora, load_csm, save_csm
from ..csm.lora import freeze_all_but_lora, lora_dropout_p, lora_layers
from ..layers import plain_layer_class
from .checkpoint import TrainingCheckpointError, atomic_write_dir, load_checkpoint, save_checkpoint
from .data import (
    DataReport,
    DataSpec,
    Sample,
    Segment,
    batch_order,
    build_dataset,
    collate,
    frame_turn,
    split_train_val,
)
from .distributed import World, init_world
from .loss import csm_loss
from .plot import write_loss_png

__all__ = [
    "TrainSettings",
    "TrainResult",
    "NonFiniteLossError",
    "CSMLoRATrainer",
    "use_plain_lora_layers",
    "make_schedule",
]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPT = "This is a test of the fine-tuned voice."


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """Everything that shapes the optimization (recorded in every checkpoint)."""

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: Sequence[str] = ("q_proj", "v_proj")
    target_layers: Sequence[int] | None = None
    lora_bias: bool = False
    learning_rate: float = 1e-4
    semantic_weight: float = 100.0
    acoustic_weight: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None  # None: 5% of the run's steps
    lr_schedule: str = "cosine"
    grad_accumulation_steps: int = 1
    decoder_fraction: float = 1 / 16
    seed: int = 42
    max_seq_len: int = 2048
    grad_checkpoint: bool = False
    lora_layer: str = "fused"  # "fused" | "plain" (mlx-lm's LoRALinear: the baseline)

    def __post_init__(self):
        if self.lora_layer not in ("fused", "plain"):
            raise ValueError(f"lora_layer must be 'fused' or 'plain', got {self.lora_layer!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if self.grad_accumulation_steps < 1:
            raise ValueError("grad_accumulation_steps must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.decoder_fraction <= 1.0:
            raise ValueError(f"decoder_fraction must be in (0, 1], got {self.decoder_fraction}")
        self.target_modules = list(self.target_modules)
        if self.target_layers is not None:
            self.target_layers = [int(i) for i in self.target_layers]


@dataclass
class TrainResult:
    steps: int = 0
    final_loss: float = float("nan")
    val_loss: float | None = None
    steps_per_s: float = 0.0
    step_time_s: float = 0.0  # mean wall time of a step, compile steps excluded
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    interrupted: bool = False
    losses: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def use_plain_lora_layers(model: nn.Module, train_bias: bool = False) -> None:
    """Swap every LoRA layer for the plain (mlx-lm) one, same base, adapters and scale."""
    cls = plain_layer_class()
    swapped = []
    for name, layer in lora_layers(model):
        plain = cls.from_base(layer.linear, r=layer.lora_a.shape[1], dropout=lora_dropout_p(layer), scale=layer.scale)
        plain.lora_a, plain.lora_b = layer.lora_a, layer.lora_b
        swapped.append((name, plain))
    model.update_modules(tree_unflatten(swapped))
    freeze_all_but_lora(model, train_bias=train_bias)


def make_schedule(lr: float, total_steps: int, warmup_steps: int, kind: str):
    """Linear warmup from 0 over ``warmup_steps``, then ``kind`` decay to the end."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        main = optim.cosine_decay(lr, decay_steps, end=lr * 0.1)
    elif kind == "linear":
        main = optim.linear_schedule(lr, lr * 0.1, decay_steps)
    else:
        main = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731
    if warmup_steps <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def grad_checkpoint_blocks(model: CSM) -> None:
    """Recompute each transformer block in the backward pass instead of storing it.

    The instances get a subclass whose ``__call__`` runs under ``mx.checkpoint`` (only
    this model's blocks change; the mask and cache travel by closure, not as inputs).
    """
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            base = type(block)
            if getattr(base, "_checkpointed", False):
                continue

            def __call__(self, x, mask=None, cache=None, _call=base.__call__):
                def inner(params, x):
                    self.update(params)
                    return _call(self, x, mask, cache)

                return mx.checkpoint(inner)(self.trainable_parameters(), x)

            block.__class__ = type(
                f"Checkpointed{base.__name__}", (base,), {"__call__": __call__, "_checkpointed": True}
            )


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, step, rank]).integers(0, 2**31 - 1))


class _Progress:
    """One status line (rewritten in place on a terminal, logged every ~5% otherwise)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 20)

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{step}/{self.total}] {text}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.total:
            log.info("%s", line)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class CSMLoRATrainer:
    """LoRA fine-tuning of a CSM checkpoint on a directory of voice data.

    ``model_path``: a CSM checkpoint (`load_csm`: torchtune, mlx or Hugging Face layout);
    ``output_dir``: where checkpoints, metrics, the loss curve and the outputs go.
    The keyword arguments are `TrainSettings`' fields; ``tokenizer`` (a file, a directory
    or ``"byte"``) and ``codec_path`` (Mimi weights, for WAV input and WAV samples) are
    read when needed.
    """

    def __init__(
        self,
        model_path: str | Path,
        output_dir: str | Path,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        *,
        tokenizer: None | str | Path = None,
        codec_path: None | str | Path = None,
        world: World | None = None,
        progress: bool = True,
        **settings,
    ):
        self.settings = TrainSettings(lora_r=lora_r, lora_alpha=lora_alpha, **settings)
        self.model_path = Path(model_path)
        self.output_dir = Path(output_dir)
        self.tokenizer_spec = tokenizer
        self.codec_path = codec_path
        self.world = world or init_world()
        self.progress = progress
        self._tokenizer = None
        self._codec = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.data_report: DataReport | None = None

        s = self.settings
        self.model = load_csm(self.model_path)
        mx.random.seed(s.seed)  # the adapters' initialisation is part of the run's identity
        self.lora_report = apply_lora(
            self.model,
            s.target_modules,
            s.target_layers,
            r=s.lora_r,
            alpha=s.lora_alpha,
            dropout=s.lora_dropout,
            bias=s.lora_bias,
        )
        if s.lora_layer == "plain":
            use_plain_lora_layers(self.model, train_bias=s.lora_bias)
        if s.grad_checkpoint:
            grad_checkpoint_blocks(self.model)
        mx.eval(self.model.parameters())
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    # -- tokenizer, codec, data --

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.tokenizer_spec, self.model_path)
        return self._tokenizer

    @property
    def codec(self):
        if self._codec is None and self.codec_path is not None:
            from .audio import MimiCodec

            self._codec = MimiCodec(self.codec_path, self.model.config.audio_num_codebooks)
        return self._codec

    def data_spec(self, speaker_id: int = 0, context_turns: int = 2) -> DataSpec:
        cfg = self.model.config
        return DataSpec(
            num_codebooks=cfg.audio_num_codebooks,
            audio_vocab_size=cfg.audio_vocab_size,
            text_vocab_size=cfg.text_vocab_size,
            max_seq_len=self.settings.max_seq_len,
            context_turns=context_turns,
            speaker_id=speaker_id,
        )

    def prepare_data(
        self,
        audio_dir: str | Path,
        transcript_dir: None | str | Path = None,
        alignment_dir: None | str | Path = None,
        speaker_id: int = 0,
        context_turns: int = 2,
        val_split: float = 0.1,
    ) -> DataReport:
        """Build the samples and the seeded train/validation split; returns the data report."""
        samples, report = build_dataset(
            audio_dir,
            self.tokenizer,
            self.data_spec(speaker_id, context_turns),
            transcript_dir,
            alignment_dir,
            codec=self.codec,
        )
        if not samples:
            raise ValueError(f"no usable training samples in {audio_dir}: {report}")
        self.train_samples, self.val_samples = split_train_val(samples, val_split, self.settings.seed)
        self.data_report = report
        if self.world.is_main:
            log.info("%s; %d train / %d validation", report, len(self.train_samples), len(self.val_samples))
        return report

    # -- adapters --

    def save_lora_weights(self, path: str | Path, format: str = "csm-cli") -> Path:
        """Write the adapters to directory ``path`` (the original tool's file names by default)."""
        from ..adapters import save_adapters

        moved = atomic_write_dir(path, lambda tmp: save_adapters(self.model, tmp, format=format))
        return next(p for p in moved if p.suffix == ".safetensors")

    def load_lora_weights(self, path: str | Path) -> None:
        """Load adapters (csm-cli, mlx-lm or PEFT format, or a training checkpoint) into the model."""
        path = Path(path)
        if (path / "manifest.json").exists() or (path / "checkpoints").is_dir() or path.name.startswith("step_"):
            adapters, _, _ = load_checkpoint(path)
            self.model.load_weights(list(adapters.items()), strict=False)
        else:
            from ..adapters import load_adapters

            load_adapters(self.model, path)
        mx.eval(self.model.parameters())

    def save_merged_model(self, path: str | Path) -> Path:
        """The base model with the adapters folded in, as `save_csm` writes it (the model keeps its LoRA layers)."""
        layers = lora_layers(self.model)
        fused = [(name, layer.fuse()) for name, layer in layers]
        self.model.update_modules(tree_unflatten(fused))
        try:
            moved = atomic_write_dir(path, lambda tmp: save_csm(self.model, tmp))
        finally:
            self.model.update_modules(tree_unflatten(list(layers)))
        return next(p for p in moved if p.suffix == ".safetensors")

    def save_outputs(self, save_mode: str) -> list[Path]:
        """``lora``: ``fine_tuned_model.safetensors`` + ``fine_tuned_model_metadata.json``;
        ``full``: the merged model as ``model.safetensors`` + ``config.json``; ``both``."""
        if save_mode not in ("lora", "full", "both"):
            raise ValueError(f"save_mode must be lora, full or both, got {save_mode!r}")
        out = []
        if save_mode in ("lora", "both"):
            out.append(self.save_lora_weights(self.output_dir))
        if save_mode in ("full", "both"):
            out.append(self.save_merged_model(self.output_dir))
        return out

    # -- samples --

    def generate_sample(
        self,
        text: str,
        speaker_id: int = 0,
        output_path: str | Path = "sample.wav",
        max_frames: int = 125,
        temperature: float = 0.9,
        top_k: int = 50,
    ) -> Path:
        """Generate speech for ``text``: a WAV through Mimi when a codec is set, else the
        codes ``[codebooks, frames]`` as ``.npy`` beside ``output_path``. Returns the file."""
        from ..csm import generate

        spec = self.data_spec(speaker_id)
        tokens, mask, _ = frame_turn(
            Segment(text, speaker_id, np.zeros((spec.num_codebooks, 0), np.int32)), self.tokenizer, spec
        )
        # frame_turn appends an end-of-audio frame; a prompt ends with its text rows
        n_text = int(mask[:, -1].sum())
        tokens, mask = tokens[:n_text], mask[:n_text]
        limit = self.model.config.backbone.max_seq_len - n_text
        codes = generate(
            self.model,
            mx.array(tokens)[None],
            mx.array(mask)[None],
            min(max_frames, limit),
            temperature=temperature,
            top_k=top_k,
            seed=self.settings.seed,
        )
        codes = np.array(codes[0]).T  # [codebooks, frames]
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if self.codec is not None:
            from .audio import SAMPLE_RATE, write_wav

            return write_wav(output_path, self.codec.decode(codes), SAMPLE_RATE)
        codes_path = output_path.with_suffix(".npy")
        np.save(codes_path, codes)
        log.info("no codec (--codec-path): wrote the sample's Mimi codes to %s", codes_path)
        return codes_path

    # -- training --

    def _loss(self, model, tokens, mask, target, key=None):
        s = self.settings
        return csm_loss(
            model,
            tokens,
            mask,
            target,
            semantic_weight=s.semantic_weight,
            acoustic_weight=s.acoustic_weight,
            decoder_fraction=s.decoder_fraction,
            key=key,
        )

    def _build_step(self, optimizer):
        model, s, world = self.model, self.settings, self.world
        value_and_grad = nn.value_and_grad(model, self._loss)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(tokens, mask, target, prev_grad, do_update):
            (loss, (semantic, acoustic)), grad = value_and_grad(model, tokens, mask, target)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            norm = mx.array(0.0)
            if do_update:
                if world.size > 1:
                    grad = nn.average_gradients(grad, group=world.group)
                if s.grad_accumulation_steps > 1:
                    grad = tree_map(lambda g: g / s.grad_accumulation_steps, grad)
                if s.max_grad_norm > 0:
                    grad, norm = optim.clip_grad_norm(grad, s.max_grad_norm)
                optimizer.update(model, grad)
                grad = None
            return loss, semantic, acoustic, norm, grad

        return step

    def _batch(self, micro: int, batch_size: int) -> dict:
        world = self.world
        idx = batch_order(len(self.train_samples), batch_size * world.size, self.settings.seed, micro)
        mine = idx[world.rank :: world.size]
        if len(mine) == 0:  # a last partial global batch smaller than the world
            mine = idx[:1]
        b = collate([self.train_samples[i] for i in mine], self.settings.max_seq_len)
        return {k: mx.array(v) for k, v in b.items()}

    def evaluate(self, batch_size: int) -> float:
        """Mean validation loss (eval mode: no dropout; a fixed decoder-row choice)."""
        if not self.val_samples:
            return float("nan")
        self.model.eval()
        key = mx.random.key(self.settings.seed)
        total, count = 0.0, 0
        try:
            for i in range(0, len(self.val_samples), batch_size):
                chunk = self.val_samples[i : i + batch_size]
                b = {k: mx.array(v) for k, v in collate(chunk, self.settings.max_seq_len).items()}
                loss, _ = self._loss(self.model, b["tokens"], b["mask"], b["target"], key=key)
                total += loss.item() * len(chunk)
                count += len(chunk)
        finally:
            self.model.train()
        return total / count

    def _trainer_state(self, step: int, batch_size: int, micro_per_epoch: int) -> dict:
        micro = step * self.settings.grad_accumulation_steps
        return {
            "step": step,
            "epoch": micro // micro_per_epoch,
            "batch_in_epoch": micro % micro_per_epoch,
            "micro_batches_done": micro,
            "batch_size": batch_size,
            "world_size": self.world.size,
            "num_train_samples": len(self.train_samples),
            "rng_key": [int(v) for v in np.array(mx.random.state[0]).reshape(-1)],
            "settings": asdict(self.settings),
        }

    def _restore(self, path, optimizer, batch_size: int) -> int:
        adapters, opt_state, state = load_checkpoint(path)
        trainable = dict(tree_flatten(self.model.trainable_parameters()))
        missing = sorted(set(trainable) - set(adapters))
        if missing:
            raise TrainingCheckpointError(f"checkpoint {state['checkpoint_dir']} lacks adapters {missing[:3]}...")
        self.model.load_weights(list(adapters.items()), strict=False)

        def restored(path_, value):
            if path_ not in opt_state:
                raise TrainingCheckpointError(f"checkpoint {state['checkpoint_dir']} lacks optimizer state {path_}")
            return opt_state[path_]

        optimizer.state = tree_map_with_path(restored, optimizer.state)
        mx.eval(self.model.parameters(), optimizer.state)
        for name, now in (
            ("num_train_samples", len(self.train_samples)),
            ("batch_size", batch_size),
            ("world_size", self.world.size),
        ):
            if state.get(name) != now:
                log.warning(
                    "resuming with %s = %s, the checkpoint had %s: the data order differs from the interrupted run",
                    name,
                    now,
                    state.get(name),
                )
        old = state.get("settings", {})
        changed = {k: (old.get(k), v) for k, v in asdict(self.settings).items() if old.get(k) != v and k in old}
        changed = {k: v for k, v in changed.items() if not (isinstance(v[0], list) and list(v[0]) == list(v[1] or []))}
        if changed:
            log.warning("resuming with changed settings %s", changed)
        log.info("resumed from %s at step %d", state["checkpoint_dir"], state["step"])
        return int(state["step"])

    def train(
        self,
        epochs: int = 5,
        batch_size: int = 2,
        val_every: int = 100,
        save_every: int = 500,
        resume_from: None | str | Path = None,
        save_mode: str = "lora",
        max_steps: int | None = None,
        generate_samples: bool = False,
        sample_prompt: str = DEFAULT_SAMPLE_PROMPT,
        speaker_id: int = 0,
    ) -> TrainResult:
        """Train; returns the `TrainResult`. Needs `prepare_data` first.

        Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and returns with
        ``interrupted=True``. A non-finite loss raises `NonFiniteLossError` without saving.
        """
        if not self.train_samples:
            raise RuntimeError("no training data: call prepare_data(...) first")
        s, world, model = self.settings, self.world, self.model
        A = s.grad_accumulation_steps
        micro_per_epoch = -(-len(self.train_samples) // (batch_size * world.size))
        total_steps = -(-epochs * micro_per_epoch // A)
        if max_steps is not None:
            total_steps = min(total_steps, max_steps) if epochs else max_steps
        warmup = s.warmup_steps if s.warmup_steps is not None else int(0.05 * total_steps)
        schedule = make_schedule(s.learning_rate, total_steps, warmup, s.lr_schedule)
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=s.weight_decay)
        optimizer.init(model.trainable_parameters())
        model.train()

        start = self._restore(resume_from, optimizer, batch_size) if resume_from else 0
        ckpt_root = self.output_dir / "checkpoints"
        metrics_path = self.output_dir / "metrics.jsonl"
        metrics = _Metrics(metrics_path, start, enabled=world.is_main)
        step_fn = self._build_step(optimizer)
        result = TrainResult(steps=start)
        progress = _Progress(total_steps, self.progress and world.is_main)

        stop = {"now": False}
        previous_handler = None
        try:
            previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("now", True))
        except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
            pass

        mx.reset_peak_memory()
        timed_steps, timed_s, timed_rows, seen_shapes = 0, 0.0, 0.0, set()
        val_loss = None
        try:
            for step in range(start, total_steps):
                if stop["now"]:
                    result.interrupted = True
                    break
                t0 = time.perf_counter()
                mx.random.seed(_step_seed(s.seed, step, world.rank))
                grad, shapes, losses = None, [], []
                for a in range(A):
                    b = self._batch(step * A + a, batch_size)
                    shapes.append(tuple(b["tokens"].shape))
                    loss, semantic, acoustic, norm, grad = step_fn(
                        b["tokens"], b["mask"], b["target"], grad, a == A - 1
                    )
                    mx.eval(loss, semantic, acoustic, norm, grad, model.state, optimizer.state)
                    rows = b["target"][:, 1:].sum()
                    losses.append((loss, semantic, acoustic, rows))
                loss = world.mean(mx.mean(mx.stack([l[0] for l in losses]))).item()
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {loss} at step {step + 1}; stopping without saving. The last good "
                        f"checkpoint is in {ckpt_root} (resume with --resume-from and a lower --learning-rate "
                        "or --max-grad-norm)"
                    )
                rows_n = float(sum(l[3].item() for l in losses)) * world.size
                new_shape = any(sh not in seen_shapes for sh in shapes)
                seen_shapes.update(shapes)
                if not new_shape:  # steps that compiled a new graph are not timed
                    timed_steps, timed_s, timed_rows = timed_steps + 1, timed_s + dt, timed_rows + rows_n
                done = step + 1
                lr = float(schedule(mx.array(step)))
                entry = {
                    "step": done,
                    "loss": loss,
                    "semantic": world.mean(mx.mean(mx.stack([l[1] for l in losses]))).item(),
                    "acoustic": world.mean(mx.mean(mx.stack([l[2] for l in losses]))).item(),
                    "learning_rate": lr,
                    "grad_norm": norm.item(),
                    "step_time_s": dt,
                    "tokens_per_s": rows_n / dt,
                    "peak_memory_mb": mx.get_peak_memory() / 2**20,
                }
                metrics.write(entry)
                result.losses.append((done, loss))
                result.steps, result.final_loss = done, loss
                progress.update(
                    done,
                    f"loss {loss:.4f} lr {lr:.2e} {entry['tokens_per_s']:.0f} tok/s "
                    f"peak {entry['peak_memory_mb']:.0f} MiB",
                )
                if val_every and done % val_every == 0 and self.val_samples:
                    val_loss = self.evaluate(batch_size)
                    metrics.write({"step": done, "val_loss": val_loss})
                    log.info("step %d: validation loss %.4f", done, val_loss)
                if save_every and done % save_every == 0 and done < total_steps:
                    self._checkpoint(ckpt_root, done, optimizer, batch_size, micro_per_epoch)
        finally:
            progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

        if result.interrupted:
            log.info("interrupted: saving a checkpoint at step %d", result.steps)
        if result.steps > start or result.interrupted:
            self._checkpoint(ckpt_root, result.steps, optimizer, batch_size, micro_per_epoch)
        if not result.interrupted:
            if self.val_samples and (val_loss is None or not val_every or result.steps % val_every):
                val_loss = self.evaluate(batch_size)
                metrics.write({"step": result.steps, "val_loss": val_loss})
            if world.is_main:
                result.outputs = self.save_outputs(save_mode)
                if generate_samples:
                    result.outputs.append(
                        self.generate_sample(sample_prompt, speaker_id, self.output_dir / "sample.wav")
                    )
        result.val_loss = val_loss
        result.peak_memory_mb = mx.get_peak_memory() / 2**20
        if timed_steps:
            result.step_time_s = timed_s / timed_steps
            result.steps_per_s = timed_steps / timed_s
            result.tokens_per_s = timed_rows / timed_s
        if world.is_main:
            metrics.plot(self.output_dir / "loss_curve.png")
        return result

    def _checkpoint(self, root: Path, step: int, optimizer, batch_size: int, micro_per_epoch: int) -> None:
        if not self.world.is_main:
            return
        adapters = dict(tree_flatten(self.model.trainable_parameters()))
        opt_state = dict(tree_flatten(optimizer.state))
        path = save_checkpoint(root, step, adapters, opt_state, self._trainer_state(step, batch_size, micro_per_epoch))
        log.info("checkpoint %s", path)


class _Metrics:
    """``metrics.jsonl`` (one JSON object per line); a resumed run drops lines after its step."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if e.get("step", 0) <= start_step:
                    kept.append(line)
                    self._remember(e)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(k + "\n" for k in kept))

    def _remember(self, e: dict) -> None:
        if "loss" in e:
            self.train.append((e["step"], e["loss"]))
        if "val_loss" in e:
            self.val.append((e["step"], e["val_loss"]))

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        self._remember(entry)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def plot(self, path: Path) -> None:
        if self.train:
            write_loss_png(path, self.train, self.val)
