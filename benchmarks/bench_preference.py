"""Preference training's cost: our DPO step against our SFT step on the same tokens, and against mlx-lm-lora's DPO.

    MLX_FUSED_LORA_FAST_BLAS=1 pytest benchmarks/bench_preference.py --benchmark-only \\
        --benchmark-json benchmarks/results/cpu-preference.json
    python benchmarks/bench_preference.py benchmarks/results/cpu-preference.json --write

The model is a random mlx-lm Llama of ``MODEL``'s shape (4 layers, 512 wide, a 32000-word
vocabulary, untied head: about 180 MB of float32 weights), LoRA of rank 8 on every linear of
every block, batches of 2 pairs, Adam; the data ``PAIRS`` preference pairs whose chosen and
rejected sequences all have the same length, a multiple of 16 (so neither trainer pads), and
the same pairs' chosen answers as prompt / completion rows for mlx-lm-lora's SFT. The
tokenizer is word-level with a chat template, so both trainers tokenize the same.

Each run is its own process (`preference_peer.py`: MLX's matmuls on OpenBLAS in all of
them), ``ITERS`` steps, the first ``WARMUP`` of which (compilation) are left out; a run's
step time is the median of the others, its peak memory MLX's peak as the run reports it.
The kinds run in turn, ``ROUNDS`` times, and each kind keeps its fastest round; then our
three steps run in one process, in turn (`interleaved`), free of process-to-process variation:

- ``ours-dpo``: ``python -m mlx_fused_lora.lm_lora --train-mode dpo`` (the reference: the
  model with its adapters off); ``ours-sft``: the same run with the loss the NLL of the same
  ``[2B, T]`` response tokens; ``ours-precomputed`` (``--precompute-reference``) and
  ``ours-second-model`` (``--reference-model-path`` the model itself: what a second copy of
  the weights costs in our own step);
- ``peer-dpo``: mlx-lm-lora's ``--train-mode dpo`` without a reference path (it loads the
  model a second time), ``peer-sft``: its ``--train-mode sft --mask-prompt`` on the chosen
  answers; only when mlx-lm-lora is installed (it is no dependency of this package).

Targets (the issue's): our DPO step at most 1.35x our SFT step; our DPO peak memory lower
than the peer's by at least 80 % of the model's weight bytes; our DPO step no slower than
the peer's.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODEL = dict(
    model_type="llama",
    hidden_size=512,
    num_hidden_layers=4,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    vocab_size=32000,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
RANK, SCALE, BATCH, LR = 8, 20.0, 2, 1e-5
PAIRS, PROMPT_WORDS, ANSWER_WORDS = 16, 20, 39  # 64 tokens a sequence with the template below
ITERS, WARMUP, ROUNDS = 10, 2, 3
TARGETS = {"dpo_over_sft": 1.35, "memory_saved_over_weights": 0.8, "ours_over_peer_step": 1.0}
WORDS = (
    "the quick brown fox jumps over a lazy dog and cat runs to sleep now yes no good bad answer question "
    "river stone cloud green quiet bright sound tone pitch model voice tiny random learn fast sample"
).split()
SPECIALS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PEER_CONFIG = f"fuse: false\nlora_parameters:\n  rank: {RANK}\n  scale: {SCALE}\n  dropout: 0.0\n"


def peer_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlx_lm_lora") is not None


def write_model(folder: Path) -> int:
    """The random Llama, its word-level tokenizer and chat template; returns the weights' bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    config.update(unk_token="<unk>", pad_token="</s>", chat_template=CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    weights = dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(MODEL)).parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps({**MODEL, "bos_token_id": 0, "eos_token_id": 1}))
    return sum(v.nbytes for v in weights.values())


def write_data(root: Path) -> tuple[Path, Path]:
    """``pairs/`` (prompt, chosen, rejected) and ``sft/`` (prompt, completion: the chosen answers)."""
    n = len(WORDS)

    def words(i: int, stride: int, count: int) -> str:
        return " ".join(WORDS[(i * 7 + stride * j) % n] for j in range(count))

    rows = [
        {
            "prompt": words(i, 1, PROMPT_WORDS),
            "chosen": words(i, 3, ANSWER_WORDS),
            "rejected": words(i, 5, ANSWER_WORDS),
        }
        for i in range(PAIRS + 4)
    ]
    pairs, sft = root / "pairs", root / "sft"
    for folder, convert in ((pairs, dict), (sft, lambda r: {"prompt": r["prompt"], "completion": r["chosen"]})):
        folder.mkdir(parents=True)
        for split, part in (("train", rows[:PAIRS]), ("valid", rows[PAIRS:]), ("test", rows[PAIRS:])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(convert(r)) + "\n" for r in part))
    return pairs, sft


