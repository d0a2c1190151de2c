"""Checkpoints: our directories, official unilm / timm layouts, conversions and resampling (REFERENCE §6).

Oracles: timm's `Beit` (names, strict loading, outputs), SciPy's FITPACK spline `RectBivariateSpline`
(the port of the official `interp2d` table resampling) and timm's `resample_abs_pos_embed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from scipy.interpolate import RectBivariateSpline
from timm.layers import resample_abs_pos_embed as timm_resample_abs_pos_embed
from typer.testing import CliRunner

import beit
from beit import BeitError, load_checkpoint, save_checkpoint
from beit.cli import app, main
from beit.config import model_config
from beit.model import checkpoint as ckpt_module
from beit.model import create_model
from beit.model.checkpoint import infer_model_config, read_checkpoint
from beit.model.resample import cubic_spline_matrix, geometric_ratio, resample_rel_pos_table
from beit.model.vit import relative_position_index

LOGGER = "beit.model.checkpoint"


def official_offsets(src_side: int, dst_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target coordinates exactly as the official loop builds them (REFERENCE §6.5 step 5)."""
    q = geometric_ratio(src_side, dst_side)
    dis, cur = [], 1.0
    for i in range(src_side // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst_side // 2
    return x, np.arange(-t, t + 0.1, 1.0)


def scipy_resampled_table(table: torch.Tensor, dst_rows: int) -> torch.Tensor:
    """The official resampling with interp2d replaced by its equivalent RectBivariateSpline(s=0)."""
    src_side, dst_side = int((table.shape[0] - 3) ** 0.5), int((dst_rows - 3) ** 0.5)
    x, dx = official_offsets(src_side, dst_side)
    heads = []
    for h in range(table.shape[1]):
        z = table[:-3, h].reshape(src_side, src_side).double().numpy()
        heads.append(torch.from_numpy(RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(dx, dx)).reshape(-1))
    return torch.cat([torch.stack(heads, dim=1).to(table.dtype), table[-3:]])


def timm_beit(cfg, **kwargs) -> torch.nn.Module:
    """timm's Beit with the architecture of our config (the names oracle)."""
    shared = cfg.rel_pos_shared
    return timm.models.beit.Beit(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=cfg.num_classes,
        init_values=cfg.layer_scale_init or None,
        use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=cfg.use_rel_pos_bias and not shared,
        use_shared_rel_pos_bias=shared,
        global_pool="avg" if cfg.use_mean_pooling else "token",
        **kwargs,
    ).eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (tables, biases and γ are constant at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def official_pretrain_state(dim=64, depth=2, heads=4, patch=4, grid=8, vocab=512) -> dict[str, torch.Tensor]:
    """A `*_pt22k.pth` 'model' dict: the keys of REFERENCE §6.1 in registration order, with the index."""
    gen = torch.Generator().manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    state = {
        "cls_token": r(1, 1, dim),
        "mask_token": r(1, 1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "rel_pos_bias.relative_position_bias_table": r((2 * grid - 1) ** 2 + 3, heads) * 20,
        "rel_pos_bias.relative_position_index": relative_position_index(grid),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "gamma_1": r(dim), p + "gamma_2": r(dim),
            p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
            p + "attn.q_bias": r(dim), p + "attn.v_bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
        })  # fmt: skip
    state.update(
        {
            "norm.weight": r(dim),
            "norm.bias": r(dim),
            "lm_head.weight": r(vocab, dim),
            "lm_head.bias": r(vocab),
        }
    )
    return state


def official_file(path: Path, state: dict[str, torch.Tensor], key: str = "model") -> Path:
    """Save like the official trainer: model, optimizer, epoch, scaler and an argparse.Namespace of args."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones(3)
    optimizer.step()
    args = argparse.Namespace(
        model="beit_base_patch16_224_8k_vocab", lr=1.5e-3, input_size=224, layer_scale_init_value=0.1
    )
    torch.save(
        {
            key: state,
            "optimizer": optimizer.state_dict(),
            "epoch": 799,
            "scaler": {"scale": 65536.0},
            "args": args,
        },
        path,
    )
    return path


# ---- resampling math ---------------------------------------------------------------------------------


def test_geometric_ratio_matches_reference():
    """REFERENCE §12.2 row 5: 14→24, 14→32, 14→40 windows (table sides 27→47, 63, 79)."""
    assert round(geometric_ratio(27, 47), 6) == 1.090307
    assert round(geometric_ratio(27, 63), 6) == 1.134918
    assert round(geometric_ratio(27, 79), 6) == 1.168504


@pytest.mark.parametrize(("src_grid", "dst_grid"), [(14, 24), (14, 32), (8, 12), (6, 4)])
def test_table_resampling_matches_scipy_spline(src_grid, dst_grid):
    src_rows, dst_rows = (2 * src_grid - 1) ** 2 + 3, (2 * dst_grid - 1) ** 2 + 3
    table = torch.randn(src_rows, 3, generator=torch.Generator().manual_seed(src_grid))
    ours = resample_rel_pos_table(table, dst_rows)
    assert ours.shape == (dst_rows, 3) and ours.dtype == table.dtype
    torch.testing.assert_close(ours, scipy_resampled_table(table, dst_rows), rtol=0, atol=1e-6)
    assert torch.equal(ours[-3:], table[-3:])  # the CLS entries are carried over unchanged


def test_table_resampling_sizes_and_identity():
    table = torch.randn(732, 12)
    assert resample_rel_pos_table(table, 2212).shape == (2212, 12)  # 224 → 384 px at patch 16
    assert resample_rel_pos_table(table, 732) is table  # same size: untouched
    # a constant field stays constant (the spline reproduces cubics), CLS rows included
    flat = torch.full((732, 2), 0.25)
    torch.testing.assert_close(resample_rel_pos_table(flat, 3972), torch.full((3972, 2), 0.25))
    with pytest.raises(BeitError, match="not \\(2W-1\\)"):
        resample_rel_pos_table(torch.zeros(100, 2), 732)


@settings(max_examples=25, deadline=None)
@given(
    xs=st.lists(st.floats(0.05, 3.0), min_size=4, max_size=9),
    ys=st.lists(st.floats(0.05, 3.0), min_size=4, max_size=9),
    seed=st.integers(0, 2**16),
)
def test_spline_matrix_matches_fitpack_on_any_grid(xs, ys, seed):
    """S_y Z S_xᵀ equals FITPACK's s=0 bicubic spline on arbitrary increasing grids, inside and outside."""
    x, y = np.cumsum(xs) - 2.0, np.cumsum(ys) - 2.0
    z = np.random.default_rng(seed).normal(size=(len(y), len(x)))
    xq = np.linspace(x[0] - 0.5, x[-1] + 0.5, 11)  # beyond the ends FITPACK clamps, and so must we
    yq = np.linspace(y[0] - 0.5, y[-1] + 0.5, 7)
    ours = cubic_spline_matrix(y, yq) @ z @ cubic_spline_matrix(x, xq).T
    np.testing.assert_allclose(ours, RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)(yq, xq), rtol=0, atol=1e-6)


def test_pos_embed_resize_matches_timm_bicubic():
    from beit.model.resample import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 16, generator=torch.Generator().manual_seed(3))
    ours = resample_abs_pos_embed(pos, 1 + 24 * 24)
    reference = timm_resample_abs_pos_embed(
        pos, [24, 24], num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    torch.testing.assert_close(ours, reference)
    assert torch.equal(ours[:, 0], pos[:, 0])
    assert resample_abs_pos_embed(pos, 197) is pos


# ---- our directories -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mim", [True, False])
def test_round_trip_of_our_directory_is_bitwise(tmp_path, mim):
    model = randomize(create_model("tiny", mim=mim, num_classes=0 if mim else 7, depth=2))
    fingerprint = {"name": "dvae", "vocab_size": 512, "weights_sha256": "ab" * 32}
    out = save_checkpoint(
        model, tmp_path / "ckpt", extra={"tokenizer": fingerprint, "provenance": {"step": 3}}
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == ckpt_module.FORMAT_VERSION
    assert config["tokenizer"] == fingerprint and config["provenance"] == {"step": 3}
    assert config["model"] == model.config.to_dict()
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert not any("relative_position_index" in k for k in saved)  # non-persistent buffers stay out

    loaded = load_checkpoint(out).eval()
    assert loaded.config == model.config
    x = images(32)
    with torch.no_grad():
        if mim:
            mask = torch.zeros(2, 64, dtype=torch.bool)
            mask[:, ::3] = True
            assert torch.equal(loaded(x, mask), model(x, mask))
        else:
            assert torch.equal(loaded(x), model(x))
    assert load_checkpoint(out / "model.safetensors").config == model.config  # the file, with its config.json


def test_wrapped_models_save_and_load_without_prefixes(tmp_path):
    model = randomize(create_model("tiny", depth=1))
    compiled = torch.compile(model)  # not run: only its `_orig_mod.` state-dict prefix matters here
    save_checkpoint(compiled, tmp_path / "ckpt")
    assert set(load_file(tmp_path / "ckpt" / "model.safetensors")) == set(model.state_dict())
    target = torch.compile(create_model("tiny", depth=1))
    assert load_checkpoint(tmp_path / "ckpt", target) is target
    assert torch.equal(target._orig_mod.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(BeitError, match="expected a BEiT model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_save_overwrites_and_rejects_bad_metadata(tmp_path):
    first, second = randomize(create_model("tiny", depth=1), 0), randomize(create_model("tiny", depth=1), 1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metrics.jsonl").write_text("{}\n")  # a run directory: other files stay
    save_checkpoint(first, tmp_path / "ckpt")
    save_checkpoint(second, tmp_path / "ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "ckpt")(images(32)), second(images(32)))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
    ]
    with pytest.raises(BeitError, match="reserved"):
        save_checkpoint(first, tmp_path / "x", extra={"model": {}})
    with pytest.raises(BeitError, match="not JSON-serializable"):
        save_checkpoint(first, tmp_path / "x", extra={"tensor": torch.zeros(1)})
    assert not (tmp_path / "x").exists()


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    old = randomize(create_model("tiny", depth=1), 0)
    new = randomize(create_model("tiny", depth=1), 1)
    save_checkpoint(old, tmp_path / "kept")

    def crash_while_writing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_module, "save_file", crash_while_writing)
        with pytest.raises(RuntimeError, match="disk full"):
            save_checkpoint(new, tmp_path / "fresh")
        with pytest.raises(RuntimeError, match="disk full"):
            save_checkpoint(new, tmp_path / "kept")
    assert list((tmp_path / "fresh").iterdir()) == []  # no temporary file left behind
    with pytest.raises(BeitError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "fresh")
    # the crash came before any rename: the previous checkpoint is still whole
    assert torch.equal(load_checkpoint(tmp_path / "kept")(images(32)), old(images(32)))

    real_replace = ckpt_module.os.replace

    def crash_before_marker(src, dst):
        if Path(dst).name == "config.json":
            raise RuntimeError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", crash_before_marker)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(new, tmp_path / "kept")  # new weights in place, the marker not yet
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["model.safetensors"]
    with pytest.raises(BeitError, match="config.json is missing"):
        load_checkpoint(tmp_path / "kept")


# ---- timm interop --------------------------------------------------------------------------------------


def test_our_checkpoint_loads_into_timm_beit_base_strict(tmp_path):
    """Names and shapes of the real base model (outputs are compared on the tiny variants below)."""
    with torch.device("meta"):  # skip both initializations: ~86M parameters each on a shared CPU
        model = create_model("base", num_classes=1000)
        reference = timm.create_model("beit_base_patch16_224", pretrained=False)
    model.to_empty(device="cpu")
    save_checkpoint(model, tmp_path / "base")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    assert reference.load_state_dict(weights, strict=True, assign=True).missing_keys == []
    parameters = sum(v.numel() for v in weights.values())
    assert parameters == 86_530_984  # REFERENCE §6.3: base fine-tune, 1000 classes


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # BEiT+ fine-tuning: per-block tables, LayerScale, mean pooling
        {"shared_rel_pos_bias": True},  # the linear-probe layout: one shared table
        {
            "use_abs_pos_emb": True,
            "use_rel_pos_bias": False,
            "layer_scale_init": 0.0,
            "num_heads": 1,
        },  # plain ViT
        {"use_mean_pooling": False, "mlp_ratio": 2.0},  # CLS token + final norm
    ],
)
def test_timm_interop_both_ways(tmp_path, overrides):
    cfg = model_config("tiny", num_classes=5, depth=2, **overrides)
    ours = randomize(create_model(cfg))
    save_checkpoint(ours, tmp_path / "ours")
    theirs = timm_beit(cfg)
    theirs.load_state_dict(load_file(tmp_path / "ours" / "model.safetensors"), strict=True)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)

    randomize(theirs, seed=5)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    back = load_checkpoint(tmp_path / "timm.pth").eval()  # config inferred from the shapes alone
    assert back.config == cfg.replace(
        vocab_size=back.config.vocab_size, drop_path_rate=back.config.drop_path_rate
    )
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-5)


