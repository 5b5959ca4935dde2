"""The adapter inits side by side on a tiny Llama: same data, same steps, one run each (issue 24).

    python benchmarks/bench_inits.py benchmarks/results/inits-tiny-llm.json

Each run loads the same random Llama (`mlx-fused-lora example --llm`'s, at width 128), puts
`FusedLoRALinear` on every linear of its blocks with one ``init_lora_weights`` (rank 8,
alpha 16), and trains it with mlx-lm's own trainer on the example's chats: 100 steps of 4,
Adam at 1e-3, no dropout, the same seed (the data order and every random draw are the same
across runs). Dense base: default, gaussian, pissa, pissa_niter_4, olora. 4-bit base (MLX's
affine quantization, group 64, of every adapted linear): default (QLoRA) and loftq, which
quantizes the dense weight itself and fits the adapter to what quantizing loses.

Written per run: the validation loss before training (every dense init starts at the base
model's; on the 4-bit base the start tells what quantizing lost and LoftQ won back), the
training loss every 10 steps (mean of those steps) and the final validation loss. Losses are deterministic on a CPU, so one
run is the result; no times are reported. It shows that every init trains here and what
each gave on this model, not which is best in general.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import types
from pathlib import Path

RUNS = [
    ("default", "dense"),
    ("gaussian", "dense"),
    ("pissa", "dense"),
    ("pissa_niter_4", "dense"),
    ("olora", "dense"),
    ("default", "4-bit"),
    ("loftq", "4-bit"),
]
SETUP = {"width": 128, "samples": 64, "steps": 100, "batch_size": 4, "learning_rate": 1e-3, "rank": 8, "alpha": 16.0}
SEED = 0


def _losses(example, init: str, base: str) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_fused_lora.layers import linear_to_lora_layers
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train

    mx.random.seed(SEED)
    np.random.seed(SEED)
    model, tokenizer = load(str(example.model))
    options = types.SimpleNamespace(data=str(example.data), train=True, test=False, hf_dataset=None, mask_prompt=False)
    train_set, valid_set, _ = (CacheDataset(d) for d in load_dataset(options, tokenizer))
    model.freeze()
    if base == "4-bit" and init != "loftq":  # QLoRA: the base quantized first; LoftQ quantizes it itself
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    rank, alpha = SETUP["rank"], SETUP["alpha"]
    config = {"rank": rank, "scale": alpha / rank, "dropout": 0.0, "init_lora_weights": init}
    with _quiet():
        linear_to_lora_layers(model, -1, config)
    batch = SETUP["batch_size"]

    def val_loss():
        return float(evaluate(model, valid_set, batch_size=batch, num_batches=-1, max_seq_length=512))

    start = val_loss()
    reports = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info["train_loss"])

    args = TrainingArgs(
        batch_size=batch, iters=SETUP["steps"], val_batches=0, steps_per_report=10, steps_per_eval=10**9
    )
    args.adapter_file = str(Path(tempfile.mkdtemp()) / "adapters.safetensors")
    with _quiet():
        train(
            model, optim.Adam(learning_rate=SETUP["learning_rate"]), train_set, None, args, training_callback=Record()
        )
    final = {"final_train_loss": reports[-1], "val_loss": val_loss(), "train_losses_every_10_steps": reports}
    return {"init": init, "base": base, "start_val_loss": start, **final}


@contextlib.contextmanager
def _quiet():
    """mlx-lm's progress display and the inits' warnings kept off the table's output."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _table(runs: list[dict], base_val: float) -> str:
    lines = [f"{'init':<16}{'base':<8}{'val loss at start':>19}{'train loss':>12}{'val loss':>10}"]
    for r in runs:
        lines.append(
            f"{r['init']:<16}{r['base']:<8}{r['start_val_loss']:>19.4f}{r['final_train_loss']:>12.4f}{r['val_loss']:>10.4f}"
        )
    lines.append(f"(the dense base model without adapters: validation loss {base_val:.4f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the results JSON to write (benchmarks/results/inits-tiny-llm.json)")
    args = parser.parse_args(argv)
    from mlx_fused_lora.train.lm_example import write_lm_example

    with tempfile.TemporaryDirectory() as tmp:
        example = write_lm_example(Path(tmp) / "llm", samples=SETUP["samples"], width=SETUP["width"], seed=SEED)
        runs = []
        for init, base in RUNS:
            runs.append(_losses(example, init, base))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    base_val = runs[0]["start_val_loss"]  # mlx-lm's default init: lora_b = 0, the base model's output
    table = _table(runs, base_val)
    print(table)
    result = {
        "about": "the adapter inits on mlx-fused-lora example --llm's tiny Llama: one run each, same data and steps",
        "command": "python benchmarks/bench_inits.py benchmarks/results/inits-tiny-llm.json",
        "setup": {**SETUP, "seed": SEED, "optimizer": "adam", "dropout": 0.0, "layers": "every linear of both blocks"},
        "base_val_loss": base_val,
        "runs": runs,
        "table": table,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
