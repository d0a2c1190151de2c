"""Shared fixtures: a real shard set made by the tokenization job from scikit-learn's digits, one thread."""

import sys
from pathlib import Path

import pytest
import torch

from beit.demo import write_digits

DIGITS = 600  # images tokenized into the shared shard set
SHARD_SIZE = 250  # -> shards of 250, 250 and 100 samples: uneven on purpose


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """The first DIGITS digits as 8-bit RGB PNGs in an ImageFolder layout (one folder per label)."""
    return write_digits(tmp_path_factory.mktemp("digits"), DIGITS, size=8)


@pytest.fixture(scope="session")
def digits_shards(digits_folder, tmp_path_factory) -> Path:
    """The digits tokenized with the tiny dVAE (32 px, 8x8 grid, 512 codes: the "tiny" model preset)
    by the real job: 600 samples in three uneven shards."""
    from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config
    from beit.tokenize.job import tokenize_dataset

    # An untrained dVAE is a fixed random function of the pixels; with this seed its codes spread over ~50
    # ids on digits (with seed 0 one id covers 98% of patches, which would make the learning test trivial).
    torch.manual_seed(1)
    tokenizer = DVAETokenizer(DiscreteVAE(dvae_config("tiny")).eval())
    out = tmp_path_factory.mktemp("shards") / "digits"
    tokenize_dataset(
        digits_folder,
        out,
        tokenizer,
        image_size=32,
        shard_size=SHARD_SIZE,
        batch_size=100,
        device="cpu",
        progress=False,
    )
    return out


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `beit ARGS` in-process through the console entry point: returns (exit code, stdout, stderr)."""
    from beit.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["beit", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small models run several times faster on one thread than on this
    machine's two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