# ---- official checkpoints ------------------------------------------------------------------------------


def test_official_pretraining_pth_loads_as_mim_model(tmp_path):
    state = official_pretrain_state()
    path = official_file(tmp_path / "beit_tiny_pt22k.pth", state)
    model = load_checkpoint(path)
    cfg = model.config
    assert (cfg.mim, cfg.vocab_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.grid) == (
        True,
        512,
        64,
        2,
        4,
        8,
    )
    assert cfg.rel_pos_shared and cfg.layer_scale_init > 0 and not cfg.use_abs_pos_emb
    loaded = model.state_dict()
    assert set(loaded) == set(state) - {"rel_pos_bias.relative_position_index"}  # the §6.1 key set exactly
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


def test_official_pretraining_pth_into_finetuning_model_copies_shared_table(tmp_path, caplog):
    """REFERENCE §12.2 row 8, and the keys the fine-tuning layout does not use are reported, not loaded."""
    state = official_pretrain_state()
    path = official_file(tmp_path / "pt.pth", state)
    target = create_model("tiny", num_classes=10, depth=2)
    fresh_head = target.head.weight.clone()
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = load_checkpoint(path, target)
    assert model is target
    shared = state["rel_pos_bias.relative_position_bias_table"]
    for block in model.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    assert torch.equal(model.blocks[1].gamma_2, state["blocks.1.gamma_2"])
    assert torch.equal(model.head.weight, fresh_head)  # freshly initialized, not touched
    ignored = next(r.message for r in caplog.records if "layout does not use" in r.message)
    for key in ("mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"):
        assert key in ignored
    assert "fc_norm.weight" in caplog.text


