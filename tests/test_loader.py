"""The shard loader on a real shard set (digits tokenized by the job): batches, masks, exact resume
positions, rank splitting, bad samples, compatibility checks and device normalization."""

import hashlib
import io
import itertools
import logging
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from shard_helpers import damage_jpegs
from skimage import data as skdata

from beit.config import model_config
from beit.errors import BeitError
from beit.shards import iter_tar_samples, open_shard_set
from beit.train.loader import (
    Normalize,
    ShardLoader,
    ShardStream,
    _stream_rng,
    check_compatible,
    decode_jpeg,
    decode_jpegs,
    read_npy,
    shard_loader,
)
from beit.train.masking import MaskGenerator, mask_generator, scaled_mask_size


def _loader(shards, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("masks", mask_generator(8))
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 64)
    return shard_loader(open_shard_set(shards), **kw)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _digests(batches):
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for b in batches for image in b.images]


def test_batches_hold_uint8_images_token_grids_and_blockwise_masks(digits_shards):
    batch = _take(_loader(digits_shards), 1)[0]
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (16, 3, 32, 32)
    assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (16, 8, 8)
    assert batch.mask.dtype == torch.bool and batch.mask.shape == (16, 64)
    assert batch.skipped == 0
    assert 0 <= batch.tokens.min() and batch.tokens.max() < 512
    counts = batch.mask.sum(1)
    assert (counts > 0).all() and (counts <= 24).all()  # round(75/196 * 64) = 24 at most
    assert batch.images.float().std() > 10  # real pictures, not a constant


def test_each_mask_is_seeded_by_its_sample(digits_shards):
    # The sample at position i of stream 0 gets MaskGenerator(...)(rng=Random("mask/seed/stream/i")).
    batch = _take(_loader(digits_shards, seed=7), 1)[0]
    gen = MaskGenerator(8, 24, min_block=5)
    for i in range(16):
        expected = gen(rng=_stream_rng("mask", 7, 0, i)).reshape(-1)
        assert torch.equal(batch.mask[i], torch.from_numpy(expected))
    assert not all(torch.equal(batch.mask[0], m) for m in batch.mask[1:])


def test_scaled_mask_size_keeps_the_official_values_at_14x14():
    assert scaled_mask_size(196) == (75, 16)
    assert scaled_mask_size(64) == (24, 5)
    gen = mask_generator(14)
    assert (gen.num_masked, gen.min_block) == (75, 16)
    assert mask_generator(8, 10, 3).num_masked == 10
    assert type(mask_generator(8, random_masking=True)).__name__ == "RandomMaskGenerator"


def test_start_batch_resumes_the_stream_exactly_across_workers_and_epochs(digits_shards):
    # Two workers, an epoch of 5 batches: batch 7 is the third of epoch 1 and comes from worker 1.
    kw = dict(num_workers=2, epoch_batches=5, seed=3)
    reference = _take(_loader(digits_shards, **kw), 12)
    resumed = _take(_loader(digits_shards, start_batch=7, **kw), 5)
    for ref, got in zip(reference[7:], resumed, strict=True):
        assert torch.equal(ref.images, got.images)
        assert torch.equal(ref.tokens, got.tokens)
        assert torch.equal(ref.mask, got.mask)
    # Epochs differ (new shard order, buffer and masks), and the two workers read different samples.
    assert _digests(reference[:5]) != _digests(reference[5:10])
    assert not set(_digests(reference[0:1])) & set(_digests(reference[1:2]))


