"""`PreferenceTrainer`: DPO (sigmoid / cDPO, IPO, hinge) and ORPO on any mlx-lm model's fused LoRA, DoRA or QLoRA layers, on the generic loop.

The flow, as mlx-lm's ``lora.train_model``: load the model (``mlx_lm.load``), freeze it and
put fused LoRA (or DoRA) layers into its last ``num_layers`` blocks (`linear_to_lora_layers`;
a quantized base gets the fused QLoRA op), read the pairs (`data.load_pairs`), then
`train` hands the model, the preference loss and the pair batches to `session.run` (the
loop, checkpoints, resume, ``metrics.jsonl``) and writes the adapter in mlx-lm's format.

One step scores a ``[2B, T]`` batch (the B chosen sequences, then the B rejected ones) in
one policy forward, and, for DPO, the reference in one more forward inside the same
compiled step: by default the model with its adapters off (`reference.py`: the base
product alone in every layer, no rank-r op call), under ``stop_gradient``. With
``precompute_reference`` the reference values come from `precompute.py` instead, as inputs
of the step. ORPO has no reference.

Reproducibility as for the CSM task: the batch order is a function of ``(seed, batch
index)`` (`batching.batch_order`) and the loop re-seeds the random state per step, so a
run resumed from a checkpoint computes bit for bit what the uninterrupted run did (CPU).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ...layers import linear_to_lora_layers
from ...layers.named import DEFAULT_ADAPTER
from .. import loop, session
from ..adapter_files import check_adapter_target, start_from_adapter, write_adapter
from ..batching import batch_order, rank_share
from ..distributed import World, init_world
from ..metrics import LOSS_CURVE, METRICS
from ..plan import RunPlan, plan_steps
from ..resume import model_record, output_dir_lock, prepare_output_dir
from .data import EncodedPair, PreferenceReport, collate_pairs, load_pairs
from .logps import sequence_logps, split_pairs
from .losses import ORPO_METRICS, REWARD_METRICS, dpo_loss, orpo_loss
from .precompute import REFERENCE_CACHE, precompute_reference
from .reference import Reference, load_reference, reference_logps
from .settings import MUST_MATCH, PreferenceSettings

__all__ = ["PreferenceTrainer", "ADAPTER_FORMAT", "output_names", "expected_outputs"]

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "mlx-lm"  # adapters.safetensors + adapter_config.json, as mlx_lm.lora writes them
PAD_MULTIPLE = 16


def output_names() -> list[str]:
    """Every file a preference run writes into its folder (what ``--overwrite`` deletes)."""
    from ...adapters import get_format

    fmt = get_format(ADAPTER_FORMAT)
    return [METRICS, LOSS_CURVE, fmt.weights_file, fmt.config_file, REFERENCE_CACHE]


def _config_of(model) -> dict:
    args = getattr(model, "args", None)
    config = asdict(args) if args is not None and hasattr(args, "__dataclass_fields__") else {}
    return json.loads(json.dumps(config, default=str))


class PreferenceTrainer:
    """Preference training of an mlx-lm model with fused LoRA layers.

    ``model``: what ``mlx_lm.load`` takes (a folder or a Hugging Face name), or an already
    loaded ``(model, tokenizer)``; ``output_dir``: checkpoints, ``metrics.jsonl``, the loss
    curve, the adapter (``adapters.safetensors`` + ``adapter_config.json``). ``settings``: a
    `PreferenceSettings`. ``load_model`` loads a model (``mlx_lm.load`` by default), for
    the base and for a reference model.
    """

    def __init__(self, model, output_dir, settings: PreferenceSettings, *, world=None, progress=True, load_model=None):
        self.settings, s = settings, settings
        self.output_dir = Path(output_dir)
        self.world: World = world or init_world()
        self.progress = progress
        self.stage = "loading the model"  # what the trainer is doing, for a message on Ctrl-C
        self.last_checkpoint: Path | None = None
        if load_model is None:
            from mlx_lm import load as load_model
        self.model, self.tokenizer = load_model(str(model)) if isinstance(model, (str, Path)) else model
        mx.eval(self.model.parameters())
        self.model_record = model_record(self.model, _config_of(self.model))
        self.model.freeze()
        mx.random.seed(s.seed)  # the adapters' initialisation is part of the run's identity (mlx-lm seeds here too)
        linear_to_lora_layers(self.model, s.num_layers, s.lora_parameters, use_dora=s.fine_tune_type == "dora")
        if s.resume_adapter_file:
            start_from_adapter(self.model, s.resume_adapter_file, DEFAULT_ADAPTER, "lora_parameters, --num-layers")
        self.reference = (
            load_reference(s.reference_model_path, self.model, load_model) if s.train_mode == "dpo" else None
        )
        if s.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(self.model.layers[0])
        mx.eval(self.model.parameters())
        self.pairs: dict[str, list[EncodedPair]] = {}
        self.reports: dict[str, PreferenceReport] = {}
        self.precomputed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.plan: RunPlan | None = None

    # -- data --

    def prepare_data(self, data_dir: str | Path, splits=("train", "valid")) -> dict[str, PreferenceReport]:
        """Read ``{split}.jsonl`` of ``data_dir`` for each split (mlx-lm-lora's layout)."""
        self.stage = "reading the data"
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data {data_dir} is not a folder (one holding train.jsonl and valid.jsonl)")
        for split in splits:
            self.pairs[split], self.reports[split] = load_pairs(
                data_dir / f"{split}.jsonl", self.tokenizer, self.settings.max_seq_len
            )
        return self.reports

    def plan_run(self, batch_size: int, iters: int | None, epochs: int | None) -> RunPlan:
        """``iters`` optimizer steps when given (mlx-lm's ``--iters``), else ``epochs`` passes."""
        if "train" not in self.pairs:
            raise RuntimeError("no training data: call prepare_data(...) first")
        n, s = len(self.pairs["train"]), self.settings
        self.plan = plan_steps(n, batch_size, self.world.size, s.grad_accumulation_steps, epochs or 1, iters, "--iters")
        return self.plan

    # -- the loss --

    def loss(self, model, tokens, response_mask, *reference):
        """``(loss, metrics)`` of a ``[2B, T]`` batch; ``reference``: its precomputed ``(chosen,
        rejected)`` log-probs, else (DPO) the reference pass runs here."""
        s = self.settings
        if s.train_mode == "dpo" and not reference:
            scores = reference_logps(self.reference, model, tokens, response_mask)
            # the policy pass starts once the reference's is done, so the reference's logits and
            # their temporaries are freed before the policy's, which the backward keeps, are made
            tokens = mx.depends(tokens, scores)
            reference = split_pairs(scores)
        sums, counts = sequence_logps(model, tokens, response_mask)
        (chosen, rejected), (n_chosen, n_rejected) = split_pairs(sums), split_pairs(counts)
        if s.train_mode == "orpo":
            loss, metrics = orpo_loss(chosen, rejected, n_chosen, n_rejected, beta=s.beta)
            return loss, tuple(metrics[k] for k in ORPO_METRICS)
        loss, metrics = dpo_loss(
            chosen,
            rejected,
            *reference,
            beta=s.beta,
            loss_type=s.loss_type,
            label_smoothing=s.label_smoothing,
            chosen_tokens=n_chosen,
            rejected_tokens=n_rejected,
        )
        return loss, tuple(metrics[k] for k in REWARD_METRICS)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ORPO_METRICS if self.settings.train_mode == "orpo" else REWARD_METRICS

    def _inputs(self, split: str, rows) -> tuple:
        b = collate_pairs([self.pairs[split][i] for i in rows], PAD_MULTIPLE, self.settings.max_seq_len)
        inputs = (mx.array(b["tokens"]), mx.array(b["response_mask"]))
        if split in self.precomputed:
            chosen, rejected = self.precomputed[split]
            inputs += (mx.array(chosen[rows]), mx.array(rejected[rows]))
        return inputs

    def _batches(self, batch_size: int):
        world, seed, n = self.world, self.settings.seed, len(self.pairs["train"])

        def batch(micro: int):
            rows = rank_share(batch_order(n, batch_size * world.size, seed, micro), world.rank, world.size)
            inputs = self._inputs("train", rows)
            return inputs, float(inputs[1][:, 1:].sum())  # the response tokens the loss scores

        return batch

    def evaluate(self, batch_size: int, val_batches: int = -1, split: str = "valid") -> tuple[float, dict]:
        """Mean loss and metrics over ``split`` in order (eval mode: no dropout), its first
        ``val_batches`` batches (-1: all), weighted by pairs."""
        pairs = self.pairs.get(split) or []
        count = len(pairs) if val_batches < 0 else min(len(pairs), val_batches * batch_size)
        if count == 0:
            return float("nan"), {}
        self.model.eval()
        totals = np.zeros(1 + len(self.metric_names))
        try:
            for start in range(0, count, batch_size):
                rows = np.arange(start, min(start + batch_size, count))
                loss, metrics = self.loss(self.model, *self._inputs(split, rows))
                mx.eval(loss, metrics)
                totals += len(rows) * np.array([loss.item(), *(m.item() for m in metrics)])
        finally:
            self.model.train()
        totals /= count
        return float(totals[0]), dict(zip(self.metric_names, totals[1:].tolist(), strict=True))

    # -- the reference, computed once --

    def precompute(self, batch_size: int) -> None:
        """Every split's reference log-probs (`precompute.py`); a reference model is freed after."""
        self.stage = "computing the reference log-probs"
        model, reference = self.model, self.reference
        identity = {"model": self.model_record, "reference": [reference.kind, reference.path]}

        def score(tokens, mask):
            return reference_logps(reference, model, tokens, mask)

        def said(done: int, total: int) -> None:
            where = self.output_dir / REFERENCE_CACHE
            self.stage = f"computing the reference log-probs ({done} of {total} pairs done, kept in {where})"

        model.eval()
        try:
            self.precomputed = precompute_reference(
                self.output_dir / REFERENCE_CACHE,
                self.pairs,
                score,
                identity,
                batch_size,
                self.settings.max_seq_len,
                write=self.world.is_main,
                progress=self.progress and self.world.is_main,
                on_progress=said,
            )
        finally:
            model.train()
        if reference.kind == "model":  # its only use is over: the step needs one copy of the weights
            self.reference = Reference(reference.kind, reference.path)
            mx.clear_cache()

    # -- training --

    def _optimizer(self, plan: RunPlan):
        s = self.settings
        schedule = loop.make_schedule(s.learning_rate, plan.total_steps, s.warmup_steps, s.lr_schedule)
        cls = optim.AdamW if s.optimizer == "adamw" else optim.Adam
        optimizer = cls(learning_rate=schedule)
        optimizer.init(self.model.trainable_parameters())
        return optimizer, schedule

    def train(
        self,
        batch_size: int = 4,
        iters: int | None = 1000,
        epochs: int | None = None,
        val_every: int = 200,
        val_batches: int = 25,
        save_every: int = 100,
        report_every: int = 10,
        resume_from: str | Path | None = None,
        overwrite: bool = False,
    ) -> loop.TrainResult:
        """Train; returns the `TrainResult` (``outputs`` names every file written). Ctrl-C
        finishes the step, saves a checkpoint and returns with ``interrupted=True``; the
        output folder is locked throughout (`FolderInUseError` for a second run)."""
        s, world = self.settings, self.world
        plan = self.plan_run(batch_size, iters, epochs)
        with output_dir_lock(self.output_dir, world.is_main):
            self.stage = "setting up the run"
            resume = Path(resume_from) if resume_from else None
            prepare_output_dir(self.output_dir, resume, overwrite, world.is_main, output_names())
            check_adapter_target(self.output_dir, ADAPTER_FORMAT)  # refused now, not after training
            if world.is_main:
                log.info("%s", self.reference.describe() if self.reference else "ORPO: no reference model")
                log.info("%s; %s", self.reports["train"], f"{len(self.pairs.get('valid', []))} validation pairs")
            if s.precompute_reference:
                self.precompute(batch_size)
            optimizer, schedule = self._optimizer(plan)
            spec = session.RunSpec(
                self.output_dir,
                plan,
                batch_size,
                len(self.pairs["train"]),
                asdict(s),
                self.model_record,
                MUST_MATCH,
                "--model",
                s.grad_accumulation_steps,
                s.max_grad_norm,
                s.seed,
                val_every,
                save_every,
                report_every,
            )

            def validate() -> float:
                loss, metrics = self.evaluate(batch_size, val_batches)
                if world.is_main:
                    log.info("validation: loss %.4f, %s", loss, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                return loss

            self.stage = "training"
            result, metrics, start = session.run(
                self.model,
                optimizer,
                self.loss,
                self._batches(batch_size),
                spec,
                world=world,
                schedule=schedule,
                aux_names=self.metric_names,
                evaluate=validate if self.pairs.get("valid") and val_batches != 0 else None,
                resume_from=resume_from,
                progress=self.progress,
                on_checkpoint=self._checkpointed,
            )
            if world.is_main:
                self._finish(result, metrics, trained=result.steps > start)
            return result

    def _checkpointed(self, path: Path) -> None:
        self.last_checkpoint = path

    def _finish(self, result, metrics, trained: bool) -> None:
        """The adapter after training (or when a finished run resumed lacks it), the curve."""
        if result.checkpoint is not None:
            result.outputs.append(result.checkpoint)
        result.outputs.append(metrics.path)
        if not result.interrupted:
            files = expected_outputs(self.output_dir)
            if trained or not all(p.is_file() for p in files):
                self.stage = "writing the adapter"
                result.outputs += write_adapter(self.model, self.output_dir, ADAPTER_FORMAT, DEFAULT_ADAPTER)
        curve = metrics.plot(self.output_dir / LOSS_CURVE)
        if curve is not None:
            result.outputs.append(curve)


def expected_outputs(output_dir: Path) -> list[Path]:
    """The files a finished preference run has written into ``output_dir``."""
    from ...adapters import get_format

    fmt = get_format(ADAPTER_FORMAT)
    return [Path(output_dir) / n for n in (METRICS, fmt.weights_file, fmt.config_file)]
