"""The tokenizer contract shared by the DALL-E adapter and our own dVAE (DESIGN.md, "Tokenizer").

A tokenizer maps uint8 RGB images of its `input_size` to a `grid`×`grid` map of ids in
`[0, vocab_size)`. `fingerprint()` names it completely (kind, vocabulary, input size, pixel mapping,
SHA-256 of the weights) so that shard sets made with different tokenizers are never mixed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    input_size: int
    grid: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, input_size, input_size] -> int64 [B, grid, grid] token ids."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """JSON-serializable identity: name, vocab_size, input_size, grid, pixel_mapping, weights_sha256."""
        ...

    def to(self, device: torch.device | str) -> Tokenizer:
        """Move the weights to `device`; returns self."""
        ...
