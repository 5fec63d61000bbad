"""Our candle network beside the upstream PyTorch reference: same weights, same inputs, one run.

    pip install ".[reference]"                      # torch, loguru, nvidia-ml-py (dev only)
    git clone https://github.com/nv-tlabs/PiD ~/src/PiD
    python benches/compare_reference.py --reference ~/src/PiD --sizes 512,1024

For every output size both sides run the 4-step distilled loop (``--steps 1``: one network
forward) on the real 1.36 B-parameter topology with the same seeded bf16 weights (or
``--checkpoint`` a real ``pid_sdxl_2kto4k.safetensors``), the same inputs and the same
injected noise, each in its own process so that peak memory is per side
(``pid_native.testing.reference``). On the CPU the reference runs as upstream runs it there:
weights upcast to float32, eager, ``torch.no_grad``; with ``--device cuda`` under bfloat16
autocast, ours in bf16. Printed and written (``--json``): seconds, peak memory, our/reference
ratios and the largest absolute difference of the outputs. Nothing here is a test; the
checkout is never imported by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from pid_native import _native
from pid_native.testing import cached_seeded
from pid_native.testing.paths import seeded_cache_dir
from pid_native.testing.reference import SIDES, Comparison, check_checkout

PRESET = "sdxl-2kto4k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of github.com/nv-tlabs/PiD")
    parser.add_argument("--checkpoint", type=Path, help="PiD sdxl checkpoint (default: seeded weights)")
    parser.add_argument("--sizes", default="512,1024", help="output sizes, multiples of 32")
    parser.add_argument("--steps", type=int, default=4, choices=(1, 4), help="4: the sampler; 1: one forward")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured runs before the timed ones")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the median is compared")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    check_checkout(args.reference)
    if args.checkpoint is None:
        layout = _native.checkpoint_layout(_native.preset_config(PRESET))
        args.checkpoint = cached_seeded(seeded_cache_dir(Path(__file__).resolve().parent.parent), layout)
    ladder = _native.t_ladder(4)
    comparison = Comparison(
        reference=args.reference,
        checkpoint=args.checkpoint,
        t_list=ladder if args.steps == 4 else ladder[:1],
        device=args.device,
        compute_dtype="f32" if args.device == "cpu" else "bf16",
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
    )
    results = []
    for row in comparison.rows([int(s) for s in args.sizes.split(",")]):
        size = row["size"]
        for side in SIDES:
            result = row[side]
            if "error" in result:
                print(f"{size}² {side:5s}: FAILED {result['error']}")
            else:
                seconds, memory = statistics.median(result["seconds"]), result["peak_memory_bytes"] / 2**30
                print(f"{size}² {side:5s}: {seconds:8.1f} s, peak memory {memory:.2f} GiB")
        if "time_ratio" in row:
            print(
                f"{size}² ours/reference: time {row['time_ratio']:.2f}x, peak memory "
                f"{row.get('memory_ratio', float('nan')):.2f}x, max |diff| {row['max_abs_diff']:.2e}"
            )
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
