"""The tokenization job: deterministic, partitioned, resumable after SIGKILL, overlap-safe, incremental,
robust to bad items, and strict about mixing tokenizers."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from shard_helpers import digest, make_image_folder, tiny_tokenizer

from beit.errors import BeitError
from beit.shards import decode_sample, iter_tar_samples, open_shard_set
from beit.shards.format import read_json
from beit.tokenize.augment import TwoViewAugment
from beit.tokenize.job import HOST, BadItem, Claim, load_rgb, parse_partition, scan_source, tokenize_dataset

# 28 images x 2 views, 8 per shard -> chunks of 8, 8, 8, 4 -> 8 shards; 2 tokenizer batches per shard
JOB = dict(image_size=32, views=2, shard_size=8, batch_size=4, device="cpu", progress=False)
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the bytes every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "set"
    summary = tokenize_dataset(images, out, tiny_tokenizer(), **JOB)
    assert (summary.shards_written, summary.samples, summary.skipped) == (8, 56, 0)
    return out


def run_in_subprocess(
    images: Path, out: Path, delay: float, start: Path | None = None, **job_args
) -> subprocess.Popen:
    """The job in another process, sleeping `delay` s after each batch; with `start`, it touches
    `start.<pid>` once imported and waits for `start` to exist; `job_args` override JOB's. It prints
    shards written and busy."""
    code = (
        f"import os, sys, time; sys.path.insert(0, {str(TESTS)!r})\n"
        "from shard_helpers import tiny_tokenizer\n"
        "from beit.tokenize.job import tokenize_dataset\n"
        f"start = {str(start) if start else ''!r}\n"
        "if start:\n"
        "    open(f'{start}.{os.getpid()}', 'w').close()\n"
        "    while not os.path.exists(start): time.sleep(0.01)\n"
        f"s = tokenize_dataset({str(images)!r}, {str(out)!r}, tiny_tokenizer(), **{ {**JOB, **job_args}!r})\n"
        "print(s.shards_written, s.shards_busy)\n"
    )
    env = {**os.environ, "BEIT_TOKENIZE_TEST_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def test_reruns_and_worker_counts_give_identical_bytes(images, reference, tmp_path):
    files = digest(reference)
    assert len([f for f in files if f.endswith(".tar")]) == 8
    assert {"tokenizer.json", "plan.parquet", "manifest.parquet"} <= set(files)
    assert not [f for f in files if f.endswith((".tmp", ".claim")) or f.startswith(".")]
    # a second run with decoding in 2 worker processes writes the same bytes
    threads = torch.get_num_threads()
    summary = tokenize_dataset(images, tmp_path / "w2", tiny_tokenizer(), num_workers=2, **JOB)
    assert summary.shards_written == 8 and torch.get_num_threads() == threads  # restored after the run
    assert digest(tmp_path / "w2") == files
    # rerunning a finished set is a no-op
    again = tokenize_dataset(images, reference, tiny_tokenizer(), **JOB)
    assert (again.shards_written, again.shards_complete_before) == (0, 8)
    assert digest(reference) == files


def test_union_of_partitions_equals_single_run(images, reference, tmp_path):
    out = tmp_path / "parts"
    written = []
    for rank in range(3):
        summary = tokenize_dataset(images, out, tiny_tokenizer(), partition=(rank, 3), **JOB)
        written.append(summary.shards_written)
        if rank == 0:  # round-robin over (chunk, view): ordinals 0, 3, 6 -> (0,0), (1,1), (3,0)
            tars = sorted(p.name for p in out.glob("*.tar"))
            assert tars == ["train-v000-000000.tar", "train-v000-000003.tar", "train-v001-000001.tar"]
    assert written == [3, 3, 2]
    assert digest(out) == digest(reference)


def test_sigkill_mid_shard_then_rerun_equals_uninterrupted_run(images, reference, tmp_path):
    out = tmp_path / "killed"
    proc = run_in_subprocess(images, out, delay=0.4)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill inside a shard: one finished, the next one half written
        partial = [p for p in out.glob("*.tmp") if p.stat().st_size > 0] if out.exists() else []
        if partial and list(out.glob("*.stats.json")):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial, "the job finished before it could be killed"
    stem = partial[0].name.split(".tar.")[0]
    assert not (out / f"{stem}.stats.json").exists() and (out / f"{stem}.tar.claim").exists()
    assert len(list(out.glob("*.stats.json"))) < 8
    # the rerun takes over the dead process's claim, drops its partial tar, and finishes the set
    summary = tokenize_dataset(images, out, tiny_tokenizer(), **JOB)
    assert summary.shards_busy == 0 and summary.shards_written + summary.shards_complete_before == 8
    assert digest(out) == digest(reference)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_of_the_job_ends_its_decode_workers(tmp_path):
    # Noise photos give 224-px JPEG views of ~100 kB: a batch is larger than a pipe holds, so the worker
    # blocks on the pipe to the job. Killed there, it would live on, holding its memory (a cron pool
    # accumulates them), had it not asked the kernel to kill it with its parent.
    images = tmp_path / "images" / "noise"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(images / f"{i}.png")
    job = run_in_subprocess(images.parent, tmp_path / "out", delay=0.2, num_workers=1, image_size=224)
    deadline = time.monotonic() + 60
    while not (workers := _children(job.pid)) or not list((tmp_path / "out").glob("*.tar.claim")):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    time.sleep(1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 30
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _running(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def test_overlapping_runs_never_duplicate_or_corrupt(images, reference, tmp_path):
    """Two processes on the same partition at once (a cron job that starts again while one still runs)."""
    out, start = tmp_path / "overlap", tmp_path / "start"
    procs = [run_in_subprocess(images, out, delay=0.1, start=start) for _ in range(2)]
    while len(list(tmp_path.glob("start.*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    start.touch()  # both are imported and waiting: start them together
    written = [tuple(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(w >= 1 for w, _ in written) and sum(w for w, _ in written) == 8  # shared, none done twice
    assert digest(out) == digest(reference)


def test_claims_of_live_other_machines_are_respected_and_stale_ones_taken_over(images, reference, tmp_path):
    out = tmp_path / "claims"
    out.mkdir()
    claim = out / "train-v000-000001.tar.claim"
    claim.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    summary = tokenize_dataset(images, out, tiny_tokenizer(), claim_timeout=60, **JOB)
    assert (summary.shards_written, summary.shards_busy) == (7, 1)
    assert not (out / "train-v000-000001.tar").exists() and claim.exists()
    old = time.time() - 120  # the other machine went silent for longer than the timeout
    os.utime(claim, (old, old))
    summary = tokenize_dataset(images, out, tiny_tokenizer(), claim_timeout=60, **JOB)
    assert (summary.shards_written, summary.shards_busy) == (1, 0)
    assert digest(out) == digest(reference)


def test_claim_of_a_live_process_is_respected_and_of_a_dead_one_taken_over(tmp_path):
    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout
    )
    path = tmp_path / "x.claim"
    path.write_text(json.dumps({"host": HOST, "pid": os.getppid()}))  # alive: the process that runs pytest
    assert not Claim(path, timeout=3600).try_acquire()
    path.write_text(json.dumps({"host": HOST, "pid": dead}))
    taker = Claim(path, timeout=3600)
    assert taker.try_acquire() and taker.previous == {"host": HOST, "pid": dead}
    assert read_json(path) == taker.me
    other = Claim(path, timeout=3600)
    other.me = {"host": HOST, "pid": os.getppid()}  # another live process asks while we hold it
    assert not other.try_acquire()
    taker.release()
    assert not path.exists()


def test_samples_hold_the_views_and_tokens_they_describe(images, reference):
    """Recompute a few samples from their JSON: same augmentation parameters, same token ids, a JPEG close
    to the patch view; and webdataset (the trainer's reader) sees the same samples."""
    shard_set = open_shard_set(reference)
    assert (shard_set.image_size, shard_set.grid, shard_set.vocab_size) == (32, 8, 512)
    assert shard_set.num_samples == 56
    tokenizer = tiny_tokenizer()
    augment = TwoViewAugment(32, tokenizer.input_size)
    ids = set()
    shard = shard_set.select(views=[1])[-1]
    samples = [decode_sample(k, m) for k, m in iter_tar_samples(shard.path)]
    for s in samples:
        meta = s.meta
        image, _ = load_rgb(images / meta["path"], max_pixels=10**8)
        views = augment(image, meta["seed"], meta["id"], meta["view"])
        assert {k: meta[k] for k in views.params} == json.loads(json.dumps(views.params))
        tok_view = torch.from_numpy(np.array(views.tokenizer)).permute(2, 0, 1)[None]
        assert np.array_equal(tokenizer.encode(tok_view)[0].numpy(), s.tokens)
        err = s.image.astype(np.float64) - np.asarray(views.patch, dtype=np.float64)
        assert 10 * np.log10(255**2 / np.mean(err**2)) > 30  # JPEG q95 of the patch view
        assert s.key == f"{meta['id']:09d}_001" and meta["split"] == "train"
        ids.update(np.unique(s.tokens).tolist())
    assert len(ids) > 3  # varied ids, so the equality above means something
    assert samples[0].meta["label"] == "photo"  # the last chunk holds the photos (sorted after the digits)
    loaded = list(wds.WebDataset(str(shard.path), shardshuffle=False))
    assert [d["__key__"] for d in loaded] == [s.key for s in samples]
    for d, s in zip(loaded, samples, strict=True):
        assert np.array_equal(np.load(io.BytesIO(d["tokens.npy"])), s.tokens)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bad_and_odd_images(root: Path) -> dict[str, str | None]:
    """Write one file per kind of problem; returns file -> expected skip reason prefix (None: converted)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "garbage.jpg").write_bytes(rng.bytes(700))
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("P").save(root / "palette.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))))
    rgba.save(root / "rgba.png")
    rgb.convert("LA").save(root / "gray_alpha.png")
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "deep16.png")
    Image.new("RGB", (1, 1), "red").save(root / "pixel.png")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 pixels, a few bytes on disk
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    (root / "bomb.png").write_bytes(bomb + png_chunk(b"IEND", b""))
    (root / "notes.txt").write_text("not an image, not in the plan")
    rgb.save(root / "good.png")
    skipped = {
        "truncated.jpg": "unreadable",
        "garbage.jpg": "unreadable",
        "pixel.png": "too small",
        "bomb.png": "too large",
    }
    converted = ["cmyk.jpg", "gray.png", "palette.png", "rgba.png", "gray_alpha.png", "deep16.png"]
    converted.append("good.png")
    return {**skipped, **dict.fromkeys(converted)}


def test_bad_items_are_skipped_with_reasons_and_odd_ones_converted(tmp_path):
    expected = bad_and_odd_images(tmp_path / "bad")
    summary = tokenize_dataset(
        tmp_path / "bad",
        tmp_path / "out",
        tiny_tokenizer(),
        image_size=32,
        shard_size=100,
        device="cpu",
        progress=False,
    )
    stats = read_json(tmp_path / "out" / "train-v000-000000.stats.json")
    skips = {s["path"]: s["reason"] for s in stats["skipped"]}
    assert {p: r.split(":")[0] for p, r in skips.items()} == {p: r for p, r in expected.items() if r}
    assert not any(str(tmp_path) in r for r in skips.values())  # reasons do not name the mount point
    assert (summary.samples, summary.skipped) == (7, 4)
    shard = open_shard_set(tmp_path / "out").shards[0]
    samples = [decode_sample(key, members) for key, members in iter_tar_samples(shard.path)]
    modes = {s.meta["path"]: s.meta["source_mode"] for s in samples}
    assert modes == {
        "cmyk.jpg": "CMYK",
        "gray.png": "L",
        "palette.png": "P",
        "rgba.png": "RGBA",
        "gray_alpha.png": "LA",
        "deep16.png": "I;16",
        "good.png": "RGB",
    }


def test_conversions_scale_16_bit_and_composite_alpha_on_white(tmp_path):
    tmp_path = tmp_path / "images"
    bad_and_odd_images(tmp_path)
    deep, mode = load_rgb(tmp_path / "deep16.png", max_pixels=10**8)
    raw = np.asarray(Image.open(tmp_path / "deep16.png"), dtype=np.uint16)
    assert mode == "I;16" and np.array_equal(np.asarray(deep)[..., 1], (raw >> 8).astype(np.uint8))
    rgba = np.asarray(Image.open(tmp_path / "rgba.png"), dtype=np.float64)
    out = np.asarray(load_rgb(tmp_path / "rgba.png", max_pixels=10**8)[0], dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    assert np.abs(out - (rgba[..., :3] * alpha + 255 * (1 - alpha))).max() <= 1.0
    with pytest.raises(BadItem, match="too large"):
        load_rgb(tmp_path / "good.png", max_pixels=100)


def test_different_tokenizer_seed_or_size_is_refused(images, reference, tmp_path):
    before = digest(reference)
    for kwargs, what in [
        (dict(tokenizer=tiny_tokenizer(seed=1)), "tokenizer"),
        (dict(seed=1), "seed"),
        (dict(image_size=64), "image_size"),
    ]:
        args = {**JOB, "tokenizer": tiny_tokenizer(), **kwargs}
        with pytest.raises(BeitError, match=f"different {what}.*new output directory"):
            tokenize_dataset(images, reference, **args)
    assert digest(reference) == before
    new = tokenize_dataset(images, tmp_path / "new", tiny_tokenizer(seed=1), **{**JOB, "partition": (0, 8)})
    assert new.shards_written == 1  # a new directory takes it


def test_bad_device_output_or_size_is_refused_before_anything_is_written(images, tmp_path):
    args = {**JOB, "tokenizer": tiny_tokenizer()}
    out = tmp_path / "out"
    with pytest.raises(BeitError, match="unknown device 'foo'"):
        tokenize_dataset(images, out, **{**args, "device": "foo"})
    if not torch.cuda.is_available():
        with pytest.raises(BeitError, match="device cuda is not available"):
            tokenize_dataset(images, out, **{**args, "device": "cuda"})
    with pytest.raises(BeitError, match="use e.g. 32"):  # the nearest multiple of the 8x8 grid
        tokenize_dataset(images, out, **{**args, "image_size": 30})
    with pytest.raises(BeitError, match="does not exist"):
        tokenize_dataset(tmp_path / "no-images", out, **args)
    assert not out.exists()
    out.write_text("a file")
    with pytest.raises(BeitError, match="cannot create the shard set directory"):
        tokenize_dataset(images, out, **args)


def test_cli_refuses_a_mismatch_in_one_line_with_exit_code_2(
    images, reference, tmp_path, monkeypatch, capsys
):
    from beit.cli import main
    from beit.tokenize.loading import save_tokenizer

    save_tokenizer(tiny_tokenizer(seed=1), tmp_path / "tok")
    argv = [
        "beit",
        "tokenize",
        str(images),
        str(reference),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--preset",
        "tiny",
        "--quiet",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "different tokenizer" in err


def test_new_items_and_more_views_extend_without_rewriting(tmp_path):
    src = make_image_folder(tmp_path / "src", digits=12, photos=0)
    out = tmp_path / "set"
    first = tokenize_dataset(src, out, tiny_tokenizer(), **{**JOB, "views": 1, "shard_size": 5})
    assert first.shards_written == 3  # 5 + 5 + 2
    before = digest(out)
    make_image_folder(tmp_path / "src", digits=16, photos=1)  # 4 new digits and a photo
    second = tokenize_dataset(src, out, tiny_tokenizer(), **{**JOB, "views": 1, "shard_size": 5})
    assert (second.shards_written, second.shards_complete_before, second.samples) == (1, 3, 5)
    after = digest(out)
    assert all(after[name] == sha for name, sha in before.items() if name.endswith((".tar", ".stats.json")))
    plan = pq.read_table(out / "plan.parquet").to_pydict()
    assert plan["id"] == list(range(17)) and plan["chunk"] == [0] * 5 + [1] * 5 + [2] * 2 + [3] * 5
    third = tokenize_dataset(src, out, tiny_tokenizer(), **{**JOB, "views": 2, "shard_size": 5})
    assert (third.shards_written, third.shards_complete_before) == (4, 4)
    assert all(digest(out)[n] == sha for n, sha in after.items() if n.endswith((".tar", ".stats.json")))
    assert [s.view for s in open_shard_set(out).shards].count(1) == 4


def test_file_lists_and_folders_plan_the_same_items(images, tmp_path):
    root, entries = scan_source(images)
    assert root == images and len(entries) == 28 and entries == sorted(entries)
    assert entries[0] == ("0/0000.jpg", "0") and entries[-1][1] == "photo"
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{images.name}/{p}\t{lb}\n" for p, lb in reversed(entries)) + "# comment\n\n")
    assert scan_source(listing) == (tmp_path, [(f"{images.name}/{p}", lb) for p, lb in entries])
    table = pa.table({"path": [f"{images.name}/{p}" for p, _ in entries], "label": [lb for _, lb in entries]})
    pq.write_table(table, tmp_path / "list.parquet")
    assert scan_source(tmp_path / "list.parquet") == scan_source(listing)
    with pytest.raises(BeitError, match="does not exist"):
        scan_source(tmp_path / "missing")
    with pytest.raises(BeitError, match="neither a folder nor a file list"):
        scan_source(images / "0" / "0000.jpg")


def test_partition_from_flag_or_launcher_environment(monkeypatch):
    assert parse_partition("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/3"):
        with pytest.raises(BeitError, match="i/N"):
            parse_partition(bad)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_partition(None) == (3, 8)
