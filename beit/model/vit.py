"""The BEiT Vision Transformer, as the official implementation builds it (REFERENCE.md §5).

One readable file: patch embedding, CLS and mask tokens, optional absolute position embedding,
relative position bias (one shared table in pretraining, one per block in fine-tuning, each with three
extra CLS entries), pre-LN blocks with q/v biases (no k bias), LayerScale and stochastic depth, the MIM
head (only on masked positions) and the classification head (mean pooling → `fc_norm` → `head`).

Weight names follow the official / timm layout (`blocks.0.attn.qkv.weight`, `blocks.0.gamma_1`,
`rel_pos_bias.relative_position_bias_table`, `lm_head.weight`, …), so official checkpoints load and ours
load into timm's `beit_*` models. `relative_position_index` is a non-persistent buffer: never saved,
always regenerated from the grid.

Shapes: B batch, N = grid² patches, D width, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from beit.config import ModelConfig
from beit.errors import BeitError

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
INIT_STD = 0.02


def relative_position_index(grid: int) -> torch.Tensor:
    """Index into a relative-position table, int64 [N+1, N+1] for a grid×grid patch window (§5.4).

    Patch→patch entries encode the offset (query − key) row-major in a (2g−1)×(2g−1) table; the last
    three table rows are CLS→patch (row 0, n−3), patch→CLS (column 0, n−2) and CLS→CLS ([0, 0], n−1).
    """
    side = 2 * grid - 1
    num_entries = side * side + 3
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :] + (grid - 1)  # [2, N, N], each in [0, 2g−2]
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = offsets[0] * side + offsets[1]
    index[0, :] = num_entries - 3
    index[:, 0] = num_entries - 2
    index[0, 0] = num_entries - 1
    return index


def relative_position_table_size(grid: int) -> int:
    """Rows of a relative-position table for a grid×grid window: (2g−1)² + 3 (732 for 14×14)."""
    return (2 * grid - 1) ** 2 + 3


def _gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Table [n, H] looked up at index [N+1, N+1] → additive attention bias [H, N+1, N+1]."""
    tokens = index.shape[0]
    return table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous()


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] at the token positions rows [B, M] → [B, M, D]."""
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masked_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token positions of the masked patches (CLS = 0, so patch i is token i+1), ascending per image
    and padded to the largest count M in the batch: (rows int64 [B, M], valid bool [B, M]).
    `x[valid]` for x [B, M, …] is then in `mask.nonzero()` order."""
    counts = mask.sum(dim=1)
    most = int(counts.max())
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :most]  # masked first
    valid = torch.arange(most, device=mask.device) < counts.unsqueeze(1)
    return order + 1, valid


class RelativePositionBias(nn.Module):
    """One relative-position table shared by every block (the pretraining layout, `rel_pos_bias.*`)."""

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(relative_position_table_size(grid), num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        """The bias [H, N+1, N+1], computed once per forward and added in every block."""
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index)


