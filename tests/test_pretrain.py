"""The pretraining loop end to end on real shards (digits tokenized by the job, tiny preset): it learns,
writes what it promises, resumes a killed run exactly, and runs as two gloo processes on uneven shards."""

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from shard_helpers import damage_jpegs
from torch.optim.optimizer import register_optimizer_step_pre_hook

from beit.config import PretrainConfig, pretrain_config
from beit.errors import BeitError
from beit.model import create_model
from beit.model.checkpoint import load_checkpoint
from beit.shards import open_shard_set
from beit.train.loader import Normalize, shard_loader
from beit.train.masking import MaskGenerator
from beit.train.optim import cosine_schedule
from beit.train.pretrain import TRAINER_STATE, checkpoints, pretrain

TINY = dict(preset="tiny", model={"depth": 2}, num_workers=1, tensorboard=False)
# One intra-op thread: on a small shared machine two threads per process fight for the cores (3-10x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _token_counts(shards: Path) -> Counter:
    counts = Counter()
    for shard in open_shard_set(shards).shards:
        with tarfile.open(shard.path) as tar:
            for member in tar:
                if member.name.endswith(".tokens.npy"):
                    counts.update(np.load(io.BytesIO(tar.extractfile(member).read())).ravel().tolist())
    return counts


@pytest.fixture(scope="module")
def tiny_run(digits_shards, tmp_path_factory) -> Iterator[tuple[PretrainConfig, dict]]:
    cfg = pretrain_config(
        **TINY,
        shards=str(digits_shards),
        output=str(tmp_path_factory.mktemp("run") / "tiny"),
        steps=100,
        warmup_steps=10,
        batch_size=32,
        log_every=10,
        save_every=50,
        keep_last=1,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield cfg, pretrain(cfg)
    finally:
        torch.set_num_threads(threads)


def test_loss_falls_and_masked_accuracy_beats_context_free_guessing(tiny_run, digits_shards):
    cfg, final = tiny_run
    records = _metrics(Path(cfg.output))
    assert [r["step"] for r in records] == list(range(10, 101, 10))
    assert final == records[-1]
    vocab = 512
    assert records[0]["loss"] > 0.9 * math.log(vocab)  # starts near uniform guessing
    assert final["loss"] < 0.5 * math.log(vocab)
    assert final["mlm_acc"] > 50 / vocab
    # Stronger: better than always naming the most frequent token, so the encoder uses the visible context.
    counts = _token_counts(digits_shards)
    majority = max(counts.values()) / sum(counts.values())
    assert len(counts) > 20 and majority < 0.5  # the tokens carry information (precondition)
    assert final["mlm_acc"] > majority
    # ~24 of 64 patches masked per image (blockwise masks stop early at times).
    assert 20 < final["masked_per_image"] <= 24
    schedule = cosine_schedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup_steps)
    assert [r["lr"] for r in records] == pytest.approx([schedule[r["step"] - 1] for r in records])
    assert all(r["grad_norm"] > 0 and r["images_per_s"] > 0 and r["skipped"] == 0 for r in records)


def test_run_directory_holds_checkpoints_and_a_fine_tunable_model(tiny_run, digits_shards):
    cfg, _ = tiny_run
    run = Path(cfg.output)
    assert [step for step, _ in checkpoints(run)] == [100]  # keep_last=1 pruned step 50
    assert not list((run / "checkpoints").glob(".tmp-*"))
    last = run / "checkpoints" / "step_00000100"
    assert {
        "model.safetensors",
        "config.json",
        "optimizer.bin",
        "random_states_0.pkl",
        "trainer_state.json",
    } <= {p.name for p in last.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["tokenizer"] == open_shard_set(digits_shards).tokenizer
    assert config["pretrain"]["config"]["steps"] == 100
    model = load_checkpoint(run)
    assert model.config == cfg.model_config()
    final_weights = load_checkpoint(last).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, final_weights[name])
    assert json.loads((run / "pretrain.json").read_text()) == cfg.to_dict()