def test_official_finetuned_and_segmentation_files_load(tmp_path, caplog):
    cfg = model_config("tiny", num_classes=6, depth=2)
    reference = randomize(timm_beit(cfg), seed=7)
    state = {**reference.state_dict()}
    for i in range(cfg.depth):  # official fine-tuned files carry the index of every block
        state[f"blocks.{i}.attn.relative_position_index"] = relative_position_index(cfg.grid)
    ddp = official_file(tmp_path / "ft.pth", {f"module.{k}": v for k, v in state.items()}, key="module")
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(ddp).eval()(x), reference(x), rtol=1e-5, atol=1e-5)

    segmentation = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    segmentation["decode_head.conv_seg.weight"] = torch.zeros(150, 8, 1, 1)
    torch.save({"state_dict": segmentation, "meta": {"epoch": 3}}, tmp_path / "ade.pth")
    caplog.set_level(logging.INFO, logger=LOGGER)
    backbone = load_checkpoint(tmp_path / "ade.pth", create_model("tiny", depth=2, num_classes=0))
    assert torch.equal(backbone.blocks[1].attn.qkv.weight, reference.blocks[1].attn.qkv.weight)
    assert "decode_head.conv_seg.weight" in caplog.text


def test_224_checkpoint_loads_into_384_model(tmp_path, caplog):
    """Shared pretraining table → per-block tables, each resampled 732 → 2212 rows; pos_embed 197 → 577."""
    small = dict(embed_dim=32, depth=2, num_heads=2, patch_size=16, vocab_size=64)
    pretrained = randomize(create_model("base", mim=True, use_abs_pos_emb=True, **small))
    save_checkpoint(pretrained, tmp_path / "pt224")
    target = create_model("base", image_size=384, num_classes=3, use_abs_pos_emb=True, **small)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = load_checkpoint(tmp_path / "pt224", target).eval()

    shared = pretrained.rel_pos_bias.relative_position_bias_table.detach()
    assert shared.shape == (732, 2)
    expected = scipy_resampled_table(shared, 2212)
    for block in model.blocks:
        table = block.attn.relative_position_bias_table.detach()
        assert table.shape == (2212, 2)
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
        assert torch.equal(table[-3:], shared[-3:])
    assert model.pos_embed.shape == (1, 577, 32)
    assert torch.equal(model.pos_embed[:, 0], pretrained.pos_embed[:, 0])
    assert "relative_position_bias_table (732 -> 2212 rows)" in caplog.text
    assert model(images(384, batch=1)).shape == (1, 3)


