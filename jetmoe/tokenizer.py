"""Tokenizers: bytes for the built-in tiny model, transformers.AutoTokenizer for real checkpoints.

Both expose the same small interface: ``encode(text) -> list[int]`` (BOS first), ``decode(ids) -> str``,
``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``vocab_size``, ``save_pretrained(dir)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; then bos 256, eos 257, pad 258 (vocab 259, the "tiny" preset's)."""

    def __init__(self) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials dropped; a multi-byte character cut by the end of a stream shows as U+FFFD.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, out_dir: Union[str, Path]) -> None:
        spec = {"type": "bytes", "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "vocab_size": self.vocab_size}
        (Path(out_dir) / BYTE_TOKENIZER_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        for name in HF_TOKENIZER_FILES:  # a replaced checkpoint's: load_tokenizer would read them first
            (Path(out_dir) / name).unlink(missing_ok=True)


class HFTokenizer:
    """transformers.AutoTokenizer behind the ByteTokenizer interface (JetMoE-8B: SentencePiece BPE, BOS 1)."""

    def __init__(self, path: Union[str, Path]) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # a ValueError, so the CLI says it in one line
            raise ValueError(f"the tokenizer in {path} is read by transformers, which cannot be imported ({exc}): "
                             "pip install transformers") from None
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.bos_token_id, self.eos_token_id = self.tok.bos_token_id, self.tok.eos_token_id
        # JetMoE-8B has no pad token; its generation_config pads with eos (2), and so do we.
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save_pretrained(self, out_dir: Union[str, Path]) -> None:
        self.tok.save_pretrained(str(out_dir))
        (Path(out_dir) / BYTE_TOKENIZER_FILE).unlink(missing_ok=True)  # a replaced run's (read second, but stale)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(ckpt_dir: Optional[Union[str, Path]], vocab_size: Optional[int] = None) -> Tokenizer:
    """The checkpoint's tokenizer: AutoTokenizer when it has tokenizer files, bytes when it says so (or when
    there is no directory and the vocabulary is the byte one). Anything else is a ValueError naming the dir."""
    if ckpt_dir is not None:
        d = Path(ckpt_dir)
        tokenizer = None
        if any((d / name).is_file() for name in HF_TOKENIZER_FILES):
            tokenizer = HFTokenizer(d)
        elif (d / BYTE_TOKENIZER_FILE).is_file():
            tokenizer = ByteTokenizer()
        if tokenizer is not None:
            # Ids past the embedding would fail deep in the model's forward (or, under the vocabulary, read as
            # other tokens): a tokenizer left over from another checkpoint.
            if vocab_size is not None and tokenizer.vocab_size > vocab_size:
                raise ValueError(f"the tokenizer in {d} has {tokenizer.vocab_size} tokens, more than the model's "
                                 f"vocab_size {vocab_size}: is it this checkpoint's?")
            return tokenizer
    if vocab_size == ByteTokenizer().vocab_size:
        return ByteTokenizer()
    raise ValueError(f"no tokenizer in {ckpt_dir} (expected {' or '.join(HF_TOKENIZER_FILES)}, "
                     f"or {BYTE_TOKENIZER_FILE})")
