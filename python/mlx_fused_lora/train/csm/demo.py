"""``mlx-fused-lora demo``: the main job, end to end, on a tiny random CSM; no downloads.

A random CSM (CSM-1B's token layout at a small width: 32 Mimi codebooks, a 2051-entry audio
vocabulary) is saved to a temporary directory; a synthetic voice dataset is written there
as files (codes, transcripts, word timings) and read back through the trainer's data path;
the model is then fine-tuned twice from the same start, same data order, same seed: with
`FusedLoRALinear` and with mlx-lm-style plain LoRA layers (mlx-lm's ``LoRALinear`` when
mlx-lm is installed). Each run shows its header and the trainer's tqdm bar, step by step; then steps/s (compile steps
excluded), peak memory and first/final loss are printed side by side. Text is tokenized
bytewise (the model is random; real runs use the Llama-3 tokenizer).

Speed figures vary from run to run on a machine shared with other work, so the demo says
so, and ``--out FILE`` appends this run's figures, printed table, command, machine and
load average to a JSON file: the README's figures are such recorded runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ...run_lock import file_lock, run_lock
from ..cli_args import DefaultsOnceFormatter

__all__ = ["run_demo", "format_table", "main"]

ALL_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "codebook0_head",
    "projection",
]


def run_demo(
    workdir: Path,
    steps: int,
    batch_size: int,
    dropout: float,
    width: int,
    layers: int,
    targets,
    seed: int = 0,
    layer_kinds=("fused", "plain"),
    progress: bool = False,
) -> dict:
    """Train each layer kind from the same files; returns ``{kind: TrainResult}``.

    ``progress``: a header per run and the trainer's tqdm bar, step by step (on stderr)."""
    from ...layers import plain_layer_class
    from .synthetic import small_csm_config, write_random_csm, write_synthetic_dataset
    from .task import CSMLoRATrainer

    model_dir = write_random_csm(workdir / "model", small_csm_config(width, layers), seed=seed)
    audio_dir = write_synthetic_dataset(
        workdir / "data", num_files=24, frames=(24, 32), words_per_file=(3, 4), seed=seed
    )
    results = {}
    for i, kind in enumerate(layer_kinds):
        trainer = CSMLoRATrainer(
            model_dir,
            workdir / f"out-{kind}",
            lora_r=8,
            lora_alpha=16.0,
            tokenizer="byte",
            lora_dropout=dropout,
            target_modules=targets,
            learning_rate=2e-3,
            warmup_steps=2,
            seed=seed,
            lora_layer=kind,
            progress=progress,
            max_seq_len=512,
        )
        trainer.prepare_data(audio_dir, context_turns=1, val_split=0.1)
        if progress:  # the header of the trainer's step bar
            print(f"run {i + 1}/{len(layer_kinds)}: {kind} LoRA layers", file=sys.stderr, flush=True)
        results[kind] = trainer.train(
            epochs=0, max_steps=steps, batch_size=batch_size, val_every=0, save_every=0, save_mode="lora"
        )
        if results[kind].interrupted:  # Ctrl-C: the trainer saved and stopped; the demo stops too
            raise KeyboardInterrupt
        del trainer
    results["plain_class"] = f"{plain_layer_class().__module__}.{plain_layer_class().__name__}"
    return results


def figures(results: dict) -> dict:
    """The demo's figures of ``run_demo``'s results, as the JSON record and the table hold them."""
    out = {}
    for kind in ("fused", "plain"):
        r = results[kind]
        out[kind] = {
            "steps_per_s": r.steps_per_s,
            "step_time_ms": r.step_time_s * 1e3,
            "peak_memory_mib": r.peak_memory_mb,
            "first_loss": r.losses[0][1],
            "final_loss": r.final_loss,
        }
    out["plain_over_fused"] = {
        "step_time": out["fused"]["steps_per_s"] / out["plain"]["steps_per_s"],
        "peak_memory": out["plain"]["peak_memory_mib"] / out["fused"]["peak_memory_mib"],
    }
    return out


def format_table(f: dict) -> str:
    """The side-by-side table `main` prints (and the JSON record keeps verbatim)."""
    fused, plain, ratio = f["fused"], f["plain"], f["plain_over_fused"]
    rows = [
        f"{'':<22}{'fused':>12}{'plain':>12}{'plain/fused':>13}",
        f"{'steps/s':<22}{fused['steps_per_s']:>12.2f}{plain['steps_per_s']:>12.2f}{ratio['step_time']:>12.2f}x",
        f"{'step time (ms)':<22}{fused['step_time_ms']:>12.1f}{plain['step_time_ms']:>12.1f}",
        f"{'peak memory (MiB)':<22}{fused['peak_memory_mib']:>12.1f}{plain['peak_memory_mib']:>12.1f}"
        f"{ratio['peak_memory']:>12.2f}x",
        f"{'first loss':<22}{fused['first_loss']:>12.3f}{plain['first_loss']:>12.3f}",
        f"{'final loss':<22}{fused['final_loss']:>12.3f}{plain['final_loss']:>12.3f}",
    ]
    return "\n".join(rows)


