"""The tokenizer contract shared by the DALL-E adapter and our own dVAE (DESIGN.md, "Tokenizer").

A tokenizer maps uint8 RGB images of its `input_size` to a `grid`×`grid` map of ids in
`[0, vocab_size)`. `fingerprint()` names it completely (kind, vocabulary, input size, pixel mapping,
SHA-256 of the weights) so that shard sets made with different tokenizers are never mixed.

`ModuleTokenizer` is the machinery both implementations share: input checks, the frozen encoder run in
fp32 outside autocast with a hard argmax, the optional decoder, and the fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from beit.errors import BeitError


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


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted-name order.

    Independent of the container: a pickled module and its safetensors export hash the same.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ModuleTokenizer:
    """A frozen conv encoder whose argmax over `vocab_size` logits per cell gives the token ids.

    The modules are used as given (run under `inference_mode`); the loaders hand them over in eval mode.
    The weights hash is taken once, here: build a new wrapper after changing the weights.

    Subclasses set `name` and `pixel_mapping`, and implement `map_pixels` ([0,1] RGB -> encoder input)
    and `_decode` (int64 ids -> [0,1] RGB) when they have a decoder.
    """

    name: str
    pixel_mapping: str

    def __init__(
        self,
        encoder: nn.Module,
        *,
        vocab_size: int,
        input_size: int,
        downsample: int,
        decoder: nn.Module | None = None,
    ) -> None:
        if input_size % downsample:
            raise BeitError(
                f"{self.name} tokenizer input size must be a multiple of {downsample}, got {input_size}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.grid = input_size // downsample
        self._weights_sha256 = weights_sha256(self.encoder.state_dict())

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """float [B,3,S,S] in [0,1] -> the encoder's input."""
        raise NotImplementedError

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] -> int64 [B,g,g] (hard argmax; on the device of `images`)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise BeitError(
                f"{self.name} tokenizer expects a uint8 tensor [B,3,S,S], got {_describe(images)}"
            )
        if tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise BeitError(
                f"{self.name} tokenizer expects images [B,3,{self.input_size},{self.input_size}], "
                f"got {list(images.shape)}: resize the tokenizer view to {self.input_size} px"
            )
        x = self.map_pixels(images.to(self.device, non_blocking=True).float() / 255)
        # fp32 input outside autocast: the DALL-E encoder rejects anything else and casts its own convs.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            logits = self.encoder(x)  # [B, vocab, g, g]
        return logits.argmax(dim=1).to(images.device)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B,g,g] ids -> float [B,3,S,S] RGB in [0,1] (needs the decoder)."""
        if self.decoder is None:
            raise BeitError(f"this {self.name} tokenizer has no decoder, so it cannot reconstruct images")
        if tokens.ndim != 3 or tokens.dtype.is_floating_point:
            raise BeitError(f"decode expects integer token ids [B,g,g], got {_describe(tokens)}")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_size:
            raise BeitError(f"token ids must lie in [0, {self.vocab_size}) for this {self.name} tokenizer")
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            return self._decode(tokens.to(self.device).long()).float().clamp(0, 1)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "input_size": self.input_size,
            "grid": self.grid,
            "pixel_mapping": self.pixel_mapping,
            "weights_sha256": self._weights_sha256,
        }

    def to(self, device: torch.device | str) -> ModuleTokenizer:
        self.encoder.to(device)
        if self.decoder is not None:
            self.decoder.to(device)
        return self


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