def test_recorded_stream_positions_resume_exactly_after_bad_samples(digits_shards, tmp_path):
    # Every 7th JPEG is undecodable. Batch counts alone make a resumed stream start one sample early per
    # bad sample before it; the positions the loader records after each batch it yields do not.
    directory = tmp_path / "damaged"
    shutil.copytree(digits_shards, directory)
    assert damage_jpegs(directory, every=7) > 0
    kw = dict(num_workers=2, batch_size=10, seed=3)
    loader = _loader(directory, **kw)
    stream = iter(loader)
    reference = [next(stream) for _ in range(7)]
    state = loader.state_dict()
    reference += [next(stream) for _ in range(5)]
    del stream
    assert sum(b.skipped for b in reference[:7]) > 0  # precondition: the streams skipped samples by then
    assert sorted(state["positions"]) == ["0", "1"]

    resumed = _loader(directory, start_batch=7, **kw)
    assert resumed.load_state_dict(state)
    assert _digests(_take(resumed, 5)) == _digests(reference[7:])
    by_count = _take(_loader(directory, start_batch=7, **kw), 5)  # the approximation: shifted
    assert _digests(by_count) != _digests(reference[7:])
    assert not _loader(directory, start_batch=7, **{**kw, "batch_size": 5}).load_state_dict(state)
    assert not _loader(directory, start_batch=7, **{**kw, "shuffle_buffer": 32}).load_state_dict(state)
    with pytest.raises(BeitError, match="start_batch must be at least 0"):
        iter(_loader(directory, start_batch=-1))


def test_workers_start_once_and_cross_epochs_themselves(digits_shards, tmp_path, monkeypatch):
    # Epochs of 1 batch and 2 workers: 6 batches span 6 epochs, yet each worker process starts once (a
    # loader per epoch would start 12). Forked workers inherit the patched __iter__ and log their start.
    starts = tmp_path / "starts"
    original = ShardStream.__iter__

    def logged(self):
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self)

    monkeypatch.setattr(ShardStream, "__iter__", logged)
    kw = dict(num_workers=2, epoch_batches=1, seed=5)
    batches = _take(_loader(digits_shards, **kw), 6)
    pids = starts.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2 and str(os.getpid()) not in pids
    assert len({tuple(_digests([b])) for b in batches}) == 6  # six different batches
    monkeypatch.setattr(ShardStream, "__iter__", original)
    resumed = _take(_loader(digits_shards, start_batch=3, **kw), 3)
    assert _digests(resumed) == _digests(batches[3:])


def test_ranks_split_the_shards_and_cover_every_sample_once(digits_shards):
    # 3 shards of 250, 250 and 100 samples over 2 ranks: rank 0 reads shards 0 and 2, rank 1 shard 1.
    # Without a shuffle buffer, one epoch of 35 batches of 10 is exactly one pass over rank 0's shards.
    shard_set = open_shard_set(digits_shards)
    assert _loader(digits_shards, rank=1, world_size=2, batch_size=10).epoch_batches == 600 // (10 * 2)
    seen = []
    for rank, samples in ((0, 350), (1, 250)):
        loader = _loader(
            digits_shards, rank=rank, world_size=2, batch_size=10, epoch_batches=35, shuffle_buffer=1
        )
        seen += _digests(_take(loader, 35))[:samples]
    stored = []
    for shard in shard_set.shards:
        for _, members in iter_tar_samples(shard.path):
            stored.append(hashlib.sha1(decode_jpeg(members["jpg"]).numpy().tobytes()).hexdigest())
    assert Counter(seen) == Counter(stored)


def _stored_digests(shard_set):
    return [
        hashlib.sha1(decode_jpeg(members["jpg"]).numpy().tobytes()).hexdigest()
        for shard in shard_set.shards
        for _, members in iter_tar_samples(shard.path)
    ]


def test_each_pass_reads_every_sample_of_the_stream_however_short_the_epoch(digits_shards):
    # Epochs of one batch: each pass over the 600 samples still goes to its end (a stream restarted every
    # epoch would only ever see the first samples of its shards), and the next pass is another order.
    batches = _take(_loader(digits_shards, batch_size=10, epoch_batches=1), 120)
    first, second = _digests(batches[:60]), _digests(batches[60:])
    stored = Counter(_stored_digests(open_shard_set(digits_shards)))
    assert Counter(first) == stored and Counter(second) == stored
    assert first != second