def _machine() -> dict:
    import mlx.core as mx

    from ... import __version__
    from ...fast_blas import active_blas

    versions = {"python": platform.python_version(), "mlx": mx.__version__, "mlx-fused-lora": __version__}
    try:
        import mlx_lm

        versions["mlx-lm"] = mlx_lm.__version__
    except ImportError:
        pass
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(mx.default_device()),
        "blas": active_blas(),
        "versions": versions,
    }


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def record(path: Path, command: str, run: dict) -> dict:
    """Append ``run`` to the JSON record at ``path`` (a new record if the file is absent or
    holds another command); returns the record."""
    rec = {"schema": "mlx-fused-lora-demo/1", "command": command, "runs": []}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("command") == command:
            rec = old
        else:
            print(f"{path} holds runs of another command ({old.get('command')!r}): starting it afresh", file=sys.stderr)
    rec["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-fused-lora demo",
        description="The main job, end to end, with no downloads: fine-tune a tiny random CSM on a synthetic "
        "voice dataset with fused and with plain LoRA layers, and print speed, memory and loss side by side.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout p")
    p.add_argument("--width", type=int, default=256, help="backbone width (the decoder is half)")
    p.add_argument("--layers", type=int, default=4, help="backbone layers")
    p.add_argument(
        "--target-modules", nargs="+", default=ALL_TARGETS, help="LoRA targets (every linear, heads included)"
    )
    p.add_argument("--workdir", default=None, help="keep the model, data and outputs here (not kept by default)")
    p.add_argument("--out", default=None, help="append this run's figures, command and machine to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="trainer logging")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with contextlib.ExitStack() as locks:  # one demo per record file and per --workdir
        if args.out:
            locks.enter_context(file_lock(args.out, "--out"))
        if args.workdir:
            locks.enter_context(run_lock(args.workdir, "--workdir"))
        return _run(args, argv)


def _run(args, argv) -> int:
    import mlx.core as mx

    from ...fast_blas import active_blas  # the CLI put MLX on OpenBLAS (Linux) unless --no-fast-blas

    t0, load_start = time.perf_counter(), _load()
    with tempfile.TemporaryDirectory(prefix="mlx-fused-lora-demo-") as tmp:
        workdir = Path(args.workdir or tmp)
        print(
            f"device {mx.default_device()}, CPU matmuls on {active_blas()}: "
            f"random CSM (32 codebooks, backbone {args.layers} x {args.width}), "
            f"synthetic dataset written to {workdir} and read back; LoRA r=8 on {' '.join(args.target_modules)}, "
            f"dropout {args.lora_dropout}, batch {args.batch_size}, {args.steps} steps each (fused, then plain)",
            flush=True,
        )
        r = run_demo(
            workdir,
            args.steps,
            args.batch_size,
            args.lora_dropout,
            args.width,
            args.layers,
            args.target_modules,
            progress=not args.no_progress,
        )
    f = figures(r)
    table = format_table(f)
    total_s = time.perf_counter() - t0
    print("\n" + table)
    falls = all(x.final_loss < x.losses[0][1] for x in (r["fused"], r["plain"]))
    load_end = _load()
    load = f", load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores" if load_end else ""
    print(
        f"\nplain: {r['plain_class']}. The loss {'falls' if falls else 'DID NOT FALL'} in both runs. "
        f"Total {total_s:.0f} s{load}. Speed figures vary from run to run, most on a busy machine: "
        "compare ratios of one run, and repeat."
    )
    if args.out:
        command = shlex.join(["mlx-fused-lora", "demo", *(sys.argv[1:] if argv is None else argv)])
        run = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total_s)),
            "total_s": total_s,
            "load_average": {"start": load_start, "end": load_end},
            "machine": _machine(),
            "plain_layer": r["plain_class"],
            "loss_falls": falls,
            **f,
            "table": table,
        }
        rec = record(Path(args.out), command, run)
        print(f"appended run {len(rec['runs'])} to {args.out}")
    return 0 if falls else 1


if __name__ == "__main__":
    raise SystemExit(main())
