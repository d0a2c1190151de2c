"""Our own discrete VAE tokenizer: the paper's stage 1, for users without DALL-E weights or with their
own image domain (REFERENCE.md §4.2).

Architecture in the line of the official "customized" BEiT tokenizer (lucidrains' `DiscreteVAE`):
log2(downsample) stride-2 4×4 convs, each followed by `num_resblocks` residual blocks, then a 1×1 conv to
`vocab_size` logits per cell; a codebook of `vocab_size` × `codebook_dim` embeddings; a mirrored decoder
with 4×4 stride-2 transposed convs. Pixels enter as Normalize(0.5, 0.5) of [0,1] RGB (the official
customized tokenizer's mapping) and the decoder predicts them in that space. Token ids are the argmax of
the encoder logits (`DVAETokenizer`); training (`dvae_train.py`) uses the Gumbel-softmax relaxation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit.errors import BeitError
from beit.tokenize.base import ModuleTokenizer


@dataclass(frozen=True)
class DVAEConfig:
    """Shape of a dVAE. The default matches the official customized tokenizer (112 px, ×8, 8192 codes)."""

    input_size: int = 112
    downsample: int = 8  # a power of 2: one stride-2 conv per factor of 2
    vocab_size: int = 8192
    hidden: int = 256
    codebook_dim: int = 512
    num_resblocks: int = 1  # residual blocks after every down (and before every up) layer

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 2 or d & (d - 1):
            raise BeitError(f"dVAE downsample must be a power of 2 (2, 4, 8, ...), got {d}")
        if self.input_size < d or self.input_size % d:
            raise BeitError(
                f"dVAE input_size must be a positive multiple of downsample {d}, got {self.input_size}"
            )
        for name in ("vocab_size", "hidden", "codebook_dim"):
            if getattr(self, name) < 2:
                raise BeitError(f"dVAE {name} must be at least 2, got {getattr(self, name)}")
        if self.num_resblocks < 0:
            raise BeitError(f"dVAE num_resblocks must be >= 0, got {self.num_resblocks}")

    @property
    def grid(self) -> int:
        return self.input_size // self.downsample

    @property
    def num_layers(self) -> int:
        return int(math.log2(self.downsample))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BeitError(f"unknown dVAE config keys {unknown}; expected some of {sorted(known)}")
        return cls(**{k: int(v) for k, v in data.items()})


DVAE_PRESETS: dict[str, DVAEConfig] = {
    # pairs with the "tiny" BEiT preset: 32 px, ×4 -> 8×8 grid, 512 codes
    "tiny": DVAEConfig(
        input_size=32, downsample=4, vocab_size=512, hidden=64, codebook_dim=64, num_resblocks=1
    ),
    # the official customized tokenizer's size: 112 px, ×8 -> 14×14, 8192 codes
    "base": DVAEConfig(),
}


def dvae_config(preset: str = "base", **overrides: int | None) -> DVAEConfig:
    """A preset's config with the non-None `overrides` applied."""
    if preset not in DVAE_PRESETS:
        raise BeitError(f"unknown dVAE preset {preset!r}; choose one of {', '.join(DVAE_PRESETS)}")
    return replace(DVAE_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


class ResBlock(nn.Module):
    """x + conv1(relu(conv3(relu(conv3(x))))): width-preserving residual block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DiscreteVAE(nn.Module):
    """Conv encoder -> logits over `vocab_size` codes per cell -> codebook -> conv decoder."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        enc: list[nn.Module] = []
        for i in range(c.num_layers):  # [B,3,S,S] -> [B,hidden,S/d,S/d]
            enc += [nn.Conv2d(3 if i == 0 else c.hidden, c.hidden, 4, stride=2, padding=1), nn.ReLU()]
            enc += [ResBlock(c.hidden) for _ in range(c.num_resblocks)]
        enc.append(nn.Conv2d(c.hidden, c.vocab_size, 1))  # -> [B,vocab,g,g] logits
        self.encoder = nn.Sequential(*enc)

        self.codebook = nn.Embedding(c.vocab_size, c.codebook_dim)

        dec: list[nn.Module] = [nn.Conv2d(c.codebook_dim, c.hidden, 1)]  # [B,dim,g,g] -> [B,hidden,g,g]
        for _ in range(c.num_layers):  # -> [B,hidden,S,S]
            dec += [ResBlock(c.hidden) for _ in range(c.num_resblocks)]
            dec += [nn.ConvTranspose2d(c.hidden, c.hidden, 4, stride=2, padding=1), nn.ReLU()]
        dec.append(nn.Conv2d(c.hidden, 3, 1))  # -> [B,3,S,S] in Normalize(0.5, 0.5) space
        self.decoder = nn.Sequential(*dec)

    def forward(
        self, x: torch.Tensor, temperature: float, straight_through: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-softmax relaxed pass: normalized images [B,3,S,S] -> (reconstruction, logits [B,V,g,g])."""
        logits = self.encoder(x)
        soft = F.gumbel_softmax(logits, tau=temperature, hard=straight_through, dim=1)  # [B,V,g,g]
        z = torch.einsum("bvhw,vd->bdhw", soft, self.codebook.weight)  # [B,dim,g,g]
        return self.decoder(z), logits

    def decode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 ids [B,g,g] -> normalized images [B,3,S,S]."""
        return self.decoder(self.codebook(tokens).permute(0, 3, 1, 2))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB -> Normalize(mean=0.5, std=0.5), the pixel space of our dVAE."""
    return (x - 0.5) / 0.5


class DVAETokenizer(ModuleTokenizer):
    """Tokenizer protocol over a (trained, frozen) `DiscreteVAE`; its decoder is always present."""

    name = "dvae"
    pixel_mapping = "normalize(mean=0.5, std=0.5) on RGB in [0,1]"

    def __init__(self, model: DiscreteVAE) -> None:
        c = model.config
        self.model = model
        super().__init__(
            model.encoder,
            vocab_size=c.vocab_size,
            input_size=c.input_size,
            downsample=c.downsample,
            decoder=model,
        )

    @property
    def config(self) -> DVAEConfig:
        return self.model.config

    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode_ids(tokens) * 0.5 + 0.5
