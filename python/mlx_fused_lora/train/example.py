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
The printed command always matches what was written. ``--llm`` writes a tiny mlx-lm Llama,
SFT chats and preference pairs instead (`lm_example`) and prints the ``lm_lora`` commands.

Every argument is checked before anything is written, each bad one refused in one line
naming it, what was expected and what was given. The files are written into a temporary
folder beside ``DIR`` and moved into place at the end, so an error (a full disk, an
unwritable target, Ctrl-C) leaves no half-written example. ``DIR`` must be new or empty;
``--overwrite`` replaces an earlier example there (a folder holding only what ``example``
writes, like the repository's ``examples/``), keeping the entries this run does not write.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from .cli_args import DefaultsOnceFormatter, OneLineErrorParser
from .csm.example import Example, example_paths, finetune_command, write_csm_example

__all__ = ["Example", "write_example", "finetune_command", "check_arguments", "main"]

# What an example folder may hold: the entries `write_example` writes (CSM or LLM).
EXAMPLE_ENTRIES = {"data", "model", "mimi.safetensors", "preference"}
FORMATS = ("wav", "codes", "mixed")
MAX_FILES = 10_000


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_arguments(root, num_files, audio_format, data_only, width, seed, *, overwrite=False, llm=False) -> str | None:
    """Every argument of `write_example`, checked before anything is written: raises
    ValueError (FileExistsError for the folder, ImportError for a missing package) naming
    the argument, the expected and the given value. Returns the audio format to write."""
    from .lm_example import LLM_WIDTHS

    low, high = LLM_WIDTHS
    checks = [
        ("--files", _int(num_files) and 2 <= num_files <= MAX_FILES, f"an integer from 2 to {MAX_FILES}", num_files),
        (
            "--width",
            _int(width) and width % 16 == 0 and low <= width <= high,
            f"a multiple of 16 from {low} to {high}",
            width,
        ),
        ("--seed", _int(seed) and 0 <= seed < 2**32, "an integer from 0 to 2**32 - 1", seed),
        ("--format", audio_format in (None, *FORMATS), f"one of {', '.join(FORMATS)}", audio_format),
    ]
    for name, ok, expected, got in checks:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {got!r}")
    if llm and audio_format is not None:
        raise ValueError(f"--format is the CSM example's audio; --llm writes text data, got --format {audio_format}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"example directory {root} exists and is not a directory")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(
            f"example directory {root} exists and is not empty: pass a new or empty directory "
            "(or --overwrite to replace an earlier example there)"
        )
    foreign = [e for e in entries if e not in EXAMPLE_ENTRIES]
    if foreign:
        raise FileExistsError(
            f"--overwrite replaces an earlier example, but {root} also holds {foreign[:3]}: not an example folder"
        )
    if llm:
        if not data_only and not (_have("mlx_lm") and _have("tokenizers")):
            raise ImportError('--llm writes an mlx-lm model: pip install "mlx-fused-lora[lm]"')
        return None
    has_mimi = _have("mlx_audio")
    audio_format = audio_format or ("wav" if has_mimi else "codes")
    if audio_format != "codes" and not has_mimi and not data_only:
        raise ImportError(f"--format {audio_format} needs mlx-audio to encode the WAVs: pip install '.[audio]'")
    return audio_format


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None if it does)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            return missing
        missing = p
    return missing


def publish(root: Path, write, overwrite: bool = False) -> list[Path]:
    """Run ``write(stage)`` in a temporary folder beside ``root``, then move its entries
    into ``root`` (replacing those of the same name with ``overwrite``); returns the files
    moved. On any error nothing written remains, folders made for ``root`` included."""
    root = Path(os.path.abspath(root))
    created = _first_missing(root)
    blocking = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"cannot write the example into {root}: {blocking} is a file")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as e:
        raise OSError(f"cannot write the example into {root}: {e.strerror or e}") from None
    try:
        write(stage)
        root.mkdir(exist_ok=True)
        moved = []
        for entry in sorted(stage.iterdir()):
            target = root / entry.name
            if overwrite and target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
            moved += [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        return sorted(moved)
    except BaseException as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, RuntimeError):  # MLX reports a failed write (a full disk) as a RuntimeError
            raise OSError(f"cannot write the example into {root}: {e}") from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_example(
    root: str | Path,
    num_files: int = 16,
    audio_format: str | None = None,
    data_only: bool = False,
    width: int = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
    speakers: int = 1,
) -> Example:
    """Write the CSM example under ``root`` (created; must be new or empty, or hold an earlier
    example with ``overwrite``); see `csm.example.write_csm_example` for what it holds.

    ``audio_format``: ``"wav"``, ``"codes"`` or ``"mixed"``; default ``"wav"`` when mlx-audio
    is installed, else ``"codes"``. ``data_only``: just ``root/data``. ``width``: the
    backbone width (the decoder is half). ``speakers``: transcripts tagged with that many speakers
    (``[0]``, ``[1]``, ... in turn; for ``finetune --adapter-per-speaker``). Arguments are checked
    first (`check_arguments`); the files appear all at once (`publish`).
    """
    audio_format = check_arguments(root, num_files, audio_format, data_only, width, seed, overwrite=overwrite)
    if not _int(speakers) or not 1 <= speakers <= num_files:
        raise ValueError(f"--speakers must be an integer from 1 to --files ({num_files}), got {speakers!r}")
    with_tokenizer, with_mimi = _have("tokenizers"), _have("mlx_audio")
    files = publish(
        Path(root),
        lambda stage: write_csm_example(
            stage, num_files, audio_format, data_only, width, seed, with_tokenizer, with_mimi, speakers
        ),
        overwrite,
    )
    return example_paths(Path(root), data_only, with_tokenizer, with_mimi, files)


