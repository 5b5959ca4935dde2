"""The CSM example's files: a tiny random CSM, its tokenizer, a tiny random Mimi and a voice
dataset that fit each other, and the ``finetune`` command that trains on them.

`write_csm_example` writes them into a folder (the ``example`` command checks the arguments
and publishes the folder, `train.example`); `finetune_command` is the command it prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Example", "write_csm_example", "example_paths", "finetune_command", "TRAIN_FLAGS", "SAMPLE_PROMPT"]

# The example's training run: enough steps for the loss to fall visibly, seconds on 2 cores.
TRAIN_FLAGS = ["--max-steps", "40", "--batch-size", "4", "--learning-rate", "2e-3", "--val-every", "20"]
SAMPLE_PROMPT = "hello there"


@dataclass
class Example:
    """What `write_example` wrote (paths under its root)."""

    root: Path
    model: Path
    audio: Path
    tokenizer: str | Path  # tokenizer.json beside the model, or "byte"
    codec: Path | None
    files: list[Path] = field(default_factory=list)


def write_csm_example(
    stage: Path,
    num_files: int,
    audio_format: str,
    data_only: bool,
    width: int,
    seed: int,
    with_tokenizer: bool,
    with_mimi: bool,
    speakers: int = 1,
) -> None:
    """Write the example into ``stage``: ``data/`` (`write_synthetic_dataset`, ``audio_format``,
    ``speakers``)
    and, unless ``data_only``, ``model/`` (a BPE ``tokenizer.json`` when ``with_tokenizer``)
    and ``mimi.safetensors`` when ``with_mimi``."""
    from ..tiny_tokenizer import WORDS, write_bpe_tokenizer
    from .synthetic import small_csm_config, write_random_csm, write_random_mimi, write_synthetic_dataset

    # codes below 2048, Mimi's codebook size, so a sample decodes without clamping
    write_synthetic_dataset(
        stage / "data", num_files, 32, 2048, (24, 40), (3, 6), seed=seed, audio_format=audio_format, speakers=speakers
    )
    if data_only:
        return
    text_vocab = None
    if with_tokenizer:
        (stage / "model").mkdir()
        texts = [f"[0]{w}" for w in WORDS] + [" ".join(WORDS), f"[0]{SAMPLE_PROMPT}"]
        text_vocab = write_bpe_tokenizer(stage / "model" / "tokenizer.json", texts)
    config = small_csm_config(width, 2, **({"text_vocab_size": text_vocab} if text_vocab else {}))
    write_random_csm(stage / "model", config, seed=seed)
    if with_mimi:
        write_random_mimi(stage / "mimi.safetensors", seed=seed)


def example_paths(root: Path, data_only: bool, with_tokenizer: bool, with_mimi: bool, files: list[Path]) -> Example:
    """The `Example` of what `write_csm_example` wrote, once published under ``root``."""
    example = Example(root, root / "model", root / "data" / "audio", "byte", None, files)
    if not data_only:
        if with_tokenizer:
            example.tokenizer = example.model / "tokenizer.json"
        if with_mimi:
            example.codec = root / "mimi.safetensors"
    return example


def finetune_command(example: Example, output_dir: str | Path | None = None) -> list[str]:
    """The ``mlx-fused-lora finetune`` argv that trains on ``example`` and writes a sample."""
    cmd = ["mlx-fused-lora", "finetune", "--model-path", str(example.model), "--audio-dir", str(example.audio)]
    cmd += ["--output-dir", str(output_dir or example.root / "out")]
    if example.tokenizer == "byte":
        cmd += ["--tokenizer", "byte"]
    if example.codec is not None:
        cmd += ["--codec-path", str(example.codec)]
    return cmd + TRAIN_FLAGS + ["--generate-samples", "--sample-prompt", SAMPLE_PROMPT]
