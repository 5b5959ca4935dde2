"""``mlx-fused-lora example DIR``: a tiny model, tokenizer, codec and dataset that fit each
other, and the ``finetune`` command that trains on them; no downloads.

What ``DIR`` gets::

    DIR/
      model/config.json         a random CSM: CSM-1B's token layout (32 codebooks, audio
      model/model.safetensors   vocabulary 2051) at a tiny width, text vocabulary = the tokenizer's
      model/tokenizer.json      a byte-level BPE (Llama-3's special tokens); finetune finds it
                                beside the weights
      mimi.safetensors          a tiny random Mimi (24 kHz, 12.5 frames/s, 32 codebooks of 2048)
      data/audio/clip_000.wav   16 kHz tones, one per word
      data/transcripts/clip_000.txt
      data/alignments/clip_000.json   word timings in seconds

The tokenizer needs the ``tokenizers`` package and the Mimi needs mlx-audio; both come with
``pip install ".[audio]"``. Without them the example falls back to what needs neither: the
byte tokenizer (``--tokenizer byte``) and pre-encoded codes (``data/audio/clip_000.npy``),
and ``finetune`` then writes the sample as codes (``sample.npy``) instead of ``sample.wav``.
The printed command always matches what was written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cli_args import DefaultsOnceFormatter

__all__ = ["Example", "write_example", "finetune_command", "main"]

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


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def write_example(
    root: str | Path,
    num_files: int = 16,
    audio_format: str | None = None,
    data_only: bool = False,
    width: int = 64,
    seed: int = 0,
) -> Example:
    """Write the example under ``root`` (created; must be empty if it exists).

    ``audio_format``: ``"wav"``, ``"codes"`` or ``"mixed"`` (see `write_synthetic_dataset`);
    default ``"wav"`` when mlx-audio is installed, else ``"codes"``. ``data_only``: just
    ``root/data``. ``width``: the backbone width (the decoder is half).
    """
    from .synthetic import (
        WORDS,
        small_csm_config,
        write_bpe_tokenizer,
        write_random_csm,
        write_random_mimi,
        write_synthetic_dataset,
    )

    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"example directory {root} exists and is not empty: pass a new or empty directory")
    if num_files < 2:
        raise ValueError(f"num_files must be at least 2 (one for validation), got {num_files}")
    has_mimi = _have("mlx_audio")
    audio_format = audio_format or ("wav" if has_mimi else "codes")
    if audio_format != "codes" and not has_mimi and not data_only:
        raise ImportError(f"--format {audio_format} needs mlx-audio to encode the WAVs: pip install '.[audio]'")
    # codes below 2048, Mimi's codebook size, so a sample decodes without clamping
    audio = write_synthetic_dataset(
        root / "data", num_files, 32, 2048, (24, 40), (3, 6), seed=seed, audio_format=audio_format
    )
    example = Example(root, root / "model", audio, "byte", None)
    if not data_only:
        tokenizer_path = root / "model" / "tokenizer.json"
        text_vocab = None
        if _have("tokenizers"):
            root.joinpath("model").mkdir(parents=True)
            texts = [f"[0]{w}" for w in WORDS] + [" ".join(WORDS), f"[0]{SAMPLE_PROMPT}"]
            text_vocab = write_bpe_tokenizer(tokenizer_path, texts)
            example.tokenizer = tokenizer_path
        config = small_csm_config(width, 2, **({"text_vocab_size": text_vocab} if text_vocab else {}))
        write_random_csm(example.model, config, seed=seed)
        if has_mimi:
            example.codec = write_random_mimi(root / "mimi.safetensors", seed=seed)
    example.files = sorted(p for p in root.rglob("*") if p.is_file())
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-fused-lora example",
        description="Write a tiny random CSM, a tokenizer, a tiny random Mimi and a small dataset that fit "
        "each other, and print the finetune command that trains a LoRA adapter on them and writes a sample. "
        "No downloads.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("dir", help="directory to write (new or empty)")
    p.add_argument("--files", type=int, default=16, help="recordings in the dataset (each becomes two turns)")
    p.add_argument(
        "--format",
        choices=["wav", "codes", "mixed"],
        default=None,
        help="audio files: WAV (needs mlx-audio's Mimi to train), pre-encoded Mimi codes (.npy), "
        "or mixed (even files WAV, odd files codes) (default: wav with mlx-audio installed, else codes)",
    )
    p.add_argument("--data-only", action="store_true", help="write only DIR/data (no model, tokenizer or Mimi)")
    p.add_argument("--width", type=int, default=64, help="backbone width of the random CSM (the decoder is half)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    args = p.parse_args(argv)
    try:
        ex = write_example(args.dir, args.files, args.format, args.data_only, args.width, args.seed)
    except (FileExistsError, ValueError, ImportError) as e:
        print(f"mlx-fused-lora example: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(ex.files)} files under {ex.root}:")
    if not args.data_only:
        tok = ex.tokenizer if ex.tokenizer == "byte" else f"{ex.tokenizer} (found beside the weights)"
        print(f"  model      {ex.model} (random CSM, 32 codebooks, audio vocabulary 2051)")
        print(f"  tokenizer  {tok}")
        print(f"  codec      {ex.codec or 'none (no mlx-audio): the sample is written as Mimi codes, sample.npy'}")
    print(f"  dataset    {ex.audio.parent} (audio/, transcripts/, alignments/)")
    if not args.data_only:
        print("\ntrain a LoRA adapter on it and generate a sample:\n")
        print("  " + shlex.join(finetune_command(ex)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