def write_llm_example(root, num_files=32, data_only=False, width=64, seed=0, *, overwrite=False):
    """The LLM example (`lm_example.write_lm_example`), checked and published as `write_example`'s."""
    from .lm_example import lm_example_at, write_lm_example

    check_arguments(root, num_files, None, data_only, width, seed, overwrite=overwrite, llm=True)
    root = Path(root)
    files = publish(root, lambda stage: write_lm_example(stage, num_files, width, seed, data_only), overwrite)
    return lm_example_at(root, files)


def _print_csm(ex: Example, data_only: bool) -> None:
    print(f"wrote {len(ex.files)} files under {ex.root}:")
    if not data_only:
        tok = ex.tokenizer if ex.tokenizer == "byte" else f"{ex.tokenizer} (found beside the weights)"
        print(f"  model      {ex.model} (random CSM, 32 codebooks, audio vocabulary 2051)")
        print(f"  tokenizer  {tok}")
        print(f"  codec      {ex.codec or 'none (no mlx-audio): the sample is written as Mimi codes, sample.npy'}")
    print(f"  dataset    {ex.audio.parent} (audio/, transcripts/, alignments/)")
    if not data_only:
        print("\ntrain a LoRA adapter on it and generate a sample:\n")
        print("  " + shlex.join(finetune_command(ex)))


def _print_llm(ex, data_only: bool) -> None:
    from .lm_example import lm_lora_command, preference_command

    print(f"wrote {len(ex.files)} files under {ex.root}:")
    if not data_only:
        print(f"  model      {ex.model} (random mlx-lm Llama, byte-level BPE tokenizer with a chat template)")
    print(f"  dataset    {ex.data} (train.jsonl, valid.jsonl, test.jsonl: chats in mlx-lm's format)")
    print(f"  pairs      {ex.preference} (train.jsonl, valid.jsonl: prompt, chosen, rejected)")
    if not data_only:
        print("\nfine-tune it with LoRA through mlx-lm's trainer on fused layers:\n")
        print("  " + shlex.join(lm_lora_command(ex)))
        print("\nor with DPO on the pairs (its reference: the same model, adapters off):\n")
        print("  " + shlex.join(preference_command(ex)))


def main(argv=None) -> int:
    p = OneLineErrorParser(
        prog="mlx-fused-lora example",
        description="Write a tiny random CSM, a tokenizer, a tiny random Mimi and a small dataset that fit "
        "each other, and print the finetune command that trains a LoRA adapter on them and writes a sample "
        "(with --llm: a tiny mlx-lm Llama, chat data and preference pairs, and the lm_lora commands). No downloads.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("dir", help="directory to write (new or empty)")
    p.add_argument(
        "--llm",
        action="store_true",
        help="a tiny mlx-lm Llama, tokenizer, SFT chats and preference pairs for lm_lora (needs [lm])",
    )
    p.add_argument(
        "--files",
        type=int,
        default=None,
        help="recordings in the dataset (each becomes two turns) (default: 16; with --llm: training chats and pairs, default 32)",
    )
    p.add_argument(
        "--format",
        default=None,
        help=f"audio files: {', '.join(FORMATS)}: WAV (needs mlx-audio's Mimi to train), pre-encoded Mimi codes "
        "(.npy), or mixed (even files WAV, odd files codes) (default: wav with mlx-audio installed, else codes)",
    )
    p.add_argument("--data-only", action="store_true", help="write only DIR/data (no model, tokenizer or Mimi)")
    p.add_argument("--width", type=int, default=64, help="backbone width of the random model (the CSM decoder is half)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument(
        "--speakers",
        type=int,
        default=1,
        help="tag the transcripts with this many speakers, [0], [1], ... in turn (for finetune --adapter-per-speaker)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier example in DIR (a folder holding only an example)"
    )
    args = p.parse_args(argv)
    try:
        if args.llm:
            if args.speakers != 1:
                raise ValueError(
                    f"--speakers tags the CSM example's transcripts; --llm writes text data, got {args.speakers}"
                )
            files = 32 if args.files is None else args.files
            if args.format is not None:
                check_arguments(args.dir, files, args.format, args.data_only, args.width, args.seed, llm=True)
            ex = write_llm_example(args.dir, files, args.data_only, args.width, args.seed, overwrite=args.overwrite)
            _print_llm(ex, args.data_only)
        else:
            files = 16 if args.files is None else args.files
            ex = write_example(
                args.dir,
                files,
                args.format,
                args.data_only,
                args.width,
                args.seed,
                overwrite=args.overwrite,
                speakers=args.speakers,
            )
            _print_csm(ex, args.data_only)
    except (OSError, ValueError, ImportError) as e:
        print(f"mlx-fused-lora example: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
