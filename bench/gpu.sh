#!/usr/bin/env bash
# GPU benchmark of pretraining, one command (about 3-5 minutes on one H100):
#
#   bash bench/gpu.sh            # writes bench/results/pretrain_gpu.json and prints it
#
# 1. makes a shard set with the real tokenization job: SAMPLES 224-px views of real photos (crops of the
#    scikit-image / scikit-learn samples), tokenized into 14x14 grids by a small random dVAE (the tokens'
#    values do not matter for speed);
# 2. model step alone: the base MIM model in bf16 autocast on a fixed batch (forward, CE on the masked rows,
#    backward, clip, AdamW): images/s and model FLOP utilization (3 x forward FLOPs from `count_flops`
#    per image over the GPU's dense bf16 peak), eager and with torch.compile;
# 3. the whole trainer: `beit pretrain --mixed-precision bf16` streaming those shards (loader workers,
#    host-to-device copies, logging, final checkpoint): images/s from metrics.jsonl and the same MFU;
# 4. the loader alone: samples/s with 1 and WORKERS workers, and per worker over plain JPEG decoding.
#
# Knobs (environment): PRESET (base), BATCH (128 per step), STEPS (60), SAMPLES (4096), WORKERS (10),
# COMPILE (1: also time torch.compile), DEVICE (cuda; "cpu" only to smoke-test this script), OUT, PYTHON.
#
# The JSON is rewritten after each part, and a part that fails records its error and the script goes on,
# so a run cut short keeps what it measured. On a GPU machine whose python3 has torch but lacks some of
# this project's dependencies (a lent machine without internet lacks webdataset and braceexpand), make
# their wheels here and carry `.whl/` along; the script installs them into a temporary directory:
#
#   .venv/bin/pip download --no-deps -d .whl webdataset==1.0.2 braceexpand==0.1.7
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PRESET="${PRESET:-base}" BATCH="${BATCH:-128}" STEPS="${STEPS:-60}" SAMPLES="${SAMPLES:-4096}"
export WORKERS="${WORKERS:-10}" COMPILE="${COMPILE:-1}" DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-bench/results/pretrain_gpu.json}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"

missing="$("$PYTHON" -c 'import importlib.util as u
print(*[m for m in ("webdataset", "braceexpand", "pyarrow", "typer", "accelerate", "safetensors", "skimage",
                    "sklearn", "tqdm") if u.find_spec(m) is None])')"
if [ -n "$missing" ]; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "bench/gpu.sh: $PYTHON lacks: $missing (carry their wheels in .whl/; see the top of this file)" >&2
        exit 1
    fi
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

"$PYTHON" - "$WORK" "$OUT" <<'PY'
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from beit.config import model_config
from beit.model import create_model
from beit.model.vit import count_flops
from beit.shards import iter_tar_samples, open_shard_set
from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config
from beit.tokenize.job import tokenize_dataset
from beit.train.loader import Normalize, decode_jpegs, shard_loader
from beit.train.masking import mask_generator, scaled_mask_size
from beit.train.optim import build_optimizer

work, out = Path(sys.argv[1]), Path(sys.argv[2])
preset, batch, steps = os.environ["PRESET"], int(os.environ["BATCH"]), int(os.environ["STEPS"])
samples, workers, compile_too = int(os.environ["SAMPLES"]), int(os.environ["WORKERS"]), os.environ["COMPILE"] == "1"
device = torch.device(os.environ["DEVICE"])
cuda = device.type == "cuda"
if cuda and not torch.cuda.is_available():
    sys.exit("bench/gpu.sh needs a CUDA GPU (DEVICE=cpu only smoke-tests the script)")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
         ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)]
peak = next((p for key, p in PEAKS if key in name), None)
result = {"command": "bash bench/gpu.sh", "device": name, "peak_bf16_flops": peak, "torch": torch.__version__,
          "cuda": torch.version.cuda, "cpus": os.cpu_count(), "preset": preset, "batch": batch}


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


def save() -> None:
    """Write what was measured so far (each part calls it: a run cut short keeps its numbers)."""
    out.write_text(json.dumps(result, indent=2) + "\n")


def part(name: str, measure) -> None:
    """Run one part; if it fails, record the error and go on with the next."""
    try:
        measure()
    except Exception as err:
        result[f"{name}_error"] = f"{type(err).__name__}: {err}"[:500]
    save()


# ---- 1. a shard set made by the tokenization job ----------------------------------------------------------
spec = importlib.util.spec_from_file_location("bench_tokenize_job", "bench/tokenize_job.py")
bench_tokenize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_tokenize)
t0 = time.perf_counter()
photos = bench_tokenize.make_photos(work / "photos", samples, size=(256, 256))
t1 = time.perf_counter()
torch.manual_seed(0)
small = dvae_config("tiny", input_size=112, downsample=8, vocab_size=8192, hidden=16, codebook_dim=16)
tokenizer = DVAETokenizer(DiscreteVAE(small).eval().to(device))
shards = work / "shards"
summary = tokenize_dataset(photos, shards, tokenizer, image_size=224, shard_size=256, batch_size=256,
                           num_workers=min(8, os.cpu_count() or 1), device=device, progress=False)