class PatchEmbed(nn.Module):
    """Image [B, C, S, S] → patch embeddings [B, N, D] by a stride-`patch_size` convolution."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise BeitError(
                f"model expects images [B, C, {self.image_size}, {self.image_size}], "
                f"got {list(images.shape)}; resize the input or build the model with that image_size"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, D, g, g] → [B, N, D]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dropout: float = 0.0,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q·kᵀ/√hd + bias)·v for q [B, H, M, hd], k and v [B, H, T, hd], bias broadcastable to
    [B, H, M, T]: → ([B, H, M, hd], None) by `scaled_dot_product_attention`, or with `explicit` by a
    plain softmax that also returns the probabilities [B, H, M, T]."""
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    probs = (logits if bias is None else logits + bias).softmax(dim=-1)
    return F.dropout(probs, dropout) @ v, probs


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases and no k bias; optional per-block relative bias.

    The fast path is `scaled_dot_product_attention` with the relative bias as an additive float mask;
    `return_attn=True`, and training on the CPU, take the explicit softmax (see `forward`).
    """

    def __init__(
        self, dim: int, num_heads: int, grid: int | None, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if grid is not None:  # per-block table (the fine-tuning layout)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(relative_position_table_size(grid), num_heads)
            )
            self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        shared_bias: torch.Tensor | None = None,
        return_attn: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] (+ shared bias [H, T, T]) → [B, T, D] (and probabilities [B, H, T, T]).

        With `rows` (token positions, int64 [B, M]) only those M queries are computed, against all T
        keys and values: → [B, M, D] (and [B, H, M, T]).
        """
        B, T, D = x.shape
        H, hd = self.num_heads, self.head_dim
        k_bias = torch.zeros_like(self.v_bias)
        if rows is None:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias)))
            q, k, v = qkv.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        else:
            q_weight, kv_weight = self.qkv.weight.split((D, 2 * D))
            q = F.linear(gather_rows(x, rows), q_weight, self.q_bias)
            q = q.view(B, -1, H, hd).transpose(1, 2)  # [B, H, M, hd]
            kv = F.linear(x, kv_weight, torch.cat((k_bias, self.v_bias)))
            k, v = kv.view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]

        bias = shared_bias
        if self.relative_position_bias_table is not None:
            own = _gather_bias(self.relative_position_bias_table, self.relative_position_index)
            bias = own if bias is None else bias + own
        if bias is not None:  # [H, T, T] → [1, H, T, T], or the queried rows [B, H, M, T]
            bias = bias.unsqueeze(0) if rows is None else bias[:, rows].transpose(0, 1)
            bias = bias.to(q.dtype)
        # SDPA's CPU kernels take no gradient for an additive mask: with a trainable bias on the CPU it
        # falls back to its unfused math path, whose NaN-safe softmax makes it slower than the explicit
        # one (bench/model_speed.py). Elsewhere, and for a frozen bias, the fused kernel runs.
        explicit = return_attn or (bias is not None and bias.requires_grad and q.device.type == "cpu")
        x, attn = attend(q, k, v, bias, self.attn_drop if self.training else 0.0, explicit)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, -1, D)))
        return (x, attn) if return_attn else x


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2 → dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability `p`, scale the
    survivors by 1/(1−p); the identity in eval mode. `Block` applies the factor fused with LayerScale."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor [B, 1, …, 1] for the branch `x`: 0 (dropped) or 1/(1−p) (kept); None when
        inactive (eval mode or p = 0). Cheap: the full-size multiply is left to the caller to fuse."""
        if not self.training or self.p == 0.0:
            return None
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-LN Transformer block: x + DropPath(γ1·Attn(LN1 x)), then x + DropPath(γ2·MLP(LN2 x))."""

    def __init__(self, cfg: ModelConfig, drop_path: float, per_block_grid: int | None) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, cfg.num_heads, per_block_grid, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _add_branch(self, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """x + DropPath(γ·branch) as one fused multiply-add by the per-sample factor γ·keep/(1−p) [B,1,D]
        (three full-size elementwise passes fewer than computing each factor on its own, backward too)."""
        scale = self.drop_path.sample_scale(branch)
        if gamma is not None:
            scale = gamma if scale is None else scale * gamma
        return x + branch if scale is None else torch.addcmul(x, branch, scale)

    def forward(
        self, x: torch.Tensor, shared_bias: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, T, D] → [B, T, D]; with `rows` (int64 [B, M]) only the outputs at those token positions,
        [B, M, D], every token still serving as key and value (all the MIM model's last block needs)."""
        branch = self.attn(self.norm1(x), shared_bias, rows=rows)
        x = self._add_branch(x if rows is None else gather_rows(x, rows), branch, self.gamma_1)
        return self._add_branch(x, self.mlp(self.norm2(x)), self.gamma_2)


class BEiT(nn.Module):
    """BEiT ViT. Pretraining layout (`cfg.mim`): `model(images, mask)` → logits [mask.sum(), V] for the
    masked positions in `mask.nonzero()` order. Fine-tuning layout: `model(images)` → logits
    [B, num_classes], or pooled features [B, D] when `num_classes == 0`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        dim, grid = cfg.embed_dim, cfg.grid
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.mim else None
        tokens = cfg.num_patches + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if cfg.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, cfg.num_heads) if cfg.rel_pos_shared else None
        per_block_grid = grid if cfg.use_rel_pos_bias and not cfg.rel_pos_shared else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate, per_block_grid) for rate in rates)

        mean_pool = cfg.use_mean_pooling and not cfg.mim
        self.norm = LayerNorm(dim) if not mean_pool else nn.Identity()
        self.fc_norm = LayerNorm(dim) if mean_pool else None
        if cfg.mim:
            self.lm_head = nn.Linear(dim, cfg.vocab_size)
            self.head = None
        else:
            self.lm_head = None
            self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ---- initialization (§5.6) -------------------------------------------------------------------------

    def _init_weights(self) -> None:
        """Pretraining: truncated normal at ±1σ (BERT init, Conv2d included). Fine-tuning: truncated at
        ±2 absolute (effectively untruncated), patch conv left at PyTorch's default, head × init scale.
        Both: LN = (1, 0), zero biases, then `attn.proj` / `mlp.fc2` of block l (1-based) ÷ √(2l)."""
        pretrain = self.config.mim
        trunc = (
            partial(nn.init.trunc_normal_, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
            if pretrain
            else partial(nn.init.trunc_normal_, std=INIT_STD)
        )
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            if param is not None:
                trunc(param)
        for module in self.modules():
            if isinstance(module, nn.Linear) or (pretrain and isinstance(module, nn.Conv2d)):
                trunc(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
            if isinstance(self.head, nn.Linear):
                self.head.weight.mul_(self.config.head_init_scale)
                self.head.bias.mul_(self.config.head_init_scale)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the official recipe never decays (besides 1-D weights and biases)."""
        return {"pos_embed", "cls_token"}

    # ---- encoder ---------------------------------------------------------------------------------------

    def _check_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        n = self.config.num_patches
        if mask.dtype != torch.bool or mask.shape[0] != batch or mask[0].numel() != n:
            raise BeitError(
                f"mask must be bool [B, {n}] or [B, {self.config.grid}, {self.config.grid}] with B={batch}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        return mask.reshape(batch, n)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, S, S] (+ bool mask [B, N]) → tokens [B, N+1, D]: masked patch embeddings are
        replaced by the mask token *before* the CLS token and the position embedding are added."""
        x = self.patch_embed(images)  # [B, N, D]
        if mask is not None:
            if self.mask_token is None:
                raise BeitError("this model has no mask token (fine-tuning layout); build it with mim=True")
            masked = self._check_mask(mask, x.shape[0]).unsqueeze(-1)  # [B, N, 1]
            x = torch.where(masked, self.mask_token, x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, N+1, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _shared_bias(self) -> torch.Tensor | None:
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def _encode(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embedding and every block, before the final norm: [B, N+1, D]. With `rows` (int64 [B, M]) the
        last block computes only the outputs at those token positions: [B, M, D]."""
        x, bias = self.embed(images, mask), self._shared_bias()  # bias [H, N+1, N+1], once per forward
        for block in self.blocks[:-1]:
            x = block(x, bias)
        return self.blocks[-1](x, bias, rows=rows)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the last block and the final `norm` (identity with mean pooling): [B, N+1, D]."""
        return self.norm(self._encode(images, mask))

    def get_intermediate_layers(
        self, images: torch.Tensor, indices: Sequence[int] | None = None, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Outputs of the blocks in `indices` (default: all; negative counts from the end), each
        [B, N+1, D] before any final norm — the linear probe's and the segmentation neck's features."""
        depth = len(self.blocks)
        wanted = list(range(depth) if indices is None else indices)
        if not wanted or any(not -depth <= i < depth for i in wanted):
            raise BeitError(f"block indices must be in [-{depth}, {depth}), got {wanted}")
        wanted = [i % depth for i in wanted]
        x, bias, outputs = self.embed(images, mask), self._shared_bias(), []
        for block in self.blocks[: max(wanted) + 1]:  # stop after the last block asked for
            x = block(x, bias)
            outputs.append(x)
        return [outputs[i] for i in wanted]

    def attention_maps(
        self, images: torch.Tensor, block: int = -1, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax attention probabilities of one block, [B, H, N+1, N+1] (row = query, CLS first),
        by an explicit softmax (the fused path never materializes them). For analysis, not training."""
        depth = len(self.blocks)
        if not -depth <= block < depth:
            raise BeitError(f"block must be in [-{depth}, {depth}), got {block}")
        block %= depth
        x, bias = self.embed(images, mask), self._shared_bias()
        for layer in self.blocks[:block]:
            x = layer(x, bias)
        target = self.blocks[block]
        return target.attn(target.norm1(x), bias, return_attn=True)[1]

    # ---- heads -----------------------------------------------------------------------------------------

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Classification head on `forward_features` output: mean of the patch tokens (CLS excluded) →
        `fc_norm` → `head`, or the normed CLS token when mean pooling is off."""
        if self.head is None:
            raise BeitError("a MIM model has no classification head; build it with mim=False")
        pooled = self.fc_norm(features[:, 1:].mean(dim=1)) if self.fc_norm is not None else features[:, 0]
        return self.head(pooled)

    def forward_mim(
        self, images: torch.Tensor, mask: torch.Tensor, return_all_tokens: bool = False
    ) -> torch.Tensor:
        """Token logits: [mask.sum(), V] for the masked patches only (in `mask.nonzero()` order), or
        [B, N, V] for every patch with `return_all_tokens`."""
        if self.lm_head is None:
            raise BeitError("this model has no MIM head (fine-tuning layout); build it with mim=True")
        mask = self._check_mask(mask, images.shape[0])
        if return_all_tokens:
            return self.lm_head(self.norm(self._encode(images, mask)[:, 1:]))  # [B, N, V]
        # Only the masked patches are predicted, so the last block, the norm and the V-way head run on
        # their rows only (about 4% of a ViT-B step); the outputs equal the all-token ones.
        rows, valid = masked_rows(mask)
        return self.lm_head(self.norm(self._encode(images, mask, rows)[valid]))  # [mask.sum(), V]

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, return_all_tokens: bool = False
    ) -> torch.Tensor:
        if self.lm_head is not None:
            if mask is None:
                raise BeitError("a MIM model needs a bool mask [B, N] of the patches to predict")
            return self.forward_mim(images, mask, return_all_tokens)
        return self.forward_head(self.forward_features(images, mask))


def count_flops(cfg: ModelConfig, num_masked: int | None = None) -> int:
    """FLOPs (a multiply-add counts 2) of one forward pass on one image, counted by `FlopCounterMode` on
    a model built on the meta device (fast for any size; SDPA decomposes into countable matmuls there).
    A MIM model is counted as `forward_mim` runs it: the last block and the head on `num_masked` patches
    only (None: the `return_all_tokens` cost, everything on all N patches)."""
    if cfg.mim and num_masked is not None and not 0 < num_masked <= cfg.num_patches:
        raise BeitError(f"num_masked must be in 1..{cfg.num_patches}, got {num_masked}")
    with torch.device("meta"):
        model = BEiT(cfg).eval()
        images = torch.zeros(1, cfg.in_chans, cfg.image_size, cfg.image_size)
        masked_only = cfg.mim and num_masked is not None
        rows = torch.arange(1, num_masked + 1).unsqueeze(0) if masked_only else None  # which: no matter
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = model.norm(model._encode(images, rows=rows))  # [1, M, D] or [1, N+1, D]
        if not cfg.mim:
            model.forward_head(features)
        else:
            model.lm_head(features if masked_only else features[:, 1:])
    return counter.get_total_flops()
