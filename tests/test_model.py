"""The BEiT ViT against timm's implementation and the official facts (REFERENCE.md §5, §6, §12.2)."""

import math
import sys

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from typer.testing import CliRunner

import beit
from beit.cli import app, main
from beit.config import PRESETS, ModelConfig, load_toml, model_config
from beit.errors import BeitError
from beit.model import create_model
from beit.model.vit import DropPath, count_flops, relative_position_index, relative_position_table_size

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)  # timm's spelling of "tiny"


def photos(size: int) -> torch.Tensor:
    """Two real photos (astronaut, cat), square-cropped, resized and 0.5-normalized: float [2, 3, S, S]."""
    out = []
    for image in (skimage.data.astronaut(), skimage.data.chelsea()):
        side = min(image.shape[:2])
        x = torch.from_numpy(image[:side, :side].copy()).permute(2, 0, 1)[None].float() / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0])
    return (torch.stack(out) - 0.5) / 0.5


def random_masks(grid: int, seed: int = 0) -> torch.Tensor:
    """Two official blockwise masks, bool [2, grid²], about 40% masked."""
    gen = beit.MaskGenerator((grid, grid), round(0.38 * grid * grid), min_block=4, seed=seed)
    return torch.from_numpy(np.stack([gen(), gen()])).flatten(1)


