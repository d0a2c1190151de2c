"""The masked-image-modeling pretraining loop (REFERENCE.md §5.7, §7.1, §10.4), on Accelerate.

One optimizer step = `grad_accum` micro-batches from `ShardLoader`: normalize the uint8 images on the
device, run the encoder with the mask, cross-entropy of the MIM head on the masked positions only
(averaged over every masked token of the step's micro-batches in this process; across processes the
gradients are averaged, as in the official DDP code), backward, then clip and step. The lr and weight
decay come from per-step tables indexed by the optimizer-step counter, so they do not depend on the
number of processes (no prepared scheduler). The loader is never prepared: every rank streams its own
shards and yields the same number of batches.

Run directory (`cfg.output`):

    pretrain.json            the resolved configuration
    metrics.jsonl            one JSON line per logged step (flushed as written)
    tensorboard/             the same scalars for TensorBoard (when the tensorboard package is installed)
    checkpoints/step_00001000/   full training state (accelerate) + model.safetensors + config.json
    model.safetensors, config.json   the final model, for fine-tuning

A checkpoint is written under `checkpoints/.tmp-…` and renamed when whole, so a kill never leaves a
checkpoint that looks complete. `resume=True` continues from the newest one at the same step, schedule
and data-stream position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from beit.config import PretrainConfig
from beit.errors import BeitError
from beit.model import create_model
from beit.model.checkpoint import save_checkpoint
from beit.shards import open_shard_set
from beit.shards.format import write_atomic
from beit.train.loader import Normalize, ShardLoader, check_compatible, shard_loader
from beit.train.masking import mask_generator
from beit.train.optim import apply_schedule, build_optimizer, cosine_schedule

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
LOADER_STATE = "loader_{}.json"  # per process: where each of its workers' streams goes on
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run directory as (step, path), oldest first."""
    root = Path(run) / CHECKPOINTS
    found = [(int(m[1]), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


class MetricsLog:
    """metrics.jsonl: one flushed JSON line per record. On resume, lines after the resumed step (written
    after the checkpoint by the run that was killed) are dropped first, so the curve continues cleanly."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.last: dict[str, Any] = {}  # the newest record
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _line_step(line) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept).encode())
            self.last = json.loads(kept[-1]) if kept else {}
        self.file: TextIO = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self.last = record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a kill: drop it


def _tensorboard(run: Path, purge_step: int | None) -> Any:
    """A SummaryWriter, or None when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)"
        )
        return None
    return SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=purge_step)