def test_fewer_shards_than_streams_split_the_samples_not_the_shards(digits_shards):
    # 3 shards, 2 ranks x 2 workers = 4 streams: each stream keeps every 4th sample of every shard, so
    # the four streams' first passes (150 samples each) hold every stored sample exactly once.
    seen = []
    for rank in (0, 1):
        loader = _loader(digits_shards, rank=rank, world_size=2, batch_size=10, num_workers=2)
        assert [loader.stream.share(rank * 2 + role, 4).samples for role in (0, 1)] == [150, 150]
        seen += _digests(_take(loader, 30))
    assert Counter(seen) == Counter(_stored_digests(open_shard_set(digits_shards)))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(20 * 4096)  # at a header boundary, as a copy cut short in 4 KiB blocks leaves it


def _small_shard(directory: Path):
    """The 100-sample shard of a copy of the digits set."""
    return next(s for s in open_shard_set(directory).shards if s.count == 100)


def test_a_truncated_shard_is_left_out_or_skipped_with_its_samples_counted(digits_shards, tmp_path, caplog):
    directory = tmp_path / "truncated"
    shutil.copytree(digits_shards, directory)
    shard_set, small = open_shard_set(directory), _small_shard(directory)
    others = [s for s in shard_set.shards if s.path != small.path]
    readable = Counter(_stored_digests(replace(shard_set, shards=others)))
    damaged_later = _loader(directory, batch_size=10, shuffle_buffer=1)  # built while the shard is whole
    _truncate(small.path)
    assert sum(1 for _ in iter_tar_samples(small.path)) > 0  # the tar alone looks fine
    with caplog.at_level(logging.WARNING, logger="beit.train.loader"):
        # Truncated before the loader is built: left out, so a pass is the other 500 samples.
        batches = _take(_loader(directory, batch_size=10, shuffle_buffer=1), 50)
        left_out = f"leaving out shard {small.path}: it has 81920 bytes, its stats say {small.bytes}"
        assert left_out in caplog.text
        assert sum(b.skipped for b in batches) == 0 and Counter(_digests(batches)) == readable
        # Truncated after: skipped in each pass, its 100 samples counted (with the batch after its turn).
        batches = _take(damaged_later, 51)
    assert f"skipping the rest of shard {small.path}" in caplog.text
    assert sum(b.skipped for b in batches) == 100
    assert Counter(_digests(batches[:50])) == readable


def test_resuming_after_a_damaged_shard_does_not_count_it_again(digits_shards, tmp_path):
    directory = tmp_path / "truncated"
    shutil.copytree(digits_shards, directory)
    loader = _loader(directory, batch_size=10, shuffle_buffer=1)
    resumed = _loader(directory, batch_size=10, shuffle_buffer=1)  # both built before the damage
    _truncate(_small_shard(directory).path)
    stream, reference, states = iter(loader), [], []
    for _ in range(100):  # two passes of 500 readable samples
        reference.append(next(stream))
        states.append(loader.state_dict())
    met = [i for i in range(50, 98) if reference[i].skipped]  # where pass 1 met the shard (as its last)
    assert met and sum(b.skipped for b in reference[:98]) == 200  # precondition: both passes met it
    start = met[-1] + 2  # resumed after it, in the same pass: the skip phase reads the shard again
    resumed.start_batch = start
    assert resumed.load_state_dict(states[start - 1])
    batches = _take(resumed, 100 - start)
    assert [b.skipped for b in batches] == [b.skipped for b in reference[start:]]
    assert _digests(batches) == _digests(reference[start:])


def test_a_stream_with_one_usable_sample_a_pass_goes_on(digits_shards, tmp_path):
    # Only the 100-sample shard is in the set and only its first JPEG decodes: one usable sample a pass.
    # The bad samples between two passes' usable ones often outnumber a pass; that is no reason to stop.
    directory = tmp_path / "one-good"
    shutil.copytree(digits_shards, directory)
    *others, _ = open_shard_set(directory).shards
    for other in others:
        other.path.with_name(other.path.name.replace(".tar", ".stats.json")).unlink()
    damage_jpegs(directory, every=1, first=1)
    batches = _take(_loader(directory, batch_size=1), 20)
    assert len(set(_digests(batches))) == 1
    assert sum(b.skipped for b in batches) >= 19 * 99