def randomize(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict for `model` in which every weight matters: nonzero biases, tables and γ."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.1 * noise
        elif "relative_position_bias_table" in name:
            state[name] = 0.5 * noise
        else:
            state[name] = 0.05 * noise
    return state


def timm_pretrain_layout(**flags) -> Beit:
    """timm's Beit with the given flags and the final LayerNorm on all tokens (no pooling, no head)."""
    return Beit(**TINY, num_classes=0, global_pool="token", **flags).eval()


# ---- parameter counts and key layout -----------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, mim, num_classes, expected",
    [
        ("base", True, 0, 91_965_776),
        ("base", False, 1000, 86_530_984),
        ("large", True, 0, 311_534_016),
        ("large", False, 1000, 304_430_568),
    ],
)
def test_parameter_counts_equal_the_official(preset, mim, num_classes, expected):
    with torch.device("meta"):
        model = create_model(preset, mim=mim, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_pretrain_state_dict_has_exactly_the_official_keys():
    with torch.device("meta"):
        model = create_model("base", mim=True)
    block = [
        "gamma_1",
        "gamma_2",
        "norm1.weight",
        "norm1.bias",
        "attn.q_bias",
        "attn.v_bias",
        "attn.qkv.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    expected = {
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rel_pos_bias.relative_position_bias_table",
        "norm.weight",
        "norm.bias",
        "lm_head.weight",
        "lm_head.bias",
    }
    expected |= {f"blocks.{i}.{key}" for i in range(12) for key in block}
    state = model.state_dict()
    assert set(state) == expected  # relative_position_index (and any k bias) is never saved
    assert state["rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    assert state["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert state["lm_head.weight"].shape == (8192, 768)


def test_layer_scale_zero_and_abs_pos_change_the_keys():
    with torch.device("meta"):
        plain = create_model(
            "tiny", mim=True, layer_scale_init=0, use_abs_pos_emb=True, use_rel_pos_bias=False
        )
    keys = set(plain.state_dict())
    assert "pos_embed" in keys and plain.pos_embed.shape == (1, 65, 64)
    assert not any("gamma" in k or "relative_position" in k for k in keys)


# ---- relative position bias ---------------------------------------------------------------------------


def test_relative_position_index_values_of_the_official_14x14_window():
    index = relative_position_index(14)
    assert index.shape == (197, 197)
    assert [index[1, 1], index[1, 2], index[2, 1], index[1, 196], index[196, 1]] == [364, 363, 365, 0, 728]
    assert [index[0, 5], index[5, 0], index[0, 0]] == [729, 730, 731]
    assert index.min() == 0 and index.max() == 731


def test_relative_position_index_toy_2x2():
    expected = [[11, 9, 9, 9, 9], [10, 4, 3, 1, 0], [10, 5, 4, 2, 1], [10, 7, 6, 4, 3], [10, 8, 7, 5, 4]]
    assert relative_position_index(2).tolist() == expected


@pytest.mark.parametrize("image_size, rows", [(224, 732), (384, 2212), (512, 3972), (640, 6244)])
def test_table_sizes(image_size, rows):
    with torch.device("meta"):
        model = create_model("base", num_classes=0, image_size=image_size, depth=1)
    assert relative_position_table_size(image_size // 16) == rows
    assert model.blocks[0].attn.relative_position_bias_table.shape == (rows, 12)
    assert model.blocks[0].attn.relative_position_index.shape == ((image_size // 16) ** 2 + 1,) * 2


def test_index_is_regenerated_not_loaded():
    model = create_model("tiny", num_classes=3)
    state = model.state_dict()
    assert not any("relative_position_index" in k for k in state)
    fresh = create_model("tiny", num_classes=3)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.blocks[2].attn.relative_position_index, relative_position_index(8))


# ---- equivalence with timm ----------------------------------------------------------------------------


def test_finetune_layout_matches_timm_beit_base_patch16_224(monkeypatch):
    import timm
    import timm.models.beit

    def skip(tensor, *args, **kwargs):  # every weight is overwritten below: skip the slow random init
        return tensor

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", skip)
    monkeypatch.setattr(timm.models.beit, "trunc_normal_", skip)
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False).eval()
    ours = create_model("base", num_classes=1000).eval()
    state = randomize(ours)
    ours.load_state_dict(state, strict=True)
    theirs.load_state_dict(state, strict=True)  # same names, per-block tables, fc_norm + head
    images = photos(224)[:1]  # one image: a base forward is slow on a shared CPU
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    assert got.shape == (1, 1000)
    assert (got - expected).abs().max() <= 1e-4
    assert expected.std() > 0.1  # not a degenerate comparison


@pytest.mark.parametrize(
    "ours_flags, timm_flags",
    [
        (  # BEiT+ pretraining: shared relative bias, LayerScale, no absolute positions
            dict(layer_scale_init=0.1),
            dict(init_values=0.1, use_abs_pos_emb=False, use_shared_rel_pos_bias=True),
        ),
        (  # the plain-ViT variant (pt1k_800ep): absolute positions, no LayerScale, no relative bias
            dict(layer_scale_init=0, use_abs_pos_emb=True, use_rel_pos_bias=False),
            dict(init_values=None, use_abs_pos_emb=True),
        ),
    ],
)
def test_pretrain_layout_encoder_matches_timm(ours_flags, timm_flags):
    ours = create_model("tiny", mim=True, **ours_flags).eval()
    theirs = timm_pretrain_layout(**timm_flags)
    state = randomize(ours)
    ours.load_state_dict(state, strict=True)
    theirs.load_state_dict({k: v for k, v in state.items() if k != "mask_token" and "lm_head" not in k})
    images = photos(32)
    no_mask = torch.zeros(2, 64, dtype=torch.bool)
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in theirs.blocks]
    with torch.no_grad():
        expected = theirs.forward_features(images)
        layers = ours.get_intermediate_layers(images)
        assert (ours.forward_features(images) - expected).abs().max() <= 1e-4
        assert (ours.forward_features(images, no_mask) - expected).abs().max() <= 1e-4
        logits = ours(images, no_mask, return_all_tokens=True)
    for hook in hooks:
        hook.remove()
    assert len(layers) == 4
    for got, want in zip(layers, captured, strict=True):  # per-block outputs before the final norm
        assert (got - want).abs().max() <= 1e-4
    assert torch.allclose(logits, ours.lm_head(expected[:, 1:]), atol=1e-4)
    assert [t.shape for t in ours.get_intermediate_layers(images, [1, -1])] == [(2, 65, 64)] * 2
    with torch.no_grad():
        assert torch.allclose(ours.get_intermediate_layers(images, [-1])[0], layers[3], atol=1e-6)


def test_mask_token_replaces_patch_embeddings_before_cls_and_positions():
    # timm has no mask token; replacing the rows of its patch-embedding output (after the projection,
    # bias included) and letting it add CLS and the absolute positions must give our masked forward.
    ours = create_model("tiny", mim=True, use_abs_pos_emb=True).eval()
    theirs = timm_pretrain_layout(init_values=0.1, use_abs_pos_emb=True, use_shared_rel_pos_bias=True)
    state = randomize(ours, seed=1)
    ours.load_state_dict(state)
    theirs.load_state_dict({k: v for k, v in state.items() if k != "mask_token" and "lm_head" not in k})
    images, mask = photos(32), random_masks(8)
    w = mask.unsqueeze(-1).float()
    theirs.patch_embed.register_forward_hook(lambda m, i, out: out * (1 - w) + state["mask_token"] * w)
    with torch.no_grad():
        expected = theirs.forward_features(images)
        got = ours.forward_features(images, mask)
        tokens = ours.embed(images, mask)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - ours.forward_features(images)).abs().max() > 0.1  # the mask matters
    rows = mask[0].nonzero()[:, 0] + 1
    assert torch.allclose(tokens[0, rows], (state["mask_token"] + state["pos_embed"])[0, rows])


# ---- MIM head ------------------------------------------------------------------------------------------


def test_mim_head_runs_only_on_masked_rows():
    model = create_model("tiny", mim=True).eval()
    model.load_state_dict(randomize(model, seed=2))
    images, mask = photos(32), random_masks(8, seed=3)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        logits = model(images, mask)
        everything = model(images, mask, return_all_tokens=True)
        grid_mask = model(images, mask.view(2, 8, 8))
    assert logits.shape == (int(mask.sum()), 512)
    assert seen[0] == mask.sum()  # the head saw only the masked rows
    assert everything.shape == (2, 64, 512)
    assert torch.allclose(logits, everything[mask], atol=1e-5)  # rows in mask.nonzero() order
    assert torch.equal(grid_mask, logits)
    tokens = torch.randint(0, 512, (2, 8, 8))
    loss = F.cross_entropy(logits, tokens.flatten(1)[mask])  # the documented target selection
    assert torch.isfinite(loss)


def uneven_masks(grid: int) -> torch.Tensor:
    """Three masks with different counts, the last one empty: bool [3, grid²]."""
    mask = torch.cat((random_masks(grid, seed=4), torch.zeros(1, grid * grid, dtype=torch.bool)))
    mask[1, mask[1].nonzero()[:5, 0]] = False
    assert len(set(mask.sum(1).tolist())) == 3
    return mask


def test_mim_forward_on_masked_rows_equals_all_tokens_in_training():
    # The last block runs on the masked rows only (padded per batch); with stochastic depth drawing the
    # same per-sample decisions, outputs and gradients equal those of the full all-token forward.
    model = create_model("tiny", mim=True, drop_path_rate=0.3).train()
    model.load_state_dict(randomize(model, seed=5))
    images, mask = torch.cat((photos(32), photos(32)[:1])), uneven_masks(8)
    grads = []
    for all_tokens in (False, True):
        torch.manual_seed(0)
        logits = model(images, mask, return_all_tokens=all_tokens)
        logits = logits[mask] if all_tokens else logits
        logits.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
        if not all_tokens:
            rows_logits = logits.detach()
        else:
            assert torch.allclose(rows_logits, logits, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "rel_pos_bias.relative_position_bias_table" in grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=1e-4), name
    with torch.no_grad():
        assert model(images, torch.zeros_like(mask)).shape == (0, 512)  # nothing masked, nothing predicted


def test_mim_training_gradients_match_timm():
    # One training step's loss and gradients against timm's Beit (SDPA attention, all tokens through every
    # block), with the mask token put in by a hook as above: checks the masked-row last block, the
    # explicit CPU attention and the fused LayerScale residual in training mode.
    ours = create_model("tiny", mim=True, use_abs_pos_emb=True, drop_path_rate=0.0).train()
    theirs = timm_pretrain_layout(init_values=0.1, use_abs_pos_emb=True, use_shared_rel_pos_bias=True)
    theirs.train()
    state = randomize(ours, seed=6)
    ours.load_state_dict(state)
    theirs.load_state_dict({k: v for k, v in state.items() if k != "mask_token" and "lm_head" not in k})
    images, mask = torch.cat((photos(32), photos(32)[:1])), uneven_masks(8)
    w = mask.unsqueeze(-1).float()
    theirs.patch_embed.register_forward_hook(lambda m, i, out: out * (1 - w) + ours.mask_token * w)
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(0))[mask]
    F.cross_entropy(ours(images, mask), tokens).backward()
    F.cross_entropy(ours.lm_head(theirs.forward_features(images)[:, 1:][mask]), tokens).backward()
    timm_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if name in timm_grads:  # the lm_head and mask_token got both gradients; the rest one each
            assert torch.allclose(param.grad, timm_grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_bad_masks_and_images_raise_beit_error():
    model = create_model("tiny", mim=True)
    images = photos(32)
    with pytest.raises(BeitError, match="mask"):
        model(images, torch.zeros(2, 63, dtype=torch.bool))
    with pytest.raises(BeitError, match="mask"):
        model(images, torch.zeros(2, 64))  # not bool
    with pytest.raises(BeitError, match="needs a bool mask"):
        model(images)
    with pytest.raises(BeitError, match="image_size"):
        model(photos(48), torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(BeitError, match="no mask token"):
        create_model("tiny")(images, torch.zeros(2, 64, dtype=torch.bool))


def test_finetune_forward_shapes():
    images = photos(32)
    assert create_model("tiny", num_classes=10).eval()(images).shape == (2, 10)
    pooled = create_model("tiny").eval()
    features = pooled.forward_features(images)
    expected = pooled.fc_norm(features[:, 1:].mean(1))  # CLS excluded from the mean
    assert torch.equal(pooled(images), expected)
    cls_pooled = create_model("tiny", use_mean_pooling=False).eval()
    assert cls_pooled.fc_norm is None and isinstance(cls_pooled.norm, torch.nn.LayerNorm)
    assert torch.equal(cls_pooled(images), cls_pooled.forward_features(images)[:, 0])


# ---- attention maps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mim", [True, False])  # shared table / per-block tables
def test_attention_maps_are_probabilities_that_match_sdpa_and_timm(mim):
    ours = create_model("tiny", mim=mim).eval()
    state = randomize(ours, seed=4)
    ours.load_state_dict(state)
    theirs = Beit(
        **TINY,
        num_classes=0,
        init_values=0.1,
        use_abs_pos_emb=False,
        use_rel_pos_bias=not mim,
        use_shared_rel_pos_bias=mim,
    ).eval()
    theirs.load_state_dict({k: v for k, v in state.items() if k in theirs.state_dict()}, strict=False)
    for blk in theirs.blocks:
        blk.attn.fused_attn = False  # timm's explicit-softmax path; its attn_drop sees the probabilities
    captured = []
    theirs.blocks[2].attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    images = photos(32)
    with torch.no_grad():
        maps = ours.attention_maps(images, block=2)
        theirs.forward_features(images)
        x = ours.get_intermediate_layers(images, [1])[0]
        block = ours.blocks[2]
        shared = ours.rel_pos_bias() if mim else None
        explicit, probs = block.attn(block.norm1(x), shared, return_attn=True)
        fused = block.attn(block.norm1(x), shared)
    assert maps.shape == (2, 4, 65, 65)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 65), atol=1e-5)
    assert (maps - captured[0]).abs().max() <= 1e-5
    assert torch.equal(maps, probs)
    assert (explicit - fused).abs().max() <= 1e-5
    assert torch.equal(ours.attention_maps(images), ours.attention_maps(images, block=3))
    with pytest.raises(BeitError, match="block"):
        ours.attention_maps(images, block=4)


