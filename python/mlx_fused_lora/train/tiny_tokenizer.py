"""The example models' text: a small word list their data draws on, and a byte-level BPE tokenizer trained on it.

`write_bpe_tokenizer` writes a ``tokenizer.json`` of the Llama-3 tokenizer's kind (byte-level,
its ``<|begin_of_text|>`` / ``<|end_of_text|>``); the CSM example, the demo and the LLM example
(`lm_example`) each train one on their own texts. Needs the ``tokenizers`` package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WORDS", "BOS", "EOS", "write_bpe_tokenizer"]

WORDS = (
    "hello there general voice model speech tiny random frames learn codes fast "
    "sound audio sample tone pitch river stone cloud green quiet bright"
).split()
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # Llama-3's, as in CSM's tokenizer


def write_bpe_tokenizer(path: str | Path, texts, vocab_size: int = 320) -> int:
    """Train a byte-level BPE on ``texts`` and save it as ``tokenizer.json``; returns its
    vocabulary size (the CSM's text vocabulary must be at least that).

    Like Llama-3's tokenizer it is byte-level (any text encodes, no unknown token) and its
    post-processor puts ``<|begin_of_text|>``/``<|end_of_text|>`` around each text, as
    Sesame's generator sets it up. Training is deterministic for the same ``texts``.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise ImportError("writing a tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)
