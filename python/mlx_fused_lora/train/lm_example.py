"""``mlx-fused-lora example --llm DIR``: a tiny random Llama that ``mlx_lm.load`` takes
offline, with a tokenizer, SFT data and preference data, and the ``python -m
mlx_fused_lora.lm_lora`` commands that fine-tune it on fused layers (SFT, then DPO); no
downloads.

What ``DIR`` gets::

    DIR/
      model/config.json            mlx-lm's Llama (model_type "llama") at a tiny width
      model/model.safetensors      random weights, as mlx-lm names them
      model/tokenizer.json         a byte-level BPE (Llama-3's special tokens and chat markers)
      model/tokenizer_config.json  what transformers' AutoTokenizer reads: special tokens, a
                                   Llama-3-style chat template
      data/train.jsonl             SFT chats in mlx-lm's format ({"messages": [...]});
      data/valid.jsonl             valid and test a quarter of train's size each
      data/test.jsonl
      preference/train.jsonl       preference pairs as mlx-lm-lora's DPO reads them
      preference/valid.jsonl       ({"prompt", "chosen", "rejected"}), valid a quarter of train

The datasets are named writers in `DATASETS`, each with its own folder under ``DIR``
(the SFT chats in ``data/``, mlx-lm's usual name; the pairs in ``preference/``) and
drawing on the same small vocabulary the tokenizer was trained on, so another training
task adds its set beside them without touching the model writer. mlx-lm builds the model
(``mlx_lm.models.llama``): it is what the command trains with anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .tiny_tokenizer import BOS, EOS, WORDS, write_bpe_tokenizer

__all__ = [
    "LmExample",
    "DATASETS",
    "lm_example_at",
    "write_lm_example",
    "lm_lora_command",
    "preference_command",
    "LLM_WIDTHS",
    "TRAIN_FLAGS",
]

START, END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"  # Llama-3's chat markers
CHAT_TEMPLATE = (
    BOS + "{% for m in messages %}" + START + "{{ m['role'] }}" + END + "\n\n{{ m['content'] }}" + EOT + "{% endfor %}"
    "{% if add_generation_prompt %}" + START + "assistant" + END + "\n\n{% endif %}"
)
LAYERS, HEADS, KV_HEADS = 2, 4, 2
LLM_WIDTHS = (16, 1024)  # hidden sizes allowed: multiples of 16 (4 heads of an even size) in this range
# The example's training run: a handful of steps, seconds on 2 cores.
TRAIN_FLAGS = ["--iters", "20", "--batch-size", "4", "--num-layers", str(LAYERS), "--learning-rate", "2e-3"]
TRAIN_FLAGS += ["--steps-per-report", "5", "--steps-per-eval", "10", "--val-batches", "2"]
PREFERENCE_FLAGS = ["--iters", "30", "--batch-size", "4", "--num-layers", str(LAYERS), "--learning-rate", "1e-3"]
PREFERENCE_FLAGS += ["--steps-per-report", "10", "--steps-per-eval", "15", "--val-batches", "2"]


@dataclass
class LmExample:
    """What `write_lm_example` wrote (paths under its root)."""

    root: Path
    model: Path
    data: Path
    files: list[Path] = field(default_factory=list)
    preference: Path | None = None


def _chat(i: int) -> list[dict]:
    """Sample ``i``: asked for the words after one of `WORDS`, the assistant says the next three."""
    n = len(WORDS)
    word, following = WORDS[i % n], [WORDS[(i + j) % n] for j in range(1, 4)]
    return [
        {"role": "user", "content": f"what comes after {word}?"},
        {"role": "assistant", "content": " ".join(following)},
    ]


def write_sft_data(data: Path, samples: int) -> list[Path]:
    """``train.jsonl`` (``samples`` chats), ``valid.jsonl`` and ``test.jsonl`` (a quarter each) in ``data``."""
    data.mkdir(parents=True, exist_ok=True)
    held_out = max(2, samples // 4)
    splits = {"train": range(samples), "valid": range(samples, samples + held_out)}
    splits["test"] = range(samples + held_out, samples + 2 * held_out)
    written = []
    for name, indices in splits.items():
        path = data / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": _chat(i)}) + "\n" for i in indices))
        written.append(path)
    return written


REFUSAL = "i do not know"  # every pair's rejected answer


def _pair(i: int) -> dict:
    """Pair ``i``: asked for the words after one of `WORDS`, the next three (what the SFT chats
    answer) are preferred to a refusal."""
    chat = _chat(i)
    return {"prompt": chat[0]["content"], "chosen": chat[1]["content"], "rejected": REFUSAL}


def write_preference_data(folder: Path, samples: int) -> list[Path]:
    """``train.jsonl`` (``samples`` pairs) and ``valid.jsonl`` (a quarter) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    held_out = max(2, samples // 4)
    written = []
    for name, indices in {"train": range(samples), "valid": range(samples, samples + held_out)}.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(_pair(i)) + "\n" for i in indices))
        written.append(path)
    return written