def check_lengths(model: Path, pairs: Path) -> int:
    """Every chosen and rejected sequence the same length, a multiple of 16 (no padding anywhere)."""
    from mlx_fused_lora.train.preference.data import load_pairs
    from mlx_lm import load

    _, tokenizer = load(str(model))
    encoded, _ = load_pairs(pairs / "train.jsonl", tokenizer)
    lengths = {len(s) for p in encoded for s in (p.chosen, p.rejected)}
    assert len(lengths) == 1 and next(iter(lengths)) % 16 == 0, f"sequence lengths {sorted(lengths)}"
    return lengths.pop()


def _run(kind: str, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    command = [sys.executable, str(HERE / "preference_peer.py"), kind, *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed ({proc.returncode}): {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _blas(output: str) -> str:
    found = re.search(r"MLX BLAS: (.+)", output)
    return found.group(1).strip() if found else "unknown"


def ours(kind: str, model: Path, pairs: Path, out: Path, extra=()) -> dict:
    args = ["--model", str(model), "--train", "--data", str(pairs), "--adapter-path", str(out), "--overwrite"]
    args += ["--num-layers", "-1", "--batch-size", str(BATCH), "--iters", str(ITERS), "--learning-rate", str(LR)]
    args += ["--lora-parameters", json.dumps({"rank": RANK, "scale": SCALE, "dropout": 0.0})]
    args += ["--val-batches", "0", "--save-every", "0", "--steps-per-report", "0", "--no-progress", *extra]
    output = _run(kind, args, out.parent)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == ITERS, steps
    return {
        "step_s": statistics.median(s["step_time_s"] for s in steps[WARMUP:]),
        "peak_bytes": max(s["peak_memory_mb"] for s in steps) * 2**20,
        "first_loss": steps[0]["loss"],
        "blas": _blas(output),
    }


ITER_LINE = re.compile(r"Iter (\d+): loss ([\d.]+).*?it/s ([\d.]+).*?peak_mem ([\d.]+)GB")


def peer(mode: str, model: Path, data: Path, out: Path) -> dict:
    (out.parent / "peer.yaml").write_text(PEER_CONFIG)
    args = ["--model", str(model), "--train", "--train-mode", mode, "--data", str(data), "--adapter-path", str(out)]
    args += ["--iters", str(ITERS), "--batch-size", str(BATCH), "--learning-rate", str(LR), "--num-layers", "-1"]
    args += ["--steps-per-report", "1", "--val-batches", "1", "--steps-per-eval", "1000", "--seed", "0"]
    args += ["--config", str(out.parent / "peer.yaml")]
    args += ["--beta", "0.1", "--dpo-cpo-loss-type", "sigmoid"] if mode == "dpo" else ["--mask-prompt"]
    output = _run("mlx-lm-lora", args, out.parent)
    iters = [(int(i), float(loss), float(rate), float(peak)) for i, loss, rate, peak in ITER_LINE.findall(output)]
    assert [i for i, *_ in iters] == list(range(1, ITERS + 1)), output[-3000:]
    return {
        "step_s": statistics.median(1.0 / rate for _, _, rate, _ in iters[WARMUP:]),
        "peak_bytes": max(peak for *_, peak in iters) * 1e9,
        "first_loss": iters[0][1],
        "blas": _blas(output),
    }


def interleaved(model: Path, pairs: Path, rounds: int = 10) -> dict:
    """Our three steps in one process, compiled once each and run in turn ``rounds`` times on
    the same batch (no process-to-process variation): SFT on the pair's tokens, DPO with the
    reference pass, DPO with precomputed reference values; the median of each, the first
    two rounds left out."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_fused_lora.train import loop
    from mlx_fused_lora.train.distributed import World
    from mlx_fused_lora.train.preference import PreferenceSettings, PreferenceTrainer, collate_pairs, sequence_logps

    settings = PreferenceSettings(num_layers=-1, lora_rank=RANK, lora_scale=SCALE, learning_rate=LR)
    trainer = PreferenceTrainer(model, model.parent / "interleaved", settings, progress=False, world=World())
    trainer.prepare_data(pairs, ("train",))
    batch = collate_pairs(trainer.pairs["train"][:BATCH])
    tokens, mask = mx.array(batch["tokens"]), mx.array(batch["response_mask"])
    reference = trainer.loss  # the reference pass runs when no values are given

    def sft(model, tokens, mask):
        sums, counts = sequence_logps(model, tokens, mask)
        nll = -sums.sum() / counts.sum()
        return nll, (nll,)

    values = mx.full((BATCH,), -100.0)
    kinds = {"sft": (sft, (tokens, mask)), "dpo": (reference, (tokens, mask))}
    kinds["precomputed"] = (reference, (tokens, mask, values, values))
    optimizer = optim.Adam(learning_rate=LR)
    optimizer.init(trainer.model.trainable_parameters())
    steps = {
        k: loop.build_step(trainer.model, optimizer, f, loop.LoopSettings(steps=1), World())
        for k, (f, _) in kinds.items()
    }
    times = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, step in steps.items():
            start = time.perf_counter()
            loss, aux, _, _ = step(kinds[kind][1], None, True)
            mx.eval(loss, aux, trainer.model.state, optimizer.state)
            times[kind].append(time.perf_counter() - start)
    return {"step_s": {k: statistics.median(v[WARMUP:]) for k, v in times.items()}, "times_s": times}


def measure(root: Path) -> dict:
    """Every kind's fastest round (see the module docstring), the model and data, the load."""
    from mlx_fused_lora.bench.machine import load_average, machine_info, versions

    model = root / "model"
    weight_bytes = write_model(model)
    pairs, sft = write_data(root)
    length = check_lengths(model, pairs)
    kinds = {
        "ours-sft": lambda out: ours("ours-sft", model, pairs, out),
        "ours-dpo": lambda out: ours("ours-dpo", model, pairs, out),
        "ours-precomputed": lambda out: ours("ours-dpo", model, pairs, out, ["--precompute-reference"]),
        "ours-second-model": lambda out: ours("ours-dpo", model, pairs, out, ["--reference-model-path", str(model)]),
    }
    if peer_installed():
        kinds["peer-dpo"] = lambda out: peer("dpo", model, pairs, out)
        kinds["peer-sft"] = lambda out: peer("sft", model, sft, out)
    load = {"start": load_average()}
    rounds = {k: [] for k in kinds}
    start = time.perf_counter()
    for r in range(ROUNDS):
        for kind, run in kinds.items():
            (root / f"{kind}-{r}").mkdir()
            rounds[kind].append(run(root / f"{kind}-{r}" / "out"))
    together = interleaved(model, pairs)
    load["end"] = load_average()
    best = {k: min(runs, key=lambda run: run["step_s"]) for k, runs in rounds.items()}
    return {
        "model": {**MODEL, "weight_bytes": weight_bytes, "rank": RANK, "batch_pairs": BATCH, "sequence": length},
        "iters": ITERS,
        "warmup": WARMUP,
        "rounds": rounds,
        "best": best,
        "interleaved": together,
        "peer": "mlx-lm-lora" if peer_installed() else None,
        "load_average": load,
        "total_s": time.perf_counter() - start,
        "machine": machine_info(),
        "versions": {**versions(), **_peer_version()},
    }


def _peer_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"mlx-lm-lora": version("mlx-lm-lora"), "mlx-lm": version("mlx-lm")}
    except PackageNotFoundError:
        return {"mlx-lm": version("mlx-lm")}


def test_preference_step_against_sft_and_mlx_lm_lora(benchmark, tmp_path):
    pytest.importorskip("mlx_lm")
    results = {}
    benchmark.pedantic(lambda: results.update(measure(tmp_path)), rounds=1, iterations=1)
    benchmark.extra_info.update(results)


# -- the report: python benchmarks/bench_preference.py RESULTS.json [--write] --


def summary(results: dict) -> dict:
    best, weights = results["best"], results["model"]["weight_bytes"]
    out = {
        "weight_bytes": weights,
        "weight_mb": weights / 1e6,
        "step_s": {k: v["step_s"] for k, v in best.items()},
        "peak_bytes": {k: v["peak_bytes"] for k, v in best.items()},
        "peak_mb": {k: v["peak_bytes"] / 1e6 for k, v in best.items()},
        "step_ms": {k: v["step_s"] * 1e3 for k, v in best.items()},
        "first_loss": {k: v["first_loss"] for k, v in best.items()},
        "blas": {k: v["blas"] for k, v in best.items()},
        "dpo_over_sft": best["ours-dpo"]["step_s"] / best["ours-sft"]["step_s"],
        "second_copy_over_weights": (best["ours-second-model"]["peak_bytes"] - best["ours-dpo"]["peak_bytes"])
        / weights,
    }
    together = results["interleaved"]["step_s"]
    out["interleaved_ms"] = {k: v * 1e3 for k, v in together.items()}
    out["interleaved_dpo_over_sft"] = together["dpo"] / together["sft"]
    out["interleaved_precomputed_over_sft"] = together["precomputed"] / together["sft"]
    targets = {"dpo_over_sft": [TARGETS["dpo_over_sft"], out["dpo_over_sft"]]}
    if "peer-dpo" in best:
        out["peer_dpo_over_peer_sft"] = best["peer-dpo"]["step_s"] / best["peer-sft"]["step_s"]
        out["ours_over_peer_step"] = best["ours-dpo"]["step_s"] / best["peer-dpo"]["step_s"]
        out["memory_saved_over_weights"] = (best["peer-dpo"]["peak_bytes"] - best["ours-dpo"]["peak_bytes"]) / weights
        out["peer_over_ours_peak"] = best["peer-dpo"]["peak_bytes"] / best["ours-dpo"]["peak_bytes"]
        for key in ("memory_saved_over_weights", "ours_over_peer_step"):
            targets[key] = [TARGETS[key], out[key]]
    out["targets"] = targets
    return out


def met(s: dict, key: str) -> str:
    """ "met" or "MISSED" for target ``key`` (memory saved: at least; the step ratios: at most)."""
    target, value = s["targets"][key]
    ok = value >= target if key == "memory_saved_over_weights" else value <= target
    return "met" if ok else "MISSED"


def report_lines(s: dict) -> list[str]:
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    lines = [f"model weights {mb(s['weight_bytes'])}; step time (median) and peak memory, best round of each kind:"]
    for kind, step in s["step_s"].items():
        lines.append(
            f"  {kind:<18} {step * 1e3:8.1f} ms  peak {mb(s['peak_bytes'][kind])}  first loss {s['first_loss'][kind]:.4f}"
        )
    lines.append(
        f"  our DPO / our SFT step: {s['dpo_over_sft']:.2f}x (target <= {TARGETS['dpo_over_sft']}: {met(s, 'dpo_over_sft')})"
    )
    lines.append(
        f"  in one process, in turn: our DPO / our SFT step {s['interleaved_dpo_over_sft']:.2f}x, "
        f"precomputed reference / SFT {s['interleaved_precomputed_over_sft']:.2f}x"
    )
    lines.append(f"  a second model copy in our step: {s['second_copy_over_weights']:.2f} x the weights")
    if "ours_over_peer_step" in s:
        lines.append(f"  mlx-lm-lora DPO / its SFT step: {s['peer_dpo_over_peer_sft']:.2f}x")
        lines.append(
            f"  our DPO / mlx-lm-lora's DPO step: {s['ours_over_peer_step']:.2f}x (target <= 1: {met(s, 'ours_over_peer_step')})"
        )
        lines.append(
            f"  peak memory saved against mlx-lm-lora's DPO: {s['memory_saved_over_weights']:.2f} x the weights "
            f"(target >= {TARGETS['memory_saved_over_weights']}: {met(s, 'memory_saved_over_weights')}); its peak / ours {s['peer_over_ours_peak']:.2f}x"
        )
    else:
        lines.append("  mlx-lm-lora is not installed: no peer figures")
    return lines


def main(argv) -> int:
    path = argv[0]
    with open(path) as f:
        data = json.load(f)
    results = data["benchmarks"][0]["extra_info"]
    s = summary(results)
    lines = report_lines(s)
    print("\n".join(lines))
    if "--write" in argv:
        data["summary"] = s
        data["printed"] = "\n".join(lines)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