def test_compiled_run_follows_the_eager_losses_and_saves_plain_names(digits_shards, tmp_path, one_thread):
    # --compile: torch.compile (inductor, C++ on the CPU; about a minute to compile) of the whole model,
    # split into graphs where the masked rows are selected. Same data and seed: the same loss curve.
    losses = {}
    for compiled in (False, True):
        cfg = pretrain_config(
            **{**TINY, "num_workers": 0},
            shards=str(digits_shards),
            output=str(tmp_path / f"compiled-{compiled}"),
            steps=4,
            warmup_steps=1,
            batch_size=16,
            log_every=1,
            save_every=100,
            compile=compiled,
        )
        pretrain(cfg)
        losses[compiled] = [r["loss"] for r in _metrics(Path(cfg.output))]
    assert len(losses[True]) == 4 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    model = load_checkpoint(tmp_path / "compiled-True")  # strict load: no `_orig_mod.` prefixes
    assert model.config.depth == 2


def _short_run(shards: Path, run: Path, resume: bool = False, **options) -> list[dict]:
    cfg = pretrain_config(
        **{**TINY, "num_workers": 0, "drop_path": 0.0},  # no stochastic depth: runs comparable bit for bit
        shards=str(shards),
        output=str(run),
        warmup_steps=1,
        log_every=1,
        **options,
    )
    pretrain(cfg, resume=resume)
    return _metrics(run)


def test_gradient_accumulation_averages_over_every_masked_token_of_the_step(
    digits_shards, tmp_path, one_thread
):
    # Two micro-batches of 8 are the same samples and masks as one batch of 16 (masks are seeded per stream
    # position), but they hold different numbers of masked tokens: only a loss averaged over all the step's
    # masked tokens gives the 16-batch's gradient (a mean of per-micro-batch means weights tokens unevenly).
    # 48 of 64 patches: the blockwise masks then often stop short (46-48 tokens), unlike the default 24.
    runs = {"whole": (16, 1), "accum": (8, 2)}
    whole, accumulated = (
        _short_run(digits_shards, tmp_path / name, steps=3, batch_size=size, grad_accum=accum, num_masked=48)
        for name, (size, accum) in runs.items()
    )
    assert len({r["masked_per_image"] for r in whole}) > 1  # precondition: masks of uneven sizes
    for ours, theirs in zip(accumulated, whole, strict=True):
        for key in ("loss", "mlm_acc", "grad_norm", "masked_per_image"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["step"], key)
    torch.testing.assert_close(
        load_checkpoint(tmp_path / "accum").state_dict(), load_checkpoint(tmp_path / "whole").state_dict()
    )


def test_resume_with_another_accumulation_continues_the_data_stream(digits_shards, tmp_path, one_thread):
    run = tmp_path / "run"
    _short_run(digits_shards, run, steps=2, batch_size=8, grad_accum=2, save_every=2, epoch_batches=10)
    records = _short_run(
        digits_shards, run, resume=True, steps=3, batch_size=8, grad_accum=3, epoch_batches=10
    )
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["epoch"] == pytest.approx((2 * 2 + 3) / 10)  # 4 micro-batches, then 3 more
    state = json.loads((run / "checkpoints" / "step_00000003" / TRAINER_STATE).read_text())
    assert state["batches"] == 7


def test_refuses_to_overwrite_a_run_or_resume_another_model(tiny_run):
    cfg, _ = tiny_run
    with pytest.raises(BeitError, match="already holds a run"):
        pretrain(cfg)
    other = pretrain_config(**{**cfg.to_dict(), "model": {"depth": 3}})
    with pytest.raises(BeitError, match="another model configuration"):
        pretrain(other, resume=True)