# name -> (its folder under the example's root, writer(folder, samples)): the datasets an
# LLM example carries
DATASETS = {"sft": ("data", write_sft_data), "preference": ("preference", write_preference_data)}


def _write_tokenizer(model: Path) -> dict[str, int]:
    """The BPE `write_bpe_tokenizer` trains (CSM's, Llama-3's BOS/EOS), plus the chat markers;
    and the ``tokenizer_config.json`` transformers reads. Returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer

    texts = list(WORDS) + [f"what comes after {w}?" for w in WORDS] + [" ".join(WORDS), REFUSAL]
    write_bpe_tokenizer(model / "tokenizer.json", texts)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in (START, END, EOT)])
    tok.save(str(model / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    }
    (model / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, EOT)}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def _write_llama(model: Path, width: int, seed: int, tokens: dict[str, int]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": width,
        "num_hidden_layers": LAYERS,
        "intermediate_size": 2 * width,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "vocab_size": tokens["vocab_size"],
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokens[BOS],
        "eos_token_id": [tokens[EOS], tokens[EOT]],  # an answer ends at <|eot_id|>
    }
    mx.random.seed(seed)
    weights = llama.Model(llama.ModelArgs.from_dict(config)).parameters()
    mx.save_safetensors(str(model / "model.safetensors"), dict(tree_flatten(weights)))
    (model / "config.json").write_text(json.dumps(config, indent=2))


def lm_example_at(root: Path, files=()) -> LmExample:
    """The `LmExample` rooted at ``root`` (its files: ``files``)."""
    return LmExample(root, root / "model", root / DATASETS["sft"][0], list(files), root / DATASETS["preference"][0])


def write_lm_example(
    root: str | Path,
    samples: int = 32,
    width: int = 64,
    seed: int = 0,
    data_only: bool = False,
    datasets=tuple(DATASETS),
) -> LmExample:
    """Write the LLM example into directory ``root`` (created; the caller checks arguments
    and publishes it, see `example.write_example`)."""
    root = Path(root)
    example = lm_example_at(root)
    if not data_only:
        example.model.mkdir(parents=True)
        _write_llama(example.model, width, seed, _write_tokenizer(example.model))
    for name in datasets:
        folder, write = DATASETS[name]
        write(root / folder, samples)
    example.files = sorted(p for p in root.rglob("*") if p.is_file())
    return example


def lm_lora_command(example: LmExample, adapter_path: str | Path | None = None) -> list[str]:
    """The ``python -m mlx_fused_lora.lm_lora`` argv that fine-tunes ``example`` with LoRA."""
    cmd = ["python", "-m", "mlx_fused_lora.lm_lora", "--model", str(example.model), "--train"]
    cmd += ["--data", str(example.data), "--adapter-path", str(adapter_path or example.root / "adapters")]
    return cmd + TRAIN_FLAGS


def preference_command(example: LmExample, mode: str = "dpo", adapter_path: str | Path | None = None) -> list[str]:
    """The ``python -m mlx_fused_lora.lm_lora --train-mode dpo`` (or ``orpo``) argv that trains
    ``example``'s model on its preference pairs."""
    cmd = ["python", "-m", "mlx_fused_lora.lm_lora", "--train-mode", mode, "--model", str(example.model), "--train"]
    cmd += ["--data", str(example.preference), "--adapter-path", str(adapter_path or example.root / mode)]
    return cmd + PREFERENCE_FLAGS
