"""Optimizer groups and schedules against the official pretraining rules (REFERENCE.md §7.1) and timm."""

import math

import numpy as np
import pytest
import torch
from timm.models.beit import Beit
from timm.optim import param_groups_weight_decay

from beit.errors import BeitError
from beit.model import create_model
from beit.train.optim import apply_schedule, build_optimizer, cosine_schedule, param_groups


def _names(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_groups_match_timm_except_that_the_shared_table_decays():
    # timm's rule is the official one except that timm also exempts relative-position tables from decay;
    # the official pretraining decays them (and the mask token).
    model = Beit(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        init_values=0.1,
        use_abs_pos_emb=True,
        use_shared_rel_pos_bias=True,
        num_classes=0,
    )
    ours = param_groups(model, 0.05)
    theirs = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    table = {"rel_pos_bias.relative_position_bias_table"}
    theirs_decay = next(g for g in theirs if g["weight_decay"] > 0)["params"]
    theirs_no_decay = next(g for g in theirs if g["weight_decay"] == 0)["params"]
    assert _names(model, ours[0]["params"]) == _names(model, theirs_decay) | table
    assert _names(model, ours[1]["params"]) == _names(model, theirs_no_decay) - table
    assert ours[0]["weight_decay"] == 0.05 and ours[1]["weight_decay"] == 0.0


def test_groups_of_our_pretraining_model():
    model = create_model("tiny", mim=True, depth=2)
    decay, no_decay = (_names(model, g["params"]) for g in param_groups(model, 0.05))
    assert {
        "mask_token",
        "rel_pos_bias.relative_position_bias_table",
        "lm_head.weight",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
    } <= decay
    assert {
        "cls_token",
        "lm_head.bias",
        "blocks.0.attn.q_bias",
        "blocks.0.attn.v_bias",
        "blocks.0.gamma_1",
        "blocks.1.norm2.weight",
        "norm.weight",
        "patch_embed.proj.bias",
    } <= no_decay
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {name for name, _ in model.named_parameters()}


def test_frozen_parameters_are_left_out():
    model = create_model("tiny", mim=True, depth=2)
    model.cls_token.requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert "cls_token" not in _names(model, groups[0]["params"] + groups[1]["params"])


def test_weight_decay_reaches_only_the_decay_group():
    # With zero gradients AdamW only applies the decoupled decay: p <- p (1 - lr wd).
    model = create_model("tiny", mim=True, depth=2)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ("mask_token", "lm_head.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(params[name].detach(), before[name] * (1 - 0.1 * 0.5))
    for name in ("cls_token", "lm_head.bias", "blocks.0.gamma_1", "norm.weight"):
        torch.testing.assert_close(params[name].detach(), before[name])
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_cosine_schedule_by_hand():
    values = cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2)
    # linspace(0, 1, 2) = [0, 1], then 0.5 (1 + cos(pi i / 4)) for i = 0..3
    expected = [0.0, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    np.testing.assert_allclose(values, expected, atol=1e-12)


def test_cosine_schedule_shape_and_ends():
    base, final = 1.5e-3, 1e-5
    values = cosine_schedule(base, final, total_steps=1000, warmup_steps=100)
    assert values.shape == (1000,)
    assert values[0] == 0.0 and values[99] == pytest.approx(base) and values[100] == pytest.approx(base)
    assert np.all(np.diff(values[:100]) > 0) and np.all(np.diff(values[100:]) < 0)
    assert values[550] == pytest.approx((base + final) / 2)  # halfway through the cosine part
    assert final < values[-1] < final + 1e-7
    no_warmup = cosine_schedule(0.05, 0.05, total_steps=10)  # constant weight decay (weight_decay_end unset)
    np.testing.assert_allclose(no_warmup, 0.05)


@pytest.mark.parametrize("steps,warmup", [(0, 0), (10, 10), (10, -1)])
def test_cosine_schedule_rejects_bad_lengths(steps, warmup):
    with pytest.raises(BeitError):
        cosine_schedule(1.0, 0.0, steps, warmup)


def test_apply_schedule_sets_lr_everywhere_and_decay_only_where_it_applies():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(
        [
            {"params": [model.weight], "weight_decay": 0.05, "lr_scale": 0.5},
            {"params": [model.bias], "weight_decay": 0.0},
        ],
        lr=1.0,
    )
    apply_schedule(optimizer, lr=2e-3, weight_decay=0.04)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2e-3)
    assert optimizer.param_groups[0]["weight_decay"] == 0.04
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
