"""Text tokenizers for CSM's text column: a Llama-3 tokenizer file, or bytes for demos.

CSM's text rows are the Llama-3 tokens of ``f"[{speaker}]{text}"`` with
``<|begin_of_text|>`` / ``<|end_of_text|>`` around them (Sesame's generator sets that
post-processor on the Hugging Face tokenizer). `load_text_tokenizer` reads:

- a ``tokenizer.json`` (Hugging Face `tokenizers` format; needs the optional
  ``tokenizers`` package), or a directory holding one;
- a tiktoken BPE model file (``tokenizer.model`` of Meta's Llama-3 release; needs the
  optional ``tiktoken`` package);
- ``"byte"``: `ByteTokenizer`, UTF-8 bytes + BOS/EOS, no dependency. For demos and tests
  with random models only: a real CSM's text embedding expects Llama-3 ids.

The runtime package does not depend on ``tokenizers``/``tiktoken``: real checkpoints need
one of them, and the error says which to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

__all__ = ["TextTokenizer", "ByteTokenizer", "load_text_tokenizer", "LLAMA3_PATTERN"]

# Meta's Llama-3 pre-tokenizer split pattern (the one its tiktoken model is used with).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL = 256


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with BOS first and EOS last."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS 256, EOS 257 (vocab 258)."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json``; adds BOS/EOS itself when the file's post-processor does not."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"reading {path} needs the 'tokenizers' package: pip install tokenizers") from None
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.bos_id = vocab.get("<|begin_of_text|>", vocab.get("<s>"))
        self.eos_id = vocab.get("<|end_of_text|>", vocab.get("</s>"))

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=True).ids)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        if self.eos_id is not None and ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids


class TiktokenTokenizer:
    """Meta's Llama-3 ``tokenizer.model`` (base64 token + rank per line) through tiktoken."""

    def __init__(self, path: Path):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise ImportError(
                f"reading the tiktoken model {path} needs the 'tiktoken' package: pip install tiktoken"
            ) from None
        ranks = load_tiktoken_bpe(str(path))
        n = len(ranks)
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [
            f"<|reserved_special_token_{i}|>" for i in range(LLAMA3_NUM_RESERVED_SPECIAL - 2)
        ]
        special_ids = {s: n + i for i, s in enumerate(specials)}
        self._enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids
        )
        self.bos_id = special_ids["<|begin_of_text|>"]
        self.eos_id = special_ids["<|end_of_text|>"]
        self.vocab_size = n + len(specials)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._enc.encode(text, disallowed_special=()), self.eos_id]


def load_text_tokenizer(spec: None | str | Path, model_path: None | str | Path = None) -> TextTokenizer:
    """The tokenizer named by ``spec`` (a file, a directory, or ``"byte"``).

    With ``spec`` None, a ``tokenizer.json`` or ``tokenizer.model`` beside the model
    weights (``model_path``) is used; otherwise this raises, naming ``--tokenizer``.
    """
    if spec is not None and str(spec) == "byte":
        return ByteTokenizer()
    candidates = []
    if spec is not None:
        p = Path(spec)
        candidates = [p / "tokenizer.json", p / "tokenizer.model"] if p.is_dir() else [p]
    elif model_path is not None:
        base = Path(model_path)
        base = base if base.is_dir() else base.parent
        candidates = [base / "tokenizer.json", base / "tokenizer.model"]
    for c in candidates:
        if c.is_file():
            return HFTokenizer(c) if c.suffix == ".json" else TiktokenTokenizer(c)
    where = f" (looked for {', '.join(map(str, candidates))})" if candidates else ""
    raise FileNotFoundError(
        "no text tokenizer: pass --tokenizer with the Llama-3.2 tokenizer.json or tokenizer.model "
        f"(or 'byte' for a random demo model){where}"
    )