def _prepare_run(
    run: Path, cfg: PretrainConfig, resume: bool, processes: int, main: bool
) -> tuple[Path, dict] | None:
    """Check the run directory against `resume`; return the checkpoint to resume from and its trainer
    state, if any. Changed settings are logged (by the main process)."""
    if run.exists() and not run.is_dir():
        raise BeitError(f"--output {run} is a file, not a run directory; choose another --output")
    found = checkpoints(run)
    if not resume:
        if found or (run / "metrics.jsonl").exists():
            raise BeitError(
                f"{run} already holds a run; pass --resume to continue it, or choose another --output"
            )
        return None
    if not found:
        log.warning("no complete checkpoint in %s: starting from step 0", run)
        return None
    path = found[-1][1]
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        trained_model, trained = state["model"], state["config"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BeitError(
            f"checkpoint {path} is damaged ({TRAINER_STATE}: {err!r}); "
            "delete it to resume from the one before"
        ) from None
    if trained_model != cfg.model_config().to_dict():
        raise BeitError(
            f"checkpoint {path} was trained with another model configuration; resume with the same --preset "
            "and model options, or choose another --output"
        )
    # `output` is where the run is now, wherever it was trained.
    changed = [
        k for k, v in cfg.to_dict().items() if k != "output" and not _same_setting(k, trained.get(k), v)
    ]
    if state.get("processes") != processes:
        changed.append(f"processes ({state.get('processes')} -> {processes})")
    if changed and main:
        log.warning(
            "resuming with changed settings: %s (other processes, workers or batch size change the data "
            "order)",
            ", ".join(changed),
        )
    return path, state


def _same_setting(name: str, old: Any, new: Any) -> bool:
    if name == "shards" and isinstance(old, str) and isinstance(new, str):
        return Path(old).resolve() == Path(new).resolve()  # a relative and an absolute path to one place
    return old == new


def _save(
    accelerator: Accelerator,
    model: torch.nn.Module,
    run: Path,
    step: int,
    batches: int,
    loader: ShardLoader,
    extra: dict,
    keep: int,
) -> None:
    """Write checkpoints/step_N atomically (temporary directory, then rename) and keep the newest `keep`.
    `batches`: the micro-batches each process has taken from its `loader`, whose streams' positions each
    process writes too: where a resumed stream starts."""
    root = run / CHECKPOINTS
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # The model, optimizer, grad scaler, every rank's RNG states and Accelerate's step counter.
    accelerator.save_state(str(tmp))
    write_atomic(
        tmp / LOADER_STATE.format(accelerator.process_index), json.dumps(loader.state_dict()).encode()
    )
    accelerator.wait_for_everyone()  # every rank's random_states_N.pkl and loader_N.json are in `tmp`
    if accelerator.is_main_process:
        # Overwrites accelerate's model.safetensors with the same tensors plus config.json: the directory
        # is both resumable and loadable by `beit.load_checkpoint` for fine-tuning.
        save_checkpoint(accelerator.unwrap_model(model), tmp, extra=extra)
        write_atomic(
            tmp / TRAINER_STATE,
            json.dumps({"step": step, "batches": batches, **extra["pretrain"]}, indent=1).encode(),
        )
        if final.exists():  # a run resumed from an older checkpoint reached this step again
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume_positions(loader: ShardLoader, path: Path) -> None:
    """Give `loader` its streams' exact positions from a checkpoint, when it has them for this layout;
    otherwise its streams start from the count of batches taken (exact unless samples were skipped)."""
    try:
        applied = loader.load_state_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        log.warning("%s is missing: the data stream resumes from the count of batches taken", path)
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring %s (%r): the data stream resumes from the count of batches taken", path, err)
        return
    if not applied:
        log.warning(
            "%s was written with other processes, workers, batch size, seed, shuffle buffer or shards: the "
            "data stream resumes from the count of batches taken, not at the exact sample",
            path,
        )


def pretrain(cfg: PretrainConfig, *, resume: bool = False) -> dict[str, float]:
    """Run (or resume) pretraining as `cfg` says; returns the last logged metrics (on the main process;
    an empty dict on the others)."""
    if not cfg.shards:
        raise BeitError(
            "no shard set given: pass the directory `beit tokenize` wrote (or `shards = ...` in --config)"
        )
    run = Path(cfg.output)
    try:
        # cpu=True on machines without an accelerator: Accelerate only then sets up gloo for `torchrun` runs.
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=not torch.accelerator.is_available(),
        )
    except ValueError as err:  # e.g. a precision the device does not support
        raise BeitError(f"cannot set up training with mixed_precision={cfg.mixed_precision}: {err}") from None
    device, main = accelerator.device, accelerator.is_main_process
    shard_set = open_shard_set(cfg.shards)
    model_cfg = cfg.model_config()
    check_compatible(shard_set, model_cfg)
    normalize = Normalize.named(cfg.normalization, device)
    masks = mask_generator(
        model_cfg.grid,
        cfg.num_masked,
        cfg.min_block,
        max_block=cfg.max_block,
        min_aspect=cfg.min_aspect,
        random_masking=cfg.random_masking,
    )
    loader = shard_loader(
        shard_set,
        batch_size=cfg.batch_size,
        masks=masks,
        epoch_batches=cfg.epoch_batches,
        split=cfg.split,
        num_workers=cfg.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        pin_memory=device.type == "cuda",
    )
    resumed = _prepare_run(run, cfg, resume, accelerator.num_processes, main)
    accelerator.wait_for_everyone()  # every rank checked the directory before rank 0 writes to it
    if main:
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BeitError(f"cannot create the run directory {run}: {err.strerror}") from None
        write_atomic(run / "pretrain.json", json.dumps(cfg.to_dict(), indent=1).encode())

    set_seed(cfg.seed)  # the same initial weights on every rank
    model = create_model(model_cfg)
    if cfg.compile:
        model.compile()
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed, device_specific=True)  # a different stochastic-depth stream per rank
    step, batches_done = 0, 0  # optimizer steps; micro-batches this process has taken from its loader
    if resumed is not None:
        path, state = resumed
        accelerator.load_state(str(path))  # weights, optimizer, grad scaler, RNG states
        step = state["step"]
        batches_done = state.get("batches", step * state["config"].get("grad_accum", 1))
        # Accelerate's micro-step counter in phase with the (possibly changed) accumulation.
        accelerator.step = step * cfg.grad_accum
        log.info("resumed from %s at step %d", path, step)
        if step >= cfg.steps and main:
            log.warning(
                "%s is already at step %d of %d: nothing to train (raise --steps to go on)",
                run,
                step,
                cfg.steps,
            )
        _resume_positions(loader, path / LOADER_STATE.format(accelerator.process_index))
    loader.start_batch = batches_done

    lr_table = cosine_schedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd_table = cosine_schedule(cfg.weight_decay, wd_end, cfg.steps)
    extra = {
        "tokenizer": shard_set.tokenizer,
        "pretrain": {
            "config": cfg.to_dict(),
            "model": model_cfg.to_dict(),
            "shards": str(shard_set.directory),
            "epoch_batches": loader.epoch_batches,
            "processes": accelerator.num_processes,
        },
    }
    metrics = MetricsLog(run / "metrics.jsonl", step if resume else None) if main else None
    writer = _tensorboard(run, step + 1 if resume else None) if main and cfg.tensorboard else None
    progress = tqdm(total=cfg.steps, initial=step, desc="pretrain", unit="step", disable=not main)

    batches = iter(loader)
    model.train()
    # Sums over the logging window: on the device (loss·n, correct, n: no extra sync per step) and on the
    # host (images, skipped items).
    window, images_seen, skipped_seen = torch.zeros(3, device=device), 0, 0
    window_start = time.perf_counter()
    while step < cfg.steps:
        apply_schedule(optimizer, float(lr_table[step]), float(wd_table[step]))
        micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
        batches_done += cfg.grad_accum
        # backward() divides by grad_accum: scaled so, the step's gradient is that of the summed token
        # losses over every masked token of its micro-batches (they hold different numbers of them).
        token_weight = cfg.grad_accum / max(1, sum(int(batch.mask.sum()) for batch in micro_batches))
        for images, tokens, mask, skipped, _ in micro_batches:
            images = normalize(images.to(device, non_blocking=True))  # uint8 -> normalized float
            tokens, mask = tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with accelerator.accumulate(model):
                logits = model(images, mask)  # [M, V], M = masked patches of the batch
                targets = tokens.flatten(1)[mask]  # [M], the same row-major order
                loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
                accelerator.backward(loss_sum * token_weight)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                window[0] += loss_sum.detach()
                window[1] += (logits.argmax(-1) == targets).sum()
                window[2] += targets.numel()
            images_seen, skipped_seen = images_seen + images.shape[0], skipped_seen + skipped
        step += 1
        progress.update(1)

        # Also logged at each checkpoint step: a resumed run's windows then match an uninterrupted run's.
        if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == cfg.steps:
            host = torch.tensor([images_seen, skipped_seen], device=device, dtype=torch.float32)
            total = accelerator.reduce(torch.cat([window, host]), reduction="sum").tolist()
            seconds = time.perf_counter() - window_start
            record = {
                "step": step,
                "epoch": batches_done / loader.epoch_batches,
                "loss": total[0] / total[2],
                "mlm_acc": total[1] / total[2],
                "lr": float(lr_table[step - 1]),
                "wd": float(wd_table[step - 1]),
                "grad_norm": float(grad_norm),
                "images_per_s": total[3] / seconds,
                "masked_per_image": total[2] / total[3],
                "skipped": int(total[4]),
            }
            if accelerator.scaler is not None:  # fp16: a falling scale means skipped (overflowing) steps
                record["loss_scale"] = accelerator.scaler.get_scale()
            if main:
                metrics.write(record)
                if writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(f"pretrain/{key}", value, step)
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    acc=f"{record['mlm_acc']:.3f}",
                    lr=f"{record['lr']:.2e}",
                    img_s=f"{record['images_per_s']:.0f}",
                )
            window.zero_()
            images_seen, skipped_seen, window_start = 0, 0, time.perf_counter()

        if step % cfg.save_every == 0 or step == cfg.steps:
            _save(accelerator, model, run, step, batches_done, loader, extra, cfg.keep_last)

    progress.close()
    if main:
        save_checkpoint(accelerator.unwrap_model(model), run, extra=extra)
        metrics.close()
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics.last if main else {}
