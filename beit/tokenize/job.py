"""The offline tokenization job: plan → partitions → shards (DESIGN.md, "Shard set directory").

It runs the frozen tokenizer over augmented views of an image set once and writes WebDataset shards, and is
built to run cron-style on a pool of machines:

- **plan**: `plan.parquet` lists every input item once, in a stable order, with an id and a chunk number.
  Items found by a later run get new ids and new chunks; finished shards are never rewritten.
- **partitions**: shard `(chunk, view)` belongs to partition `(chunk·views + view) mod N`.
- **determinism**: every random choice comes from `(seed, item id, view)`, tokenizer batches never span
  shards, and the tar writer fixes every header field, so a shard's bytes do not depend on the process,
  the partition, the worker count or the rerun that wrote it.
- **resumable, overlap-safe**: a shard is claimed by creating `<shard>.claim` with O_EXCL (it names the
  owner's host and pid); the owner writes the tar under its own temporary name, fsyncs it, renames it into
  place, and then writes its stats JSON (the completion marker). A claim whose owner died on this host, or
  that has not been refreshed for `claim_timeout` seconds, is taken over. A killed run leaves nothing a
  reader would take for a complete shard. Two processes that take over the same stale claim at once both
  write the same bytes and rename them into place; determinism makes that race harmless.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from beit.errors import BeitError
from beit.shards.format import (
    FORMAT_VERSION,
    HEADER_NAME,
    JPEG_QUALITY,
    PLAN_NAME,
    ShardWriter,
    check_split,
    encode_jpeg,
    encode_json,
    encode_tokens,
    parse_shard_name,
    read_json,
    sample_key,
    shard_name,
    stats_path,
    write_atomic,
)
from beit.shards.shardset import IDENTITY_KEYS, read_header, write_manifest
from beit.tokenize.augment import TwoViewAugment
from beit.tokenize.base import Tokenizer
from beit.workers import die_with_parent

log = logging.getLogger(__name__)

# The official dataset's extensions (REFERENCE.md §3.3), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MIN_SIDE = 8  # smaller images (1×1 tracking pixels, icons) carry no usable crop
HOST = socket.gethostname()
# Workers only decode and augment (they never touch CUDA): fork starts them in milliseconds.
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
# Test hook: seconds to sleep after every tokenizer batch, so a test can kill the job mid-shard.
_DELAY_ENV = "BEIT_TOKENIZE_TEST_DELAY"


@dataclass
class JobSummary:
    """What one call of `tokenize_dataset` did, for the CLI and for tests."""

    output_dir: Path
    shards_assigned: int = 0  # shards of this partition (complete or not)
    shards_written: int = 0
    shards_complete_before: int = 0  # already had stats: skipped without work
    shards_busy: int = 0  # claimed by another live process: left to it
    samples: int = 0
    skipped: int = 0  # bad items skipped in the shards written now
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.samples + self.skipped) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# Claims: exclusive, crash-tolerant ownership of one piece of work


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_tag(owner: dict[str, Any]) -> str:
    """A file-name-safe `host-pid` tag for an owner's temporary files."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(owner.get("host", "")))[:64] + f"-{owner.get('pid', 0)}"


class Claim:
    """Ownership of a piece of work, held as a small file created with O_EXCL (holds host and pid).

    A claim is stale, and taken over, when its owner was on this host and its pid is gone, or when it has
    not been refreshed (mtime) for `timeout` seconds — the rule for owners on other machines.
    """

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = Path(path), timeout
        self.me = {"host": HOST, "pid": os.getpid()}
        self.previous: dict[str, Any] | None = None  # the stale owner we took over from, if any

    def try_acquire(self) -> bool:
        """Create the claim (O_EXCL), or take it over if stale; False while a live owner holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                state = self.read()
                if state is None:  # released between our two calls: try to create it again
                    continue
                owner, age = state
                if owner == self.me:
                    return True
                if not self.is_stale(owner, age):
                    return False
                self.previous = owner
                write_atomic(self.path, encode_json(self.me))  # take over (module note: races are harmless)
                return True
            with os.fdopen(fd, "wb") as f:
                f.write(encode_json(self.me))
            return True

    def acquire(self, poll: float = 0.1) -> None:
        """Block until acquired (used for the short directory lock)."""
        while not self.try_acquire():
            time.sleep(poll)

    def read(self) -> tuple[dict[str, Any], float] | None:
        """(owner, seconds since the last refresh), or None if the claim vanished."""
        try:
            age = time.time() - self.path.stat().st_mtime
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw), age
        except ValueError:  # its creator is writing it right now: judge it by age alone
            return {}, age

    def is_stale(self, owner: dict[str, Any], age: float) -> bool:
        if age > self.timeout:
            return True
        pid = owner.get("pid")
        return owner.get("host") == HOST and isinstance(pid, int) and not _pid_alive(pid)

    def refresh(self) -> None:
        """Heartbeat: a claim refreshed within `timeout` is never taken over."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        try:
            if read_json(self.path) == self.me:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass


# ---------------------------------------------------------------------------------------------------------
# Input: source scanning and the plan


def scan_source(source: str | Path) -> tuple[Path, list[tuple[str, str | None]]]:
    """(root, sorted [(path, label)]) of an image folder, a text file list or a Parquet file list.

    Folder: every image below it; the label is the top-level sub-folder (ImageFolder), None for files at
    the root. Text list: one `path` or `path<TAB>label` per line. Parquet: a `path` and optional `label`
    column. Paths are kept relative to the root (the folder, or the list's directory), so a plan stays
    valid on machines that mount the data elsewhere.
    """
    src = Path(source)
    if src.is_dir():
        entries = []
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    rel = Path(dirpath, name).relative_to(src).as_posix()
                    entries.append((rel, rel.split("/")[0] if "/" in rel else None))
        root = src
    elif src.suffix == ".parquet" and src.is_file():
        table = pq.read_table(src)
        if "path" not in table.column_names:
            raise BeitError(f"{src} has no 'path' column; a Parquet list needs 'path' (optional 'label')")
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        entries = [(str(p), None if lb is None else str(lb)) for p, lb in zip(paths, labels, strict=True)]
        root = src.parent
    elif src.is_file() and src.suffix in (".txt", ".lst"):
        entries = []
        for line in src.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                path, _, label = line.rstrip("\n").partition("\t")
                entries.append((path.strip(), label.strip() or None))
        root = src.parent
    elif src.exists():
        raise BeitError(f"input {src} is neither a folder nor a file list (.txt, .lst or .parquet)")
    else:
        raise BeitError(f"input {src} does not exist; give an image folder, a .txt or a .parquet file list")
    entries = sorted(dict(entries).items())  # stable order, duplicates dropped
    if not entries:
        raise BeitError(f"no images found in {src} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return root, entries


@dataclass
class Plan:
    """The plan rows of one split, by chunk: chunk -> [(id, path, label)]."""

    split: str
    chunks: dict[int, list[tuple[int, str, str | None]]] = field(default_factory=dict)


def update_plan(directory: Path, split: str, entries: list[tuple[str, str | None]], shard_size: int) -> Plan:
    """Append the entries the plan does not know yet (new ids, new chunks); return this split's plan.

    Call under the directory lock. Existing rows never change, so finished shards stay valid.
    """
    path = directory / PLAN_NAME
    cols: dict[str, list] = {"id": [], "split": [], "chunk": [], "path": [], "label": []}
    if path.exists():
        table = pq.read_table(path)
        cols = {name: table.column(name).to_pylist() for name in cols}
    known = {p for s, p in zip(cols["split"], cols["path"], strict=True) if s == split}
    new = [(p, label) for p, label in entries if p not in known]
    if new:
        next_id = max(cols["id"], default=-1) + 1
        split_chunks = [c for s, c in zip(cols["split"], cols["chunk"], strict=True) if s == split]
        next_chunk = max(split_chunks, default=-1) + 1
        for k, (p, label) in enumerate(new):
            cols["id"].append(next_id + k)
            cols["split"].append(split)
            cols["chunk"].append(next_chunk + k // shard_size)
            cols["path"].append(p)
            cols["label"].append(label)
        schema = pa.schema(
            [
                ("id", pa.int64()),
                ("split", pa.string()),
                ("chunk", pa.int64()),
                ("path", pa.string()),
                ("label", pa.string()),
            ]
        )
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols, schema=schema), sink)
        write_atomic(path, sink.getvalue().to_pybytes())
        log.info("plan: %d new %s items in chunks %d..%d", len(new), split, next_chunk, cols["chunk"][-1])
    plan = Plan(split)
    for i, s, c, p, label in zip(*cols.values(), strict=True):
        if s == split:
            plan.chunks.setdefault(c, []).append((i, p, label))
    return plan