def test_optimizer_uses_the_configured_settings_and_step_one_matches_a_recomputation(
    digits_shards, tmp_path, one_thread
):
    # What the optimizer is given at every step (not what is logged), and the first step's loss and
    # gradient norm recomputed from scratch: same init, first batch, masks, row-major targets, mean CE.
    options = dict(clip_grad=0.01, betas=(0.8, 0.99), eps=1e-6, min_aspect=0.5)
    cfg = pretrain_config(
        **{**TINY, "num_workers": 0, "drop_path": 0.0},
        shards=str(digits_shards),
        output=str(tmp_path / "run"),
        steps=4,
        warmup_steps=1,
        batch_size=16,
        log_every=1,
        **options,
    )
    seen = []

    def spy(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        groups = [(g["lr"], g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in optimizer.param_groups]
        seen.append((groups, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))

    handle = register_optimizer_step_pre_hook(spy)
    try:
        pretrain(cfg)
    finally:
        handle.remove()
    records = _metrics(Path(cfg.output))
    lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup_steps)
    assert len(seen) == cfg.steps
    for k, (((lr_decay, wd_decay, betas, eps), (lr_rest, wd_rest, _, _)), norm) in enumerate(seen):
        assert lr_decay == pytest.approx(lr[k]) and lr_rest == pytest.approx(lr[k]), k
        assert (wd_decay, wd_rest) == (pytest.approx(cfg.weight_decay), 0.0), k  # no weight_decay_end
        assert (betas, eps) == (cfg.betas, cfg.eps)
        assert norm <= cfg.clip_grad * (1 + 1e-4), k  # clipped to the L2 bound

    set_seed(cfg.seed)
    model = create_model(cfg.model_config()).train()
    masks = MaskGenerator(8, 24, min_block=5, min_aspect=0.5)
    loader = shard_loader(open_shard_set(digits_shards), batch_size=16, masks=masks, num_workers=0)
    images, tokens, mask, *_ = next(iter(loader))
    logits = model(Normalize.named("half")(images), mask)
    loss = F.cross_entropy(logits, tokens.flatten(1)[mask])
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(grads))
    assert records[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)


def _command(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "beit",
        "pretrain",
        str(shards),
        "--output",
        str(run),
        "--preset",
        "tiny",
        "--model",
        "depth=2",
        "--no-tensorboard",
        *extra,
    ]


