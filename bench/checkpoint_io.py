"""Side-by-side timings of the checkpoint choices, printed as JSON with ratios.

1. relative-position table resampling as a load does it (224 → 384 and 224 → 512 px at patch 16, one
   table per block, every head): our separable not-a-knot spline matrices vs the official port, one SciPy
   `RectBivariateSpline` fit per head (SciPy is only in the dev environment), and their largest difference;
2. reading a whole checkpoint: `safetensors.torch.load_file` vs `torch.load(weights_only=True)` of the
   same state dict saved by `torch.save` (every page touched), and writing it both ways.

Alternatives are interleaved in one run (this machine is noisy); the median of `--repeats` is reported.

    python bench/checkpoint_io.py --preset base --repeats 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from model_speed import race  # bench/ is on sys.path when this script runs
from safetensors.torch import load_file, save_file
from scipy.interpolate import RectBivariateSpline

from beit.model import create_model
from beit.model.resample import (
    geometric_ratio,
    resample_rel_pos_table,
    table_side,
    table_spline,
    warped_offsets,
)


def scipy_resample(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The official per-head loop with interp2d's equivalent, RectBivariateSpline(s=0)."""
    src, dst = table_side(table.shape[0]), table_side(num_rows)
    x = warped_offsets(src, geometric_ratio(src, dst))
    t = dst // 2
    dx = np.arange(-t, t + 0.1, 1.0)
    heads = [
        torch.from_numpy(RectBivariateSpline(x, x, table[:-3, h].reshape(src, src).double().numpy())(dx, dx))
        for h in range(table.shape[1])
    ]
    return torch.cat([torch.stack([h.reshape(-1) for h in heads], 1).to(table.dtype), table[-3:]])


def touch(state: dict[str, torch.Tensor]) -> None:
    """Read every byte (safetensors maps the file lazily; a fair race must page it all in)."""
    for tensor in state.values():
        tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="base")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    torch.manual_seed(0)

    model = create_model(args.preset, num_classes=1000)
    heads = model.config.num_heads
    depth = model.config.depth
    table = torch.randn(732, heads)

    def ours(rows: int) -> None:
        table_spline.cache_clear()  # each load builds the spline matrix once, then reuses it per block
        for _ in range(depth):
            resample_rel_pos_table(table, rows)

    def official(rows: int) -> None:
        for _ in range(depth):
            scipy_resample(table, rows)

    resampling = {}
    for size, rows in ((384, 2212), (512, 3972)):
        times = race({"ours": lambda r=rows: ours(r), "scipy": lambda r=rows: official(r)}, args.repeats, cpu)
        diff = (resample_rel_pos_table(table, rows) - scipy_resample(table, rows)).abs().max().item()
        resampling[f"224_to_{size}_all_{depth}_blocks"] = {
            "seconds": times,
            "scipy_over_ours": times["scipy"] / times["ours"],
            "max_abs_diff": diff,
        }

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        st_path, pth_path = Path(tmp) / "model.safetensors", Path(tmp) / "model.pth"
        write = race(
            {
                "safetensors": lambda: save_file(state, st_path),
                "torch_save": lambda: torch.save(state, pth_path),
            },
            args.repeats,
            cpu,
        )
        read = race(
            {
                "safetensors": lambda: touch(load_file(st_path)),
                "torch_load_weights_only": lambda: touch(torch.load(pth_path, weights_only=True)),
            },
            args.repeats,
            cpu,
        )
        megabytes = st_path.stat().st_size / 2**20
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "preset": args.preset,
                "heads": heads,
                "table_resampling": resampling,
                "checkpoint_mb": round(megabytes, 1),
                "write_s": write,
                "write_torch_over_safetensors": write["torch_save"] / write["safetensors"],
                "read_s": read,
                "read_torch_over_safetensors": read["torch_load_weights_only"] / read["safetensors"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
