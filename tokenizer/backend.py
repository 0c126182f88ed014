"""One interface over SentencePiece, Hugging Face `tokenizers` and tiktoken, as the metrics need it.

Every backend encodes without BOS/EOS or any special token, and reports for each token the characters of
the original text it covers, so boundaries can be compared with morphemes whatever the tokenizer normalizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EncodedText:
    """A text's tokens.

    ids: int64 token ids, shape (n,).
    spans: int64 character offsets [start, end) into the original text, shape (n, 2), non-decreasing. A token
        made of some of the bytes of one character (a byte-fallback piece, a byte-level BPE fragment) has the
        span of that whole character, so several tokens can share one span; a token that covers no character
        of the text (e.g. SentencePiece's dummy-prefix '▁' before the first word) has an empty span (start == end).
    """

    ids: np.ndarray
    spans: np.ndarray


class TokenizerBackend(Protocol):
    name: str  # display name, e.g. "llama2"
    source: str  # what was loaded: "bundled:llama2", a path
    kind: str  # "sentencepiece" | "byte-level-bpe" | "tiktoken" | "hf"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and added tokens included."""

    @property
    def token_bytes(self) -> list[bytes]:
        """Per id, the UTF-8 bytes the token stands for in decoded text: SentencePiece '▁' is b' ', a byte
        piece '<0xE5>' is b'\\xe5', a byte-level BPE token its raw bytes; special/control tokens are b''."""

    @property
    def byte_fallback(self) -> np.ndarray:
        """Per id, True for SentencePiece byte-fallback pieces ('<0x00>'..'<0xFF>'); all False for BPE."""

    @property
    def special(self) -> np.ndarray:
        """Per id, True for special / control / added-special tokens (never produced by `encode_batch`)."""

    def encode_batch(self, texts: list[str]) -> list[EncodedText]:
        """Encode whole texts, no special tokens, using native batch encoding on all available cores."""

    def decode_batch(self, ids: list[np.ndarray]) -> list[str]:
        """Decode ids back to text (for round-trip checks)."""