# ---- initialization (§5.6, §12.2 row 10) ---------------------------------------------------------------


def test_pretraining_init_is_bert_truncated_normal_with_depth_rescale():
    torch.manual_seed(0)
    model = create_model("tiny", mim=True)
    bound, std = 0.02, 0.02 * 0.5396  # trunc_normal at ±1σ: std 0.0108
    for name, weight in [
        ("qkv", model.blocks[0].attn.qkv.weight),
        ("fc1", model.blocks[3].mlp.fc1.weight),
        ("lm_head", model.lm_head.weight),
        ("patch", model.patch_embed.proj.weight),
    ]:
        assert weight.abs().max() <= bound, name
        assert weight.abs().max() >= 0.97 * bound, name
        assert weight.std().item() == pytest.approx(std, rel=0.06), name
    for layer, block in enumerate(model.blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            scale = math.sqrt(2 * layer)
            assert weight.abs().max() <= bound / scale + 1e-9
            assert weight.abs().max() >= 0.95 * bound / scale
            assert weight.std().item() == pytest.approx(std / scale, rel=0.06)
        assert torch.equal(block.gamma_1, torch.full((64,), 0.1))
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any() and not block.mlp.fc1.bias.any()
        assert torch.equal(block.norm1.weight, torch.ones(64)) and not block.norm1.bias.any()
    for token in (model.cls_token, model.mask_token):
        assert token.abs().max() <= bound and token.std() > 0.005
    assert not model.rel_pos_bias.relative_position_bias_table.any()
    assert not model.lm_head.bias.any() and not model.patch_embed.proj.bias.any()
    assert create_model("large", mim=True, depth=1, embed_dim=64, num_heads=4).blocks[0].gamma_1[0] == 1e-5


def test_finetuning_init_is_untruncated_with_tiny_head():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=1000)
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05)
    assert fc1.abs().max() > 0.05  # not truncated at ±1σ
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)  # × init scale 0.001
    assert not model.head.bias.any()
    fc2 = model.blocks[3].mlp.fc2.weight  # ÷ √8
    assert fc2.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    # the patch conv keeps PyTorch's default init (uniform within 1/√fan_in), not a truncated normal
    conv = model.patch_embed.proj.weight
    assert 0.1 < conv.abs().max() <= 1 / math.sqrt(3 * 4 * 4)
    assert not any(t.any() for n, t in model.named_parameters() if "relative_position_bias_table" in n)