def test_empty_shards_are_left_out_and_a_pass_without_usable_samples_raises(digits_shards, tmp_path):
    shard_set = open_shard_set(digits_shards)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    # A whole (size as in its stats) shard of 0 samples, as the job writes when every item of a chunk fails.
    whole_but_empty = replace(shard_set.shards[1], path=empty, count=0, bytes=empty.stat().st_size)
    shards = [shard_set.shards[0], whole_but_empty]
    kw = dict(image_size=32, grid=8, batch_size=10, masks=mask_generator(8))
    stream = ShardStream(shards, vocab_size=512, **kw)
    assert [s.path for s in stream.shards] == [shard_set.shards[0].path]
    with pytest.raises(BeitError, match="none of the 1 selected shard"):
        ShardStream(shards[1:], vocab_size=512, **kw)
    # Every token id is outside a 1-token vocabulary: one pass, then a clear error rather than a spin.
    loader = ShardLoader(ShardStream(shards, vocab_size=1, **kw), epoch_batches=1, num_workers=0)
    with pytest.raises(BeitError, match="no usable sample in a whole pass over the 250 samples"):
        next(iter(loader))


def test_bad_samples_are_skipped_counted_and_logged(digits_shards, tmp_path, caplog):
    directory = tmp_path / "damaged"
    shutil.copytree(digits_shards, directory)
    *others, shard = open_shard_set(directory).shards  # keep only the 100-sample shard complete
    for other in others:
        other.path.with_name(other.path.name.replace(".tar", ".stats.json")).unlink()
    with tarfile.open(shard.path) as tar:
        members = tar.getmembers()
    jpg = next(m for m in members if m.name.endswith(".jpg"))
    tokens = [m for m in members if m.name.endswith(".tokens.npy")][1]
    with open(shard.path, "r+b") as f:
        f.seek(jpg.offset_data + 2)  # keep the SOI marker, destroy the rest
        f.write(b"\x00" * (jpg.size - 2))
        f.seek(tokens.offset_data + tokens.size - 128)  # the last 64 uint16 ids -> 65535
        f.write(b"\xff" * 128)
    loader = _loader(directory, batch_size=10, shuffle_buffer=1)  # samples in tar order
    with caplog.at_level(logging.WARNING, logger="beit.train.loader"):
        batches = _take(loader, 9)  # 90 good samples: the first pass over the shard, bad samples 0 and 1
    assert sum(b.skipped for b in batches) == 2
    assert all(b.images.shape[0] == 10 for b in batches)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert jpg.name.split(".")[0] in messages and "undecodable jpg" in messages
    assert tokens.name.split(".")[0] in messages and "outside [0, 512)" in messages


def test_an_error_in_a_worker_keeps_its_one_line_message(digits_shards, tmp_path):
    directory = tmp_path / "emptied"
    shutil.copytree(digits_shards, directory)
    loader = _loader(directory, num_workers=1)
    for shard in open_shard_set(directory).shards:
        shard.path.unlink()  # after the loader was built: its worker finds nothing to read
    with pytest.raises(BeitError) as raised:
        _take(loader, 1)
    assert (
        str(raised.value)
        == "no readable samples in the 3 shard(s) of rank 0's stream 0; see the warnings above"
    )


def test_refuses_shards_that_do_not_fit_the_model(digits_shards):
    shard_set = open_shard_set(digits_shards)
    check_compatible(shard_set, model_config("tiny", mim=True))
    with pytest.raises(BeitError, match="512-token vocabulary"):
        check_compatible(shard_set, model_config("tiny", mim=True, vocab_size=8192))
    with pytest.raises(BeitError, match="8x8 token grids"):
        check_compatible(shard_set, model_config("tiny", mim=True, patch_size=8))
    with pytest.raises(BeitError, match="32-px images"):
        check_compatible(shard_set, model_config("tiny", mim=True, image_size=64, patch_size=8))
    with pytest.raises(BeitError, match="no shards of split 'val'"):
        _loader(digits_shards, split="val")


