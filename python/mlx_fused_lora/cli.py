"""The ``mlx-fused-lora`` command (also ``python -m mlx_fused_lora``).

Each command is a module with ``main(argv) -> int``, imported only when run. Whatever the
command: Ctrl-C is one line and exit status 130 (a training run saves first, see
``train/interrupt.py``), and an output folder another run holds (`run_lock`) is one line
and exit status 1.
"""

import importlib
import sys

from . import fast_blas
from .run_lock import FolderInUseError

COMMANDS = {
    "demo": (
        "mlx_fused_lora.train.csm.demo",
        "fine-tune a tiny random CSM with fused and with plain LoRA layers: speed, memory, loss",
    ),
    "example": (
        "mlx_fused_lora.train.example",
        "write a tiny model, tokenizer, codec and dataset that fit, and print the finetune command for them",
    ),
    "finetune": (
        "mlx_fused_lora.train.csm.cli",
        "LoRA fine-tuning of CSM on audio + transcripts (checkpoints, resume)",
    ),
    "generate": (
        "mlx_fused_lora.train.csm.generate",
        "speech from a CSM with named adapters (one per voice, stacked or weighted) on one loaded base",
    ),
    "layer-demo": ("mlx_fused_lora.bench.layer_demo", "the fused LoRA layer against the plain one: speed and memory"),
    "bench": ("mlx_fused_lora.bench.cli", "the benchmark suite: fused vs plain MLX vs the limit, table, JSON and PNG"),
    "convert-adapter": ("mlx_fused_lora.adapters.cli", "convert LoRA adapters between mlx-lm and PEFT formats"),
    "merge-adapters": ("mlx_fused_lora.adapters.merge_cli", "merge weighted LoRA adapters into one (PEFT's methods)"),
}


def usage():
    lines = ["usage: mlx-fused-lora <command> [options]", "", "commands:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mlx-fused-lora <command> --help describes a command's options."]
    lines += [
        f"On Linux MLX's CPU matmuls run on OpenBLAS (mlx_fused_lora.fast_blas); {fast_blas.CLI_FLAG}",
        f"(anywhere on the line) or {fast_blas.ENV_VAR}=0 keeps MLX's bundled reference BLAS.",
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before any command imports mlx.core: MLX binds its BLAS when it loads.
    argv = fast_blas.enable_for_cli(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mlx-fused-lora: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(rest)
    except KeyboardInterrupt:
        print(f"mlx-fused-lora {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except FolderInUseError as e:
        print(f"mlx-fused-lora {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