def ensure_header(directory: Path, header: dict[str, Any]) -> None:
    """Write `tokenizer.json`, or refuse a directory made with another tokenizer, image size or seed."""
    if not (directory / HEADER_NAME).exists():
        write_atomic(directory / HEADER_NAME, encode_json(header))
        return
    existing = read_header(directory)
    for key in IDENTITY_KEYS:
        if existing.get(key) != header[key]:
            raise BeitError(
                f"{directory} holds shards made with a different {key} ({_short(existing.get(key))} there, "
                f"{_short(header[key])} now); name a new output directory"
            )


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value.get('name')} sha256 {str(value.get('weights_sha256'))[:12]}"
    return repr(value)


# ---------------------------------------------------------------------------------------------------------
# Workers: decode, convert, augment, JPEG-encode


class BadItem(Exception):
    """An input item that cannot become a sample; its message is the recorded reason."""


def load_rgb(path: Path, max_pixels: int, min_side: int = MIN_SIDE) -> tuple[Image.Image, str]:
    """Decode an image to 8-bit RGB; returns (image, original mode). Raises BadItem with the reason.

    Converted: grayscale, palette, CMYK, 16-bit (scaled, not clipped), transparency (composited on white).
    Skipped: unreadable, truncated or corrupt files, images under `min_side` px, over `max_pixels` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadItem(f"too large: {w}x{h} pixels (limit {max_pixels})")
                if min(w, h) < min_side:
                    raise BadItem(f"too small: {w}x{h} (minimum side {min_side} px)")
                img.load()
                return _to_rgb(img), img.mode
    except BadItem:
        raise
    except FileNotFoundError:
        raise BadItem("missing file") from None
    except Image.DecompressionBombError as err:
        raise BadItem(f"too large: {err}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors... for corrupt data
        message = str(err).replace(str(path), path.name)  # stats must not depend on where data is mounted
        raise BadItem(f"unreadable: {type(err).__name__}: {message}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr  # 16-bit range stored as 32-bit
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


@dataclass(frozen=True)
class _Task:
    shard: str
    last: bool  # the final batch of its shard
    view: int
    item: int
    path: str
    label: str | None


@dataclass
class _Result:
    task: _Task
    jpg: bytes | None = None
    meta: dict[str, Any] | None = None
    reason: str | None = None  # why the item was skipped


@dataclass
class _Batch:
    shard: str
    last: bool
    results: list[_Result]
    views: torch.Tensor  # uint8 [n_ok, 3, t, t], tokenizer views of the results without a reason


class _ViewMaker(Dataset):
    """Maps a task to its sample (runs in the worker processes)."""

    def __init__(self, root: Path, augment: TwoViewAugment, seed: int, split: str, max_pixels: int):
        self.root, self.augment, self.max_pixels = root, augment, max_pixels
        self.seed, self.split = seed, split

    def __getitem__(self, task: _Task) -> tuple[_Result, np.ndarray | None]:
        try:
            image, mode = load_rgb(self.root / task.path, self.max_pixels)
        except BadItem as err:
            return _Result(task, reason=str(err)), None
        views = self.augment(image, self.seed, task.item, task.view)
        meta = {
            "id": task.item,
            "path": task.path,
            "label": task.label,
            "split": self.split,
            "view": task.view,
            "seed": self.seed,
            "source_size": list(image.size),
            "source_mode": mode,
            **views.params,
        }
        return _Result(task, encode_jpeg(views.patch), meta), np.asarray(views.tokenizer)


def _collate(pairs: list[tuple[_Result, np.ndarray | None]]) -> _Batch:
    results = [r for r, _ in pairs]
    arrays = [a for _, a in pairs if a is not None]
    first = pairs[0][0].task  # all tasks of a batch belong to one shard
    views = (
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if arrays
        else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    )
    return _Batch(first.shard, first.last, results, views)


# ---------------------------------------------------------------------------------------------------------
# The job


def parse_partition(spec: str | None) -> tuple[int, int]:
    """`i/N` → (i, N); None → from RANK/WORLD_SIZE (torchrun, accelerate launch), else (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not int(m[1]) < int(m[2]):
        raise BeitError(f"--partition {spec!r} must be i/N with 0 <= i < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def _checked_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device (None: the fastest present); a name torch does not know, or a device this
    machine lacks, raises BeitError."""
    if device is None:
        return fastest_device()
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise BeitError(f"unknown device {str(device)!r}: {err}") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise BeitError(f"device {device} is not available on this machine; use --device cpu or leave it out")
    return device


def fastest_device() -> torch.device:
    """CUDA (this process's LOCAL_RANK GPU), else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class _ShardBatches:
    """Batch sampler over this partition's pending shards; claims each shard lazily, right before use."""

    def __init__(self, job: _Job, pending: list[tuple[int, int]]):
        self.job, self.pending = job, pending

    def __iter__(self) -> Iterator[list[_Task]]:
        job = self.job
        for chunk, view in self.pending:
            name = shard_name(job.split, view, chunk)
            claim = job.claim(name)
            if claim is None:
                continue
            rows = job.plan.chunks[chunk]
            starts = range(0, len(rows), job.batch_size)
            for start in starts:
                last = start == starts[-1]
                yield [_Task(name, last, view, *row) for row in rows[start : start + job.batch_size]]


class _OpenShard:
    """The shard being written: its temporary tar, running stats, and claim."""

    def __init__(self, directory: Path, name: str, claim: Claim):
        self.name, self.claim = name, claim
        self.final = directory / name
        self.tmp = directory / f"{name}.{_owner_tag(claim.me)}.tmp"
        self.writer = ShardWriter(self.tmp)
        self.items = 0
        self.skipped: list[dict[str, Any]] = []


class _Job:
    def __init__(
        self,
        out: Path,
        tokenizer: Tokenizer,
        split: str,
        plan: Plan,
        batch_size: int,
        claim_timeout: float,
        device: torch.device,
    ):
        self.out, self.tokenizer, self.split, self.plan = out, tokenizer, split, plan
        self.batch_size, self.claim_timeout, self.device = batch_size, claim_timeout, device
        self.claims: dict[str, Claim] = {}
        self.summary = JobSummary(out)
        self.delay = float(os.environ.get(_DELAY_ENV, 0))

    def is_complete(self, name: str) -> bool:
        return stats_path(self.out / name).exists()

    def claim(self, name: str) -> Claim | None:
        """Claim shard `name`, or None if it is complete or another live process holds it."""
        if self.is_complete(name):
            return None
        claim = Claim(self.out / f"{name}.claim", self.claim_timeout)
        if not claim.try_acquire():
            self.summary.shards_busy += 1
            log.info("%s is being written by another process; leaving it", name)
            return None
        if claim.previous is not None:  # a dead owner's partial tar
            log.info("%s: taking over a stale claim of %s", name, claim.previous)
            (self.out / f"{name}.{_owner_tag(claim.previous)}.tmp").unlink(missing_ok=True)
        if self.is_complete(name):  # finished by someone else between the check and the claim
            claim.release()
            return None
        self.claims[name] = claim
        return claim

    def write_batch(self, shard: _OpenShard, batch: _Batch) -> None:
        tok = self.tokenizer
        if len(batch.views):
            with torch.inference_mode():
                tokens = tok.encode(batch.views.to(self.device, non_blocking=True)).cpu().numpy()
            if tokens.shape != (len(batch.views), tok.grid, tok.grid):
                raise RuntimeError(f"tokenizer returned {tokens.shape}, expected [B, {tok.grid}, {tok.grid}]")
        ok = iter(range(len(batch.views)))
        for r in batch.results:
            shard.items += 1
            if r.reason is not None:
                shard.skipped.append({"id": r.task.item, "path": r.task.path, "reason": r.reason})
                log.warning("skipped item %d (%s): %s", r.task.item, r.task.path, r.reason)
                continue
            members = {
                "jpg": r.jpg,
                "tokens.npy": encode_tokens(tokens[next(ok)], tok.vocab_size),
                "json": encode_json(r.meta),
            }
            shard.writer.write(sample_key(r.task.item, r.task.view), members)
        shard.writer.flush()

    def finish(self, shard: _OpenShard) -> None:
        """Publish: fsync and rename the tar, then write its stats (the completion marker)."""
        shard.writer.close()
        os.replace(shard.tmp, shard.final)
        _fsync_dir(self.out)
        split, view, chunk = parse_shard_name(shard.name)
        stats = {
            "shard": shard.name,
            "split": split,
            "view": view,
            "chunk": chunk,
            "items": shard.items,
            "count": shard.writer.count,
            "bytes": shard.writer.bytes,
            "sha256": shard.writer.sha256,
            "skipped": shard.skipped,
        }
        write_atomic(stats_path(shard.final), encode_json(stats))
        _fsync_dir(self.out)
        shard.claim.release()
        del self.claims[shard.name]
        self.summary.shards_written += 1
        self.summary.samples += shard.writer.count
        self.summary.skipped += len(shard.skipped)

    def run(self, loader: DataLoader, progress: tqdm) -> None:
        shard: _OpenShard | None = None
        try:
            for batch in loader:
                if shard is None or shard.name != batch.shard:
                    shard = _OpenShard(self.out, batch.shard, self.claims[batch.shard])
                self.write_batch(shard, batch)
                for claim in self.claims.values():
                    claim.refresh()
                progress.update(len(batch.results))
                if batch.last:
                    self.finish(shard)
                    shard = None
                if self.delay:
                    time.sleep(self.delay)
        finally:
            if shard is not None:
                shard.writer.abort()
            for claim in self.claims.values():
                claim.release()


def _remove_stale_claims_of_complete_shards(out: Path, timeout: float) -> None:
    """A process killed between writing a shard's stats and releasing its claim leaves the claim behind."""
    for path in out.glob("*.tar.claim"):
        claim = Claim(path, timeout)
        state = claim.read()
        if stats_path(out / path.name[: -len(".claim")]).exists() and state and claim.is_stale(*state):
            path.unlink(missing_ok=True)


def _cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tokenize_dataset(
    source: str | Path,
    output_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    image_size: int = 224,
    views: int = 1,
    seed: int = 0,
    shard_size: int = 1000,
    partition: tuple[int, int] = (0, 1),
    num_workers: int = 0,
    batch_size: int = 64,
    split: str = "train",
    device: str | torch.device | None = None,
    claim_timeout: float = 600.0,
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485,
    progress: bool = True,
) -> JobSummary:
    """Tokenize `views` augmented views of every image of `source` into the shard set `output_dir`.

    Only this partition's missing shards are written; rerunning the same call is a no-op once all exist.
    `num_workers` processes decode and augment (0: in this process); the tokenizer runs here, on `device`
    (default: the fastest present). Returns what was done; raises BeitError for user mistakes.
    """
    t0 = time.perf_counter()
    rank, world = partition
    if not 0 <= rank < world:
        raise BeitError(f"partition {rank}/{world} is invalid: need 0 <= i < N")
    for name, value in (("views", views), ("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise BeitError(f"{name} must be at least 1, got {value}")
    if num_workers < 0:
        raise BeitError(f"num_workers must be >= 0, got {num_workers}")
    try:
        check_split(split)
    except ValueError as err:
        raise BeitError(f"{err} (it becomes part of the shard names)") from None
    if tokenizer.vocab_size > 1 << 16:
        raise BeitError(f"vocabulary of {tokenizer.vocab_size} ids does not fit the uint16 token format")
    if image_size % tokenizer.grid:
        raise BeitError(
            f"image size {image_size} is not a multiple of the tokenizer grid {tokenizer.grid}: patches and "
            f"tokens would not align; use e.g. {max(1, round(image_size / tokenizer.grid)) * tokenizer.grid}"
        )
    device = _checked_device(device)
    root, entries = scan_source(source)
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BeitError(f"cannot create the shard set directory {out}: {err.strerror}") from None
    header = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint(),
        "image_size": image_size,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
    }
    lock = Claim(out / ".lock", claim_timeout)
    lock.acquire()
    try:
        ensure_header(out, header)
        plan = update_plan(out, split, entries, shard_size)
    finally:
        lock.release()

    work = [(c, v) for c in sorted(plan.chunks) for v in range(views)]
    mine = [(c, v) for c, v in work if (c * views + v) % world == rank]
    pending = [(c, v) for c, v in mine if not stats_path(out / shard_name(split, v, c)).exists()]
    job = _Job(out, tokenizer.to(device), split, plan, batch_size, claim_timeout, device)
    job.summary.shards_assigned = len(mine)
    job.summary.shards_complete_before = len(mine) - len(pending)

    dataset = _ViewMaker(root, TwoViewAugment(image_size, tokenizer.input_size), seed, split, max_pixels)
    loader = DataLoader(
        dataset,
        batch_sampler=_ShardBatches(job, pending),
        collate_fn=_collate,
        num_workers=num_workers,
        multiprocessing_context=_FORK if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=die_with_parent(),
    )
    total = sum(len(plan.chunks[c]) for c, _ in pending)
    threads = torch.get_num_threads()
    if device.type == "cpu" and num_workers:  # leave the workers their cores: oversubscribed BLAS threads
        torch.set_num_threads(max(1, _cpu_count() - num_workers))  # wait on each other and crawl
    try:
        with tqdm(total=total, unit="img", desc=f"tokenize {rank}/{world}", disable=not progress) as bar:
            job.run(loader, bar)
    finally:
        torch.set_num_threads(threads)

    lock.acquire()  # serialize manifest rebuilds: the last process to finish lists every shard
    try:
        _remove_stale_claims_of_complete_shards(out, claim_timeout)
        write_manifest(out)
    finally:
        lock.release()
    job.summary.seconds = time.perf_counter() - t0
    return job.summary