def test_jpeg_decoder_matches_pil_bit_for_bit():
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((96, 96)).save(buf, "JPEG", quality=95)
    ours = decode_jpeg(buf.getvalue())
    pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert ours.dtype == torch.uint8 and ours.shape == (3, 96, 96)
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), pil)
    gray = io.BytesIO()
    Image.fromarray(skdata.camera()).resize((40, 40)).save(gray, "JPEG")
    assert decode_jpeg(gray.getvalue()).shape == (3, 40, 40)  # grayscale JPEGs come out RGB


def _jpeg(image: np.ndarray, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_decode_jpegs_decodes_a_batch_in_one_call_and_fails_on_a_bad_one():
    blobs = [_jpeg(skdata.astronaut(), 48), _jpeg(skdata.camera(), 40), _jpeg(skdata.coffee(), 48)]
    many = decode_jpegs(blobs)
    assert [tuple(image.shape) for image in many] == [(3, 48, 48), (3, 40, 40), (3, 48, 48)]
    for blob, image in zip(blobs, many, strict=True):
        assert torch.equal(image, decode_jpeg(blob))
    assert decode_jpegs([]) == []
    with pytest.raises(RuntimeError):
        decode_jpegs([blobs[0], blobs[1][:2] + bytes(len(blobs[1]) - 2)])


def test_decode_keeps_the_good_samples_of_a_chunk_with_their_stream_positions(digits_shards, caplog):
    stream = _loader(digits_shards).stream
    _, good = next(iter_tar_samples(open_shard_set(digits_shards).shards[0].path))
    ok = dict(good, __key__="ok")
    chunk = [
        (10, ok),
        (11, {"__key__": "no-tokens", "jpg": good["jpg"]}),
        (12, dict(good, __key__="garbage-jpg", jpg=b"\xff\xd8" + bytes(300))),
        (13, dict(good, __key__="too-big", jpg=_jpeg(skdata.astronaut(), 48))),
        (14, ok),
    ]
    with caplog.at_level(logging.WARNING, logger="beit.train.loader"):
        decoded = stream.decode(chunk)
    assert [index for index, _, _ in decoded] == [10, 14]
    assert torch.equal(decoded[0][1], decode_jpeg(good["jpg"])) and decoded[0][2].shape == (8, 8)
    assert stream._skipped == 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no-tokens" in messages and "missing member(s): has ['jpg']" in messages
    assert "garbage-jpg" in messages and "undecodable jpg" in messages
    assert "too-big" in messages and "image is (3, 48, 48), expected (3, 32, 32)" in messages


@pytest.mark.parametrize(
    "name,mean,std",
    [("half", (0.5,) * 3, (0.5,) * 3), ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
)
def test_normalize_matches_torchvision(name, mean, std):
    images = torch.from_numpy(skdata.astronaut()[:64, :64]).permute(2, 0, 1).unsqueeze(0).contiguous()
    expected = TF.normalize(images.float() / 255, mean, std)
    torch.testing.assert_close(Normalize.named(name)(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(BeitError, match="unknown normalization"):
        Normalize.named("zscore")


def test_read_npy_matches_np_load_and_refuses_pickles():
    for array in (np.arange(64, dtype=np.uint16).reshape(8, 8), np.asfortranarray(np.eye(3)), np.zeros(0)):
        buf = io.BytesIO()
        np.save(buf, array)
        ours = read_npy(buf.getvalue())
        assert ours.dtype == array.dtype and ours.flags.f_contiguous == array.flags.f_contiguous
        np.testing.assert_array_equal(ours, np.load(io.BytesIO(buf.getvalue())))
    damaged = bytearray(buf.getvalue())
    damaged[10] = 0  # the header's "{": numpy's literal parser then raises a tokenize.TokenError
    with pytest.raises(ValueError, match="unreadable header"):
        read_npy(bytes(damaged))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        read_npy(pickled.getvalue())
    with pytest.raises(ValueError):
        read_npy(buf.getvalue()[:-3])  # truncated data
