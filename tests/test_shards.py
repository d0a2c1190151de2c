"""The shard format (deterministic tars, sample codecs), shard sets, `verify` and `inspect`."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_helpers import make_image_folder, tiny_tokenizer
from typer.testing import CliRunner

from beit.cli import app
from beit.errors import BeitError
from beit.shards import decode_sample, iter_tar_samples, open_shard_set
from beit.shards.format import (
    ShardFormatError,
    ShardWriter,
    _tar_members,
    encode_jpeg,
    encode_json,
    encode_tokens,
    parse_shard_name,
    sample_key,
    sha256_file,
    shard_name,
)
from beit.shards.inspect import render, summarize, token_colors
from beit.shards.verify import verify_shard_set
from beit.tokenize.job import tokenize_dataset


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """12 digits and 2 photos, one view, 5 per shard -> shards of 5, 5 and 4 samples."""
    images = make_image_folder(tmp_path_factory.mktemp("images"), digits=12, photos=2)
    out = tmp_path_factory.mktemp("shards") / "set"
    tokenize_dataset(images, out, tiny_tokenizer(), image_size=32, shard_size=5, device="cpu", progress=False)
    return out


@pytest.fixture
def copy(shard_set, tmp_path) -> Path:
    """A private copy of the shard set to damage."""
    return Path(shutil.copytree(shard_set, tmp_path / "copy"))


def test_tar_reader_matches_tarfile_and_rejects_damaged_headers(shard_set, tmp_path):
    shard = open_shard_set(shard_set).shards[0].path
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        expected = [(member.name, tar.extractfile(member).read()) for member in members]
    assert list(_tar_members(shard)) == expected and len(expected) == 15
    damaged = bytearray(shard.read_bytes())
    damaged[members[4].offset + 10] ^= 0x01  # a name byte in a later header: only the checksum can tell
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(ShardFormatError, match="unreadable tar .bad header checksum"):
        list(_tar_members(tmp_path / "damaged.tar"))
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ShardFormatError, match="truncated"):
        list(_tar_members(tmp_path / "cut.tar"))


def some_samples(n: int = 3) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    samples = []
    for item in range(n):
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        members = {
            "jpg": encode_jpeg(image),
            "tokens.npy": encode_tokens(rng.integers(0, 512, (4, 4)), 512),
            "json": encode_json({"id": item, "view": 0, "b": [1, 2], "a": None}),
        }
        samples.append((sample_key(item, 0), members))
    return samples


def test_tar_writer_is_byte_deterministic_and_fixes_every_header_field(tmp_path):
    for name in ("a.tar", "b.tar"):
        writer = ShardWriter(tmp_path / name)
        for key, members in some_samples():
            writer.write(key, members)
        writer.close()
        assert writer.sha256 == sha256_file(tmp_path / name)
        assert writer.bytes == (tmp_path / name).stat().st_size
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos[:4]] == [
        "000000000_000.jpg",
        "000000000_000.tokens.npy",
        "000000000_000.json",
        "000000001_000.jpg",
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o444)}
    writer = ShardWriter(tmp_path / "c.tar")
    with pytest.raises(ValueError):
        writer.write("0.1", some_samples(1)[0][1])  # webdataset would split this key at the dot
    with pytest.raises(ValueError):
        writer.write("x", {"jpg": b""})
    writer.abort()
    assert not (tmp_path / "c.tar").exists()


def test_samples_round_trip_and_malformed_ones_are_rejected(tmp_path):
    key, members = some_samples(1)[0]
    sample = decode_sample(key, members)
    assert sample.image.shape == (16, 16, 3) and sample.tokens.shape == (4, 4)
    assert sample.tokens.dtype == np.uint16 and sample.meta == {"id": 0, "view": 0, "b": [1, 2], "a": None}
    assert members["json"] == b'{"a":null,"b":[1,2],"id":0,"view":0}'  # canonical JSON: sorted, compact
    with pytest.raises(ValueError):
        encode_tokens(np.array([[512]]), 512)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    for broken in (
        {**members, "jpg": png.getvalue()},
        {**members, "jpg": b"\xff\xd8junk"},
        {k: v for k, v in members.items() if k != "json"},
        {**members, "tokens.npy": b"x"},
    ):
        with pytest.raises(ShardFormatError):
            decode_sample(key, broken)
    assert shard_name("val", 2, 31) == "val-v002-000031.tar" and parse_shard_name("val-v002-000031.tar") == (
        "val",
        2,
        31,
    )
    assert parse_shard_name("val-v002-000031.tar.x-1.tmp") is None
    with pytest.raises(ValueError):
        shard_name("my-split", 0, 0)


def test_open_shard_set_lists_complete_shards_and_refuses_the_rest(shard_set, copy, tmp_path):
    s = open_shard_set(shard_set)
    assert [(x.path.name, x.count) for x in s.shards] == [
        ("train-v000-000000.tar", 5),
        ("train-v000-000001.tar", 5),
        ("train-v000-000002.tar", 4),
    ]
    assert (s.image_size, s.grid, s.vocab_size, s.num_samples) == (32, 8, 512, 14)
    assert s.tokenizer == tiny_tokenizer().fingerprint() and s.select(split="val") == []
    (copy / "train-v000-000002.stats.json").unlink()  # a shard without stats is incomplete
    assert len(open_shard_set(copy).shards) == 2
    with pytest.raises(BeitError, match="does not exist"):
        open_shard_set(tmp_path / "nothing")
    with pytest.raises(BeitError, match="not a shard set"):
        open_shard_set(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BeitError, match="is a file, not a shard set directory"):
        open_shard_set(tmp_path / "a-file")
    with pytest.raises(BeitError, match="does not exist"):  # verify reads the header the same way
        verify_shard_set(tmp_path / "nothing")
    for stats in copy.glob("*.stats.json"):
        stats.unlink()
    with pytest.raises(BeitError, match="no complete shards"):
        open_shard_set(copy)
    (copy / "tokenizer.json").write_text("{")
    with pytest.raises(BeitError, match="not a valid shard set header"):
        open_shard_set(copy)


def test_verify_passes_a_good_set_and_catches_a_flipped_byte(shard_set, copy):
    report = verify_shard_set(shard_set, progress=False)
    assert report.ok and (report.shards, report.samples) == (3, 14) and report.notes == []
    tar = copy / "train-v000-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0x01  # inside the first JPEG's entropy-coded data: it may still decode
    tar.write_bytes(bytes(data))
    report = verify_shard_set(copy, progress=False)
    assert [p.split(":")[0] for p in report.problems] == ["train-v000-000001.tar"]
    assert "SHA-256" in report.problems[0]


def test_verify_catches_a_truncated_tar_and_a_bad_token(shard_set, copy):
    tar = copy / "train-v000-000000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    stats = json.loads((copy / "train-v000-000002.stats.json").read_text())
    stats["count"] = 5  # stats that disagree with the tar's content
    (copy / "train-v000-000002.stats.json").write_text(json.dumps(stats))
    problems = verify_shard_set(copy, progress=False).problems
    assert any(p.startswith("train-v000-000000.tar") and "truncated" in p for p in problems)
    assert any(p.startswith("train-v000-000000.tar") and "unreadable tar" in p for p in problems)
    assert any(p.startswith("train-v000-000002.tar") and "4 samples, stats say 5" in p for p in problems)
    # a token id outside the vocabulary, in an otherwise consistent shard
    header = json.loads((copy / "tokenizer.json").read_text())
    header["tokenizer"]["vocab_size"] = 2
    (copy / "tokenizer.json").write_text(json.dumps(header))
    assert any("vocabulary of 2" in p for p in verify_shard_set(copy, progress=False).problems)


def test_verify_cli_exit_codes_and_work_in_progress_notes(shard_set, copy):
    runner = CliRunner()
    ok = runner.invoke(app, ["shards", "verify", str(shard_set), "--quiet"])
    assert ok.exit_code == 0 and "OK: 3 shards, 14 samples" in ok.output
    (copy / "train-v000-000003.tar.host-1.tmp").write_bytes(b"partial")
    (copy / "train-v000-000003.tar.claim").write_text("{}")
    tar = copy / "train-v000-000002.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    bad = runner.invoke(app, ["shards", "verify", str(copy), "--quiet"])
    assert bad.exit_code == 1 and "1 problem(s)" in bad.output and "work in progress" in bad.output


def test_inspect_counts_labels_and_renders_samples(shard_set, tmp_path):
    info = summarize(shard_set)
    size = sum(s.bytes for s in open_shard_set(shard_set).shards)
    assert info["by_split_view"] == {"train/v000": {"shards": 3, "samples": 14, "skipped": 0, "bytes": size}}
    labels = {
        s.meta["label"]
        for shard in open_shard_set(shard_set).shards
        for s in (decode_sample(k, m) for k, m in iter_tar_samples(shard.path))
    }
    assert set(info["labels"]["train"]) == labels and sum(info["labels"]["train"].values()) == 14
    assert info["labels"]["train"]["photo"] == 2
    out = render(shard_set, 4, tmp_path / "samples.png", cell=64)
    with Image.open(out) as png:
        assert png.size == (2 * 64 + 24, 4 * (64 + 22) + 8)
    args = ["shards", "inspect", str(shard_set), "--render", "2", str(tmp_path / "b.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and json.loads(result.output.split("\nrendered")[0])["samples"] == 14
    colors = token_colors(np.arange(512).reshape(16, 32), 512).reshape(-1, 3)
    assert len({tuple(c) for c in colors}) > 500  # ids are told apart by colour
