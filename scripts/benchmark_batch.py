#!/usr/bin/env python
"""Batch throughput: the same prompt rows of the digits demo made in this process and on a local Ray instance with
1 and 2 actors; images/s over the whole run (model loading and Ray start included) and in steady state (from the
first image to the last). The figures in docs/scaling.md come from:

    python scripts/benchmark_batch.py --rows 24 --out outputs/benchmark_batch.json

Each setup writes to its own fresh folder; the images of every setup are checked equal to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]


def setups(cpus: int) -> list[tuple[str, list[str]]]:
    return [
        ("in-process, 1 thread", ["--threads", "1"]),
        (f"in-process, {cpus} threads", ["--threads", str(cpus)]),
        (f"Ray, 1 actor x {cpus} CPUs", ["--ray", "--actors", "1", "--cpus_per_actor", str(cpus)]),
        (f"Ray, {cpus} actors x 1 CPU", ["--ray", "--actors", str(cpus), "--cpus_per_actor", "1"]),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--n_samples", type=int, default=4, help="images per row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs given to Ray (and threads)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    opt = p.parse_args()
    import numpy as np
    import ray
    from PIL import Image

    from ldm.batch.run import parse, run

    work = Path(tempfile.mkdtemp(prefix="ldm-bench-batch-"))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(opt.rows)))
    base = ["--config", str(REPO / "configs/demo/digits.yaml"), "--from-file", str(prompts), "--n_samples",
            str(opt.n_samples), "--ddim_steps", str(opt.steps), "--quiet"]  # fmt: skip
    results = []
    ray_start = 0.0
    for name, extra in setups(opt.cpus):
        if "--ray" in extra and not ray.is_initialized():  # the in-process runs first, without Ray's threads around
            t = time.monotonic()
            ray.init(num_cpus=opt.cpus, include_dashboard=False, log_to_driver=False)
            ray_start = time.monotonic() - t
        outdir = work / name.replace(" ", "_").replace(",", "")
        summary = run(parse([*base, "--outdir", str(outdir), *extra]))
        lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
        first, last = min(x["finished"] for x in lines), max(x["finished"] for x in lines)
        rows_done = len({x["finished"] for x in lines})  # images of a row share one finish time
        steady = (len(lines) - opt.n_samples) / (last - first) if rows_done > 1 and last > first else None
        results.append({"setup": name, **summary, "steady_images_per_second": steady and round(steady, 3)})
        print(json.dumps(results[-1]), flush=True)
    reference = work / setups(opt.cpus)[0][0].replace(" ", "_").replace(",", "")
    for name, _ in setups(opt.cpus)[1:]:
        other = work / name.replace(" ", "_").replace(",", "")
        for png in (reference / "samples").iterdir():
            same = np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(other / "samples" / png.name)))
            results[[r["setup"] for r in results].index(name)].setdefault("equal_to_first", True)
            if not same:
                results[[r["setup"] for r in results].index(name)]["equal_to_first"] = False
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{opt.rows} rows x {opt.n_samples} images, {opt.steps} steps, 32x32; Ray started in {ray_start:.1f} s\n")
    print("| setup | wall s | images/s (whole run) | images/s (steady) | workers | same pixels as first |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setup']} | {r['seconds']:.1f} | {r['images_per_second']:.2f} | {r['steady_images_per_second']} "
              f"| {len(r['workers'])} | {r.get('equal_to_first', '-')} |")  # fmt: skip
    if opt.out:
        opt.out.parent.mkdir(parents=True, exist_ok=True)
        opt.out.write_text(json.dumps({"rows": opt.rows, "n_samples": opt.n_samples, "steps": opt.steps,
                                       "cpus": opt.cpus, "ray_start_seconds": ray_start, "results": results},
                                      indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