# ---- stochastic depth ----------------------------------------------------------------------------------


def test_drop_path_is_identity_in_eval_and_per_sample_in_training():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=5, drop_path_rate=0.5)
    rates = [block.drop_path.p for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])  # linspace(0, rate, depth)
    reference = create_model("tiny", num_classes=5, drop_path_rate=0.0)
    reference.load_state_dict(model.state_dict())
    images = photos(32)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    drop = DropPath(0.5).train()
    scale = drop.sample_scale(torch.ones(2000, 3, 4))
    assert scale.shape == (2000, 1, 1) and set(scale.unique().tolist()) == {0.0, 2.0}  # dropped or 1/(1-p)
    assert (scale == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert drop.eval().sample_scale(torch.ones(2, 3)) is None and DropPath(0.0).sample_scale(scale) is None


# ---- config, presets, create_model ---------------------------------------------------------------------


def test_presets():
    tiny, base, large = model_config("tiny"), model_config("base"), model_config("large")
    assert (tiny.image_size, tiny.patch_size, tiny.grid, tiny.num_patches) == (32, 4, 8, 64)
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.vocab_size) == (64, 4, 4, 512)
    assert (base.embed_dim, base.depth, base.num_heads, base.vocab_size, base.grid) == (768, 12, 12, 8192, 14)
    assert (large.embed_dim, large.depth, large.num_heads, large.layer_scale_init) == (1024, 24, 16, 1e-5)
    assert model_config("small").embed_dim == 384 and set(PRESETS) == {"tiny", "small", "base", "large"}
    assert base.layer_scale_init == 0.1 and not base.use_abs_pos_emb and base.use_rel_pos_bias
    assert model_config("base", mim=True).rel_pos_shared and not base.rel_pos_shared
    assert model_config("base", shared_rel_pos_bias=True).rel_pos_shared  # the linear-probe layout


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("huge", {}, "unknown model preset 'huge'"),
        ("base", {"embed": 3}, "unknown model override key"),
        ("base", {"image_size": 225}, "not divisible by patch_size"),
        ("base", {"embed_dim": 100}, "not divisible by num_heads"),
        ("base", {"depth": 0}, "depth must be a positive integer"),
        ("base", {"image_size": "224"}, "image_size must be a positive integer"),
        ("base", {"drop_path_rate": 1.0}, "drop_path_rate must be below 1"),
        ("base", {"mim": "yes"}, "mim must be true or false"),
        ("base", {"mim": True, "num_classes": 10}, "no classification head"),
    ],
)
def test_config_errors(preset, overrides, message):
    with pytest.raises(BeitError, match=message):
        model_config(preset, **overrides)


