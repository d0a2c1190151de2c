"""Shard sets: the WebDataset tars that `beit tokenize` writes and `beit pretrain` streams."""

from beit.shards.format import Sample, decode_sample, iter_tar_samples, sample_key, shard_name
from beit.shards.shardset import ShardInfo, ShardSet, open_shard_set

__all__ = [
    "Sample",
    "ShardInfo",
    "ShardSet",
    "decode_sample",
    "iter_tar_samples",
    "open_shard_set",
    "sample_key",
    "shard_name",
]