result["shards"] = {"samples": summary.samples, "shards": len(open_shard_set(shards).shards),
                    "photos_seconds": t1 - t0, "tokenize_seconds": time.perf_counter() - t1}
save()

# ---- 2. the model step alone ----------------------------------------------------------------------------
model_cfg = model_config(preset, mim=True)
# forward + backward ~ 3 x forward, counted as forward_mim runs it (last block and head on 75 rows)
flops_per_image = 3 * count_flops(model_cfg, scaled_mask_size(model_cfg.num_patches)[0])
result["train_flops_per_image"] = flops_per_image


def mfu(rate: float):
    return rate * flops_per_image / peak if peak else None


def model_step() -> None:
    """Images/s of the bf16 step on a fixed batch, eager and (if asked) compiled."""
    torch.manual_seed(0)
    model = create_model(preset, mim=True).to(device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    normalize = Normalize.named("half", device)
    gen = mask_generator(model_cfg.grid)
    size = model_cfg.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.grid, model_cfg.grid), device=device)
    mask = torch.stack([torch.from_numpy(gen().reshape(-1)) for _ in range(batch)]).to(device)

    def step(net) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(normalize(images), mask)
        F.cross_entropy(logits.float(), tokens.flatten(1)[mask]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def images_per_s(net, warmup: int = 10, timed: int = 30) -> float:
        for _ in range(warmup):
            step(net)
        sync()
        start = time.perf_counter()
        for _ in range(timed):
            step(net)
        sync()
        return timed * batch / (time.perf_counter() - start)

    rates = result["model_step_images_per_s"] = {"eager": images_per_s(model)}
    result["model_step_mfu"] = {"eager": mfu(rates["eager"])}
    if cuda:
        result["model_step_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    save()
    if compile_too:
        rates["compiled"] = images_per_s(torch.compile(model))
        result["model_step_mfu"]["compiled"] = mfu(rates["compiled"])


part("model_step", model_step)
if cuda:
    torch.cuda.empty_cache()


# ---- 3. the whole trainer -------------------------------------------------------------------------------
def trainer() -> None:
    run = work / "run"
    command = [sys.executable, "-m", "beit", "pretrain", str(shards), "--output", str(run), "--preset", preset,
               "--mixed-precision", "bf16", "--steps", str(steps), "--warmup-steps", str(min(5, steps - 1)),
               "--batch-size", str(batch), "--num-workers", str(workers), "--log-every", "10",
               "--save-every", str(10 * steps), "--no-tensorboard"]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = sorted(r["images_per_s"] for r in records[1:]) or [records[-1]["images_per_s"]]
    rate = steady[len(steady) // 2]
    result["trainer"] = {"steps": steps, "workers": workers, "seconds": time.perf_counter() - t0,
                         "images_per_s_by_window": [r["images_per_s"] for r in records],
                         "images_per_s": rate, "mfu": mfu(rate), "final_loss": records[-1]["loss"]}


part("trainer", trainer)


# ---- 4. the loader alone --------------------------------------------------------------------------------
def loader_alone() -> None:
    shard_set = open_shard_set(shards)
    rates = result["loader_images_per_s_by_workers"] = {}
    for n in sorted({1, workers}):
        loader = shard_loader(shard_set, batch_size=batch, masks=mask_generator(14), num_workers=n,
                              pin_memory=cuda)
        stream = iter(loader)
        for _ in range(n):  # one batch from each worker: all of them have started
            next(stream)
        count = max(4 * n, 3 * samples // batch)
        start = time.perf_counter()
        for b in itertools.islice(stream, count):
            b.images.to(device, non_blocking=True)
        sync()
        rates[str(n)] = count * batch / (time.perf_counter() - start)
        del stream
        save()
    # Target (c) of bench/pretrain.py on this machine: loader images/s per worker over plain decoding (our
    # decoder at its fastest, one call per 32 images, as the loader calls it).
    jpegs = [m["jpg"] for s in shard_set.shards[:4] for _, m in iter_tar_samples(s.path)]
    start = time.perf_counter()
    for first in range(0, len(jpegs), 32):
        decode_jpegs(jpegs[first : first + 32])
    decode_rate = len(jpegs) / (time.perf_counter() - start)
    result["plain_decode_images_per_s"] = decode_rate
    result["loader_per_worker_over_decode"] = {n: r / int(n) / decode_rate for n, r in rates.items()}


part("loader", loader_alone)
print(json.dumps(result, indent=2))
PY