def test_config_round_trip_and_toml(tmp_path):
    cfg = model_config("tiny", mim=True, drop_path_rate=0.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BeitError, match="unknown model config key"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
    path = tmp_path / "model.toml"
    path.write_text('[model]\npreset = "tiny"\nlayer_scale_init = 1e-5\ndepth = 2\n')
    section = dict(load_toml(path)["model"])
    loaded = model_config(section.pop("preset"), **section)
    assert (loaded.depth, loaded.layer_scale_init, loaded.embed_dim) == (2, 1e-5, 64)
    (tmp_path / "bad.toml").write_text("depth = \n")
    with pytest.raises(BeitError, match="not valid TOML"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(BeitError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_create_model_from_preset_or_config():
    model = beit.create_model("tiny", mim=True, depth=2)
    assert model.config == model_config("tiny", mim=True, depth=2) and len(model.blocks) == 2
    assert model.lm_head.out_features == 512 and model.head is None
    again = create_model(model.config, mim=False, num_classes=7)  # overrides apply to a config
    assert not again.config.mim and again.head.out_features == 7 and len(again.blocks) == 2
    assert create_model(again.config).config == again.config  # None keeps the config values
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


# ---- FLOPs and the CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_flops_equal_the_analytic_count(preset):
    cfg = model_config(preset, num_classes=1000)
    tokens, dim, n = cfg.num_patches + 1, cfg.embed_dim, cfg.num_patches
    per_block = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim
    per_block += 2 * 2 * tokens * dim * 4 * dim
    expected = cfg.depth * per_block + 2 * n * dim * 3 * cfg.patch_size**2 + 2 * dim * 1000
    assert count_flops(cfg) == expected
    mim = cfg.replace(num_classes=0, mim=True)
    head = 2 * dim * cfg.vocab_size
    # forward_mim runs the last block's queries, attention output, MLP and the head on masked rows only
    per_row = 2 * dim * dim + 2 * 2 * tokens * dim + 2 * dim * dim + 2 * 2 * dim * 4 * dim + head
    assert count_flops(mim, num_masked=10) - count_flops(mim, num_masked=9) == per_row
    last_block_on_cls = per_row - head
    assert count_flops(mim) == count_flops(mim, num_masked=n) + last_block_on_cls  # return_all_tokens


def test_cli_model_summary():
    result = CliRunner().invoke(app, ["model", "summary", "--preset", "tiny", "--mim"])
    assert result.exit_code == 0, result.output
    params = sum(p.numel() for p in create_model("tiny", mim=True).parameters())
    assert f"{params:,}" in result.output
    assert "on 24 masked patches" in result.output  # 75/196 of the 64 patches
    assert f"{count_flops(model_config('tiny', mim=True), num_masked=24):,}" in result.output
    result = CliRunner().invoke(app, ["model", "summary", "--preset", "base", "--num-classes", "1000"])
    assert "86,530,984" in result.output and "35." in result.output  # 35.1 GFLOPs = 17.6 GMACs


def test_cli_unknown_preset_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["beit", "model", "summary", "--preset", "huge"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model preset 'huge'") and err.count("\n") == 1
