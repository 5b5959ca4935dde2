"""`CSMLoRATrainer`: the CSM fine-tuning task (model setup, data, adapter I/O, merge, samples) on the generic loop.

The flow, as in mlx-lm's tuner: load the model (`load_csm`), put LoRA layers in
(`apply_lora`: `FusedLoRALinear`, or mlx-lm's `LoRALinear` for the baseline), build the
samples (`data.build_dataset`), then `train()` hands the model, the CSM loss and the
batches to `loop.train` with hooks for checkpoints (`checkpoint.py`), validation and
``metrics.jsonl``, and writes the outputs of ``save_mode``.

Reproducibility: the batch order is a function of ``(seed, batch index)``
(`batching.batch_order`) and the loop re-seeds the random state per step, so a run resumed
from the checkpoint of step ``s`` computes bit for bit what the uninterrupted run did
after step ``s`` on the CPU. What a kill, a NaN and a reused output folder do is
described in `checkpoint.py`, `loop.py` and `resume.py` (and the README).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from ...layers.growth import RankSchedule, adapter_rank, grow_rank, growing
from .. import loop, session
from ..batching import batch_order, rank_share
from ..distributed import World, init_world
from ..metrics import LOSS_CURVE
from ..plan import RunPlan, plan_steps
from ..resume import output_dir_lock, prepare_output_dir
from . import outputs
from .data import (
    DataReport,
    DataSpec,
    Sample,
    build_dataset,
    collate,
    split_train_val,
)
from .loss import csm_loss
from .model_setup import load_model_for_lora
from .settings import MUST_MATCH, TrainSettings
from .speakers import Speakers, add_speaker_adapters, find_speakers, speaker_loss

__all__ = ["CSMLoRATrainer", "DEFAULT_SAMPLE_PROMPT"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPT = "This is a test of the fine-tuned voice."


class CSMLoRATrainer:
    """LoRA fine-tuning of a CSM checkpoint on a directory of voice data.

    ``model_path``: a CSM checkpoint (`load_csm`: torchtune, mlx or Hugging Face layout);
    ``output_dir``: where checkpoints, metrics, the loss curve and the outputs go.
    The keyword arguments are `TrainSettings`' fields; ``tokenizer`` (a file, a directory
    or ``"byte"``) and ``codec_path`` (Mimi weights, for WAV input and WAV samples) are
    read when needed; ``drop_mismatched_data`` trains on data with more codebooks than
    the model has (the extras dropped) and skips files with codes outside its vocabulary,
    which are otherwise refused.
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
        drop_mismatched_data: bool = False,
        **settings,
    ):
        self.settings = TrainSettings(lora_r=lora_r, lora_alpha=lora_alpha, **settings)
        self.model_path = Path(model_path)
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")
        self.tokenizer_spec = tokenizer
        self.codec_path = codec_path
        self.world = world or init_world()
        self.progress = progress
        self.drop_mismatched_data = drop_mismatched_data
        self._tokenizer = None
        self._codec = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.data_report: DataReport | None = None
        self.plan: RunPlan | None = None
        self.stage = "loading the model"  # what the trainer is doing, for a message on Ctrl-C
        self.last_checkpoint: Path | None = None  # the newest checkpoint of this run (or the one resumed)
        self.speakers: Speakers | None = None  # with adapter_per_speaker: the data's, one adapter each

        self.model, self.model_record, self.lora_report = load_model_for_lora(self.model_path, self.settings)

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
            drop_mismatched=self.drop_mismatched_data,
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
        self.stage = "reading the data"
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
        if self.settings.adapter_per_speaker:
            speakers = find_speakers(samples)
            if self.speakers is None:
                add_speaker_adapters(self.model, speakers, self.settings, self.lora_report)
            elif speakers != self.speakers:
                raise ValueError(f"the data's speakers {speakers.ids} differ from the first data's {self.speakers.ids}")
            self.speakers = speakers
        self.train_samples, self.val_samples = split_train_val(samples, val_split, self.settings.seed)
        self.data_report = report
        return report

    # -- adapters --

    def save_lora_weights(self, path: str | Path, format: str = "csm-cli", name: str | None = None) -> Path:
        """Write the trained adapter (or adapter ``name``) to directory ``path`` (the original
        tool's file names by default); returns the weights file."""
        return outputs.write_lora(self.model, path, format, name or self.settings.adapter_name)[0]

    def load_lora_weights(self, path: str | Path, name: str | None = None) -> None:
        """Load adapters (csm-cli, mlx-lm or PEFT format, or a training checkpoint) into the
        model; ``name``: as that named adapter, beside the others (e.g. one per voice)."""
        outputs.load_lora(self.model, path, name)

    def save_merged_model(self, path: str | Path) -> Path:
        """The base model with the adapters folded in, as `save_csm` writes it (the model keeps
        its LoRA layers); returns the weights file."""
        return outputs.write_merged(self.model, path)[0]

    def save_outputs(self, save_mode: str, convert_to_lora: bool = False) -> list[Path]:
        """``lora``: ``fine_tuned_model.safetensors`` + ``fine_tuned_model_metadata.json``
        (``convert_to_lora``: a PiSSA / OLoRA adapter as plain LoRA of the original weights);
        ``full``: the merged model as ``model.safetensors`` + ``config.json``; ``both``.
        Returns every file written. One adapter per speaker: each in ``OUTPUT_DIR/speaker_N/``."""
        out = []
        for folder, name, _ in self._voices():
            out += outputs.write_outputs(self.model, folder, save_mode, name, convert_to_lora)
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
        adapters=None,
    ) -> Path:
        """Generate speech for ``text``: a WAV through Mimi when a codec is set, else the
        codes ``[codebooks, frames]`` as ``.npy`` beside ``output_path``. Returns the file.
        ``adapters``: the named adapters to speak with (a name, a list or {name: weight});
        None: those the model runs."""
        from .sampling import write_sample

        return write_sample(
            self.model,
            self.tokenizer,
            self.data_spec(speaker_id),
            text,
            output_path,
            codec=self.codec,
            max_frames=max_frames,
            temperature=temperature,
            top_k=top_k,
            seed=self.settings.seed,
            adapters=adapters,
        )

    # -- training --

    def _loss(self, model, tokens, mask, target, ids=None, key=None):
        """The CSM loss; with ``ids`` (one adapter per speaker) over a mixed batch (`speakers`)."""
        s = self.settings
        loss = partial(
            csm_loss,
            semantic_weight=s.semantic_weight,
            acoustic_weight=s.acoustic_weight,
            decoder_fraction=s.decoder_fraction,
        )
        if ids is None:
            return loss(model, tokens, mask, target, key=key)
        return speaker_loss(loss, len(self.speakers.ids))(model, tokens, mask, target, ids, key=key)

    def _inputs(self, samples) -> tuple:
        """A batch of ``samples`` as the loss takes it (with each row's adapter, one per speaker)."""
        b = collate(samples, self.settings.max_seq_len)
        ids = () if self.speakers is None else (mx.array(self.speakers.adapter_ids(samples)),)
        return (mx.array(b["tokens"]), mx.array(b["mask"]), mx.array(b["target"]), *ids), b

    def _batches(self, batch_size: int):
        world, seed = self.world, self.settings.seed

        def batch(micro: int):
            idx = batch_order(len(self.train_samples), batch_size * world.size, seed, micro)
            mine = rank_share(idx, world.rank, world.size)
            inputs, b = self._inputs([self.train_samples[i] for i in mine])
            return inputs, float(b["target"][:, 1:].sum())  # tokens: rows the loss is computed on

        return batch

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
                loss, _ = self._loss(self.model, *self._inputs(chunk)[0], key=key)
                total += loss.item() * len(chunk)
                count += len(chunk)
        finally:
            self.model.train()
        return total / count

    def plan_run(self, epochs: int, batch_size: int, max_steps: int | None) -> RunPlan:
        """How many steps `train` will run with these arguments (needs `prepare_data` first)."""
        if not self.train_samples:
            raise RuntimeError("no training data: call prepare_data(...) first")
        s = self.settings
        self.plan = plan_steps(
            len(self.train_samples), batch_size, self.world.size, s.grad_accumulation_steps, epochs, max_steps
        )
        return self.plan

    def _growth(self, optimizer):
        """The loop's ``prepare_step`` for ``--rank-schedule`` (`layers.growth.growing`), or None."""
        s, say = self.settings, log.info if self.world.is_main else None
        if s.rank_schedule is not None:
            schedule = RankSchedule.parse(s.rank_schedule, s.lora_r)
            return growing(self.model, schedule, optimizer, name=s.adapter_name, seed=s.seed, say=say)

    def _record(self) -> dict:
        """What a checkpoint records beyond the run's facts: the rank the adapter has grown to
        (or, one adapter per speaker, the speakers)."""
        if self.speakers is not None:
            return {"speakers": list(self.speakers.ids)}
        return {"lora_rank": adapter_rank(self.model, self.settings.adapter_name)}

    def _before_restore(self, state: dict, optimizer) -> None:
        if self.speakers is not None and state.get("speakers") != list(self.speakers.ids):
            raise ValueError(
                f"the checkpoint's run trained the adapters of speakers {state.get('speakers')}; this data's "
                f"speakers are {list(self.speakers.ids)}"
            )
        if "lora_rank" in state:  # the rank the adapter had grown to: the checkpoint's tensors have it
            grow_rank(self.model, int(state["lora_rank"]), optimizer, name=self.settings.adapter_name)

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
        overwrite: bool = False,
        convert_to_lora: bool = False,
    ) -> loop.TrainResult:
        """Train; returns the `TrainResult` (``outputs`` names every file written).

        ``max_steps`` is the run's length when given (the data cycled as needed), else
        ``epochs`` passes. Ctrl-C (SIGINT) finishes the current step, saves a checkpoint
        and returns with ``interrupted=True``. A non-finite loss or adapter raises
        `NonFiniteLossError` without saving it. ``overwrite`` lets a new run delete an
        earlier run in ``output_dir`` (refused otherwise). The output folder's lock is held
        throughout: another run into it is refused (`FolderInUseError`). A resumed run
        with no step left writes only the outputs it lacks. ``convert_to_lora`` writes a PiSSA /
        OLoRA adapter as plain LoRA of the original weights (`save_outputs`).
        """
        s, world, model = self.settings, self.world, self.model
        plan = self.plan_run(epochs, batch_size, max_steps)
        if self.speakers is not None and save_mode != "lora":
            raise ValueError(f"--save-mode {save_mode} merges one adapter; --adapter-per-speaker saves each (lora)")
        with output_dir_lock(self.output_dir, world.is_main):
            self.stage = "setting up the run"
            prepare_output_dir(
                self.output_dir,
                Path(resume_from) if resume_from else None,
                overwrite,
                world.is_main,
                outputs.output_names(self.speakers.names if self.speakers else ()),
            )
            if save_mode in ("lora", "both"):  # refused now, not after training
                for folder, _, _ in self._voices():
                    outputs.check_lora_target(folder)
            if world.is_main:  # after the CLI's first line, the run's plan
                log.info("%s", self.lora_report)
                log.info(
                    "%s; %d train / %d validation", self.data_report, len(self.train_samples), len(self.val_samples)
                )
            warmup = s.warmup_steps if s.warmup_steps is not None else int(0.05 * plan.total_steps)
            schedule = loop.make_schedule(s.learning_rate, plan.total_steps, warmup, s.lr_schedule)
            optimizer = optim.AdamW(learning_rate=schedule, weight_decay=s.weight_decay)
            optimizer.init(model.trainable_parameters())
            spec = session.RunSpec(
                self.output_dir,
                plan,
                batch_size,
                len(self.train_samples),
                asdict(s),
                self.model_record,
                MUST_MATCH,
                "--model-path",
                s.grad_accumulation_steps,
                s.max_grad_norm,
                s.seed,
                val_every,
                save_every,
            )
            self.stage = "training"
            result, metrics, start = session.run(
                model,
                optimizer,
                self._loss,
                self._batches(batch_size),
                spec,
                world=world,
                schedule=schedule,
                aux_names=("semantic", "acoustic"),
                evaluate=(lambda: self.evaluate(batch_size)) if self.val_samples else None,
                resume_from=resume_from,
                progress=self.progress,
                on_checkpoint=self._checkpointed,
                prepare_step=self._growth(optimizer),
                record=self._record,
                before_restore=self._before_restore,
            )
            if world.is_main:
                self._finish(
                    result,
                    metrics,
                    result.steps > start,
                    save_mode,
                    generate_samples,
                    sample_prompt,
                    speaker_id,
                    convert_to_lora,
                )
            return result

    def _checkpointed(self, path: Path) -> None:
        self.last_checkpoint = path

    def _voices(self, speaker_id: int = 0) -> list[tuple[Path, str, int]]:
        """(folder, adapter, speaker id) of each trained adapter: the output folder, or a folder per speaker."""
        if self.speakers is None:
            return [(self.output_dir, self.settings.adapter_name, speaker_id)]
        return self.speakers.voices(self.output_dir)

    def _finish(
        self, result, metrics, trained, save_mode, generate_samples, sample_prompt, speaker_id, convert_to_lora
    ) -> None:
        """The outputs after the loop: all of them after training; only the missing ones when a
        finished run was resumed (its sample is not generated again); none when interrupted."""
        if result.checkpoint is not None:
            result.outputs.append(result.checkpoint)
        result.outputs.append(metrics.path)
        if not result.interrupted:
            voices = self._voices(speaker_id)
            names = self.speakers.names if self.speakers else ()
            model_files = outputs.expected_outputs(self.output_dir, save_mode, False, False, names)
            if trained or not all(p.is_file() for p in model_files):
                self.stage = "writing the outputs"
                result.outputs += self.save_outputs(save_mode, convert_to_lora)
            for folder, name, speaker in voices if generate_samples else ():
                if trained or not outputs.sample_file(folder, self.codec is not None).is_file():
                    self.stage = "generating the sample"
                    use = name if self.speakers else None  # one speaker's, or all the model runs
                    result.outputs.append(
                        self.generate_sample(sample_prompt, speaker, folder / outputs.SAMPLE, adapters=use)
                    )
        curve = metrics.plot(self.output_dir / LOSS_CURVE)
        if curve is not None:
            result.outputs.append(curve)