def test_finetuned_head_of_other_shape_is_dropped_with_warning(tmp_path, caplog):
    source = randomize(create_model("tiny", num_classes=10, depth=1))
    save_checkpoint(source, tmp_path / "ft10")
    target = create_model("tiny", num_classes=4, depth=1)
    fresh = target.head.weight.clone()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    load_checkpoint(tmp_path / "ft10", target)
    assert torch.equal(target.head.weight, fresh)
    assert torch.equal(target.fc_norm.weight, source.fc_norm.weight)
    assert "dropped the checkpoint's head [10, 64] (model: [4, 64])" in caplog.text


# ---- mistakes ------------------------------------------------------------------------------------------


def one_line_error(path, model=None, **kwargs) -> str:
    with pytest.raises(BeitError) as info:
        load_checkpoint(path, model, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_wrong_shape_names_every_mismatched_key_with_both_shapes(tmp_path):
    save_checkpoint(create_model("tiny", depth=2), tmp_path / "tiny")
    message = one_line_error(tmp_path / "tiny", create_model("tiny", depth=2, embed_dim=32))
    assert "patch_embed.proj.weight (checkpoint [64, 3, 4, 4] vs model [32, 3, 4, 4])" in message
    assert "blocks.{0..1}.attn.qkv.weight (checkpoint [192, 64] vs model [96, 32])" in message
    assert "cls_token" in message and "fc_norm.weight" in message


def test_wrong_kind_names_the_keys(tmp_path):
    no_layer_scale = tmp_path / "plain"
    save_checkpoint(create_model("tiny", depth=2, layer_scale_init=0.0), no_layer_scale)
    message = one_line_error(no_layer_scale, create_model("tiny", depth=2))  # the §6.5 pitfall: fail loudly
    assert "missing blocks.{0..1}.gamma_1, blocks.{0..1}.gamma_2" in message

    save_checkpoint(create_model("tiny", depth=2, num_classes=3), tmp_path / "ft")
    message = one_line_error(tmp_path / "ft", create_model("tiny", depth=2, mim=True))
    assert "rel_pos_bias.relative_position_bias_table" in message and "lm_head.weight" in message
    assert "unexpected blocks.{0..1}.attn.relative_position_bias_table" in message

    save_checkpoint(create_model("tiny", depth=3), tmp_path / "deep")
    shallow = create_model("tiny", depth=2)
    message = one_line_error(tmp_path / "deep", shallow)
    assert "unexpected blocks.2.attn.proj.bias" in message and "blocks.2.norm1.weight" in message
    load_checkpoint(tmp_path / "deep", shallow, strict=False)  # non-strict: logged, the rest loads

    save_file({"encoder.conv.w": torch.zeros(4, 3, 7, 7)}, tmp_path / "tokenizer.safetensors")
    assert "not a BEiT checkpoint: no patch_embed.proj.weight" in one_line_error(
        tmp_path / "tokenizer.safetensors"
    )


def test_classifier_of_the_other_pooling_is_refused(tmp_path):
    save_checkpoint(create_model("tiny", depth=1, num_classes=3, use_mean_pooling=False), tmp_path / "cls")
    message = one_line_error(tmp_path / "cls", create_model("tiny", depth=1, num_classes=3))
    assert "use_mean_pooling=False" in message
    load_checkpoint(tmp_path / "cls", create_model("tiny", depth=1, num_classes=3, use_mean_pooling=False))
    # A pretrained backbone (no head) still loads into a mean-pooling classifier (norm.* ignored).
    save_checkpoint(create_model("tiny", depth=1, mim=True), tmp_path / "pretrained")
    load_checkpoint(tmp_path / "pretrained", create_model("tiny", depth=1, num_classes=3))


def test_missing_and_unknown_paths(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope")
    (tmp_path / "weights.npz").write_bytes(b"x")
    assert "unknown checkpoint format '.npz'" in one_line_error(tmp_path / "weights.npz")
    (tmp_path / "broken.pth").write_bytes(b"not a zip or a pickle")
    assert "cannot read checkpoint" in one_line_error(tmp_path / "broken.pth")  # refused, not unpickled
    (tmp_path / "newer").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "newer" / "model.safetensors")
    (tmp_path / "newer" / "config.json").write_text(json.dumps({"format_version": 99, "model": {}}))
    assert "upgrade beit" in one_line_error(tmp_path / "newer")


class _TouchFile:
    """A pickle payload: unpickling it would call open(path, 'w'), creating the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _SystemCall:
    """A pickle payload from a module torch blocks outright: unpickling it would run a shell command."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    for payload, name in ((_TouchFile, "open"), (_SystemCall, "system")):
        marker = tmp_path / f"pwned-{name}"
        torch.save({"model": {"w": torch.zeros(2)}, "payload": payload(str(marker))}, tmp_path / "evil.pth")
        message = one_line_error(tmp_path / "evil.pth")
        assert "refusing to load" in message and name in message, message
        assert not marker.exists()


def test_state_dict_reader_normalizes_official_wrappers(tmp_path):
    state = official_pretrain_state(depth=1)
    path = official_file(tmp_path / "pt.pth", {f"module.{k}": v for k, v in state.items()})
    read, config = read_checkpoint(path)
    assert config is None
    assert set(read) == set(state) - {"rel_pos_bias.relative_position_index"}
    assert infer_model_config(read).mim


def test_cli_convert_official_pretraining_to_finetuning_at_new_size(tmp_path):
    state = official_pretrain_state()
    source = official_file(tmp_path / "pt.pth", state)
    out = tmp_path / "ft48"
    args = ["checkpoint", "convert", str(source), str(out), "--num-classes", "3", "--image-size", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = load_checkpoint(out)
    assert (model.config.mim, model.config.num_classes, model.config.grid) == (False, 3, 12)
    expected = scipy_resampled_table(state["rel_pos_bias.relative_position_bias_table"], 23 * 23 + 3)
    for block in model.blocks:
        torch.testing.assert_close(
            block.attn.relative_position_bias_table.detach(), expected, rtol=0, atol=1e-6
        )
    assert json.loads((out / "config.json").read_text())["converted_from"] == str(source)

    result = CliRunner().invoke(app, ["checkpoint", "info", str(source)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model"]["mim"] and info["model"]["vocab_size"] == 512 and info["kind"].startswith("official")
    assert info["parameters"] == sum(v.numel() for k, v in state.items() if "index" not in k)


def test_cli_error_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["beit", "checkpoint", "info", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not exist" in err and err.count("\n") == 1


def test_public_api():
    assert beit.save_checkpoint is save_checkpoint and beit.load_checkpoint is load_checkpoint