def test_killed_run_resumes_at_the_same_step_and_continues_the_curve(digits_shards, tmp_path):
    # Two workers, 2 micro-batches per step, and every 9th JPEG undecodable: the resume point lands in the
    # middle of a pass after skipped samples, so this exercises the exact data-stream positions each
    # process records in its checkpoint (counting batches alone would start a stream early) as well as the
    # training state.
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    assert damage_jpegs(shards, every=9) > 0
    args = [
        "--steps",
        "16",
        "--warmup-steps",
        "4",
        "--batch-size",
        "16",
        "--grad-accum",
        "2",
        "--log-every",
        "1",
        "--save-every",
        "4",
        "--num-workers",
        "2",
        "--epoch-batches",
        "7",
    ]
    subprocess.run(_command(shards, tmp_path / "whole", *args), check=True, capture_output=True, env=ENV)
    reference = _metrics(tmp_path / "whole")
    assert sum(r["skipped"] for r in reference) > 0

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(shards, run, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.monotonic() + 240
    while not ((run / "checkpoints" / "step_00000008").is_dir() and _lines(run) >= 10):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 8 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resume_step = checkpoints(run)[-1][0]
    assert 8 <= resume_step < 16 and _lines(run) > resume_step  # it had gone past the checkpoint

    assert (run / "checkpoints" / f"step_{resume_step:08d}" / "loader_0.json").is_file()
    subprocess.run(_command(shards, run, *args, "--resume"), check=True, capture_output=True, env=ENV)
    resumed = _metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 17))  # each step once: the killed tail was dropped
    assert checkpoints(run)[-1][0] == 16
    for ours, theirs in zip(resumed, reference, strict=True):
        for key in ("step", "loss", "mlm_acc", "lr", "wd", "grad_norm", "masked_per_image", "skipped"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (ours["step"], key)


def test_two_process_gloo_run_on_uneven_shards_finishes_and_resumes_exactly(digits_shards, tmp_path):
    # Shards of 250, 250 and 100 samples: rank 0 streams 350, rank 1 250, yet both run the same steps.
    run = tmp_path / "ddp"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
    ]
    command = _command(
        digits_shards,
        run,
        "--steps",
        "12",
        "--warmup-steps",
        "2",
        "--batch-size",
        "16",
        "--log-every",
        "4",
        "--save-every",
        "6",
        "--mixed-precision",
        "bf16",
    )
    done = subprocess.run(torchrun + command[1:], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _metrics(run)
    assert [r["step"] for r in records] == [4, 6, 8, 12]  # every 4 steps and at each checkpoint
    schedule = cosine_schedule(2e-3, 1e-5, 12, 2)  # the tiny preset's lr: per optimizer step, any world size
    assert [r["lr"] for r in records] == pytest.approx([schedule[r["step"] - 1] for r in records])
    assert records[0]["epoch"] == pytest.approx(4 / (600 // (16 * 2)))  # epoch length counts both ranks
    assert records[-1]["images_per_s"] > 0
    last = run / "checkpoints" / "step_00000012"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last.iterdir()}
    # A different stochastic-depth stream on each rank (Accelerate's loader: weights only, numpy allowed).
    seeds = [accelerate_load(last / f"random_states_{rank}.pkl")["torch_manual_seed"] for rank in (0, 1)]
    assert not torch.equal(*seeds)
    assert (run / "model.safetensors").is_file()

    # Back to the step-6 checkpoint, as after a kill: each rank restores its own RNG state (stochastic
    # depth) and stream position, so the resumed steps 7-12 repeat the first run's.
    shutil.rmtree(last)
    done = subprocess.run(torchrun + command[1:] + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _metrics(run)
    assert [r["step"] for r in resumed] == [4, 6, 8, 12]
    for ours, theirs in zip(resumed, records, strict=True):
        for key in ("loss", "mlm_acc", "lr", "grad_norm", "epoch"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (ours["step"], key)


def test_cli_refuses_shards_of_another_vocabulary_in_one_line(digits_shards, tmp_path):
    command = _command(digits_shards, tmp_path / "run")
    command[command.index("tiny")] = "base"  # 8192 tokens on a 14x14 grid vs the shards' 512 on 8x8
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "512-token vocabulary" in done.stderr
    assert not (tmp_path / "run").exists()


def test_config_precedence_preset_then_toml_then_options(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nlr = 1e-3\nsteps = 50\n[model]\ndepth = 2\n')
    cfg = pretrain_config(toml, steps=40, lr=None)
    assert (cfg.preset, cfg.lr, cfg.steps, cfg.batch_size) == ("tiny", 1e-3, 40, 64)  # batch from the preset
    assert cfg.model_config().depth == 2 and cfg.model_config().mim
    base = pretrain_config()
    assert (base.lr, base.min_lr, base.weight_decay, base.betas, base.clip_grad, base.drop_path) == (
        1.5e-3,
        1e-5,
        0.05,
        (0.9, 0.999),
        3.0,
        0.1,
    )
    assert base.model_config().layer_scale_init == 0.1 and base.model_config().rel_pos_shared
    assert (base.steps, base.warmup_steps, base.batch_size, base.eps, base.min_aspect) == (
        500_000,
        6_250,
        128,
        1e-8,
        0.3,
    )
    assert pretrain_config(layer_scale=0.02).model_config().layer_scale_init == 0.02
    assert pretrain_config(preset="large").clip_grad == 1.0
    assert pretrain_config(preset="large").model_config().layer_scale_init == 1e-5
    with pytest.raises(BeitError, match="unknown pretraining option"):
        pretrain_config(learning_rate=1.0)
    with pytest.raises(BeitError, match="warmup_steps"):
        pretrain_config(steps=10, warmup_steps=10)
    with pytest.raises(BeitError, match="unknown model override"):
        pretrain_config(model={"width": 3})


def test_cli_sets_every_pretraining_option(run_cli, monkeypatch):
    import inspect

    from beit.cli import pretrain_command

    options = set(inspect.signature(pretrain_command).parameters) - {"config", "resume"}
    assert options == {f.name for f in dataclasses.fields(PretrainConfig)}  # every value has an option

    seen = []
    monkeypatch.setattr("beit.train.pretrain.pretrain", lambda cfg, resume: seen.append(cfg) or {})
    args = ["pretrain", "shards/x", "--preset", "tiny", "--betas", "0.8", "0.99", "--eps", "1e-6"]
    assert run_cli(*args, "--min-aspect", "0.5", "--model", "depth=3")[0] == 0
    assert run_cli("pretrain", "shards/x", "--preset", "tiny")[0] == 0
    given, defaults = seen
    assert (given.betas, given.eps, given.min_aspect, given.model) == ((0.8, 0.99), 1e-6, 0.5, {"depth": 3})
    assert (defaults.betas, defaults.eps, defaults.min_aspect) == ((0.9, 0.999), 1e-8, 0.3)
    code, _, err = run_cli("pretrain", "shards/x", "--steps", "1000")  # base: 6,250 warmup steps
    assert code == 2 and "--warmup-steps" in err and err.strip().count("\n") == 0


def test_resuming_a_finished_run_or_a_damaged_checkpoint(tiny_run, tmp_path, monkeypatch, caplog):
    cfg, final = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(cfg.output, moved)
    monkeypatch.chdir(Path(cfg.shards).parent)  # the same shards by a relative path: not a changed setting
    again = pretrain_config(**{**cfg.to_dict(), "output": str(moved), "shards": Path(cfg.shards).name})
    with caplog.at_level(logging.WARNING, logger="beit.train.pretrain"):
        assert pretrain(again, resume=True) == final  # nothing to train: the last logged metrics
    assert "already at step 100 of 100" in caplog.text and "changed settings" not in caplog.text
    (moved / "checkpoints" / "step_00000100" / TRAINER_STATE).write_text("{")
    with pytest.raises(BeitError, match="step_00000100 is damaged"):
        pretrain(again, resume=True)


def test_bad_settings_are_refused_in_one_line_before_anything_is_written(digits_shards, tmp_path, run_cli):
    toml = tmp_path / "run.toml"
    run = tmp_path / "run"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    shards = str(digits_shards)
    cases = [
        ([shards, "--config", str(tmp_path)], "cannot read config file"),
        ([shards, "--model", "mim=false"], "drop the mim=false model override"),
        ([shards, "--num-masked", "30", "--min-block", "40"], "min_block (40) is above num_masked (30)"),
        ([shards, "--max-block", "3", "--min-block", "4"], "max_block (3) is below min_block (4)"),
        ([shards, "--split", "val"], "no shards of split 'val'"),
        ([shards, "--output", str(a_file)], "is a file, not a run directory"),
        (["--config", str(toml)], "shards must be a string"),  # the shards named in the file only
    ]
    toml.write_text("shards = 3\n")
    for args, message in cases:
        code, _, err = run_cli(
            "pretrain", "-o", str(run), "--preset", "tiny", "--steps", "2", "--warmup-steps", "1", *args
        )
        assert code == 2 and message in err and err.strip().count("\n") == 0, (args, err)
        assert not run.exists()
    toml.write_text('preset = ["tiny"]\n')
    with pytest.raises(BeitError, match="unknown model preset"):
        pretrain_config(toml)
    # --model options merge into the file's [model] table, key by key.
    toml.write_text('preset = "tiny"\n[model]\ndepth = 2\nnum_heads = 4\n')
    assert pretrain_config(toml, model={"num_heads": 2}).model == {"depth": 2, "num_heads": 2}
