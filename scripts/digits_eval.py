#!/usr/bin/env python
"""Prompt adherence of the digits demo for every sampler, as a table in docs/samplers.md.

    python scripts/digits_eval.py               # rewrites the demo section of docs/samplers.md (~8 min)
    python scripts/digits_eval.py --out -       # prints the section instead

For each sampler: 10 samples of each digit at 20 steps from "a handwritten digit N" prompts, labelled by an
SVM fitted on the real digits (`ldm.data.digit_eval`, the module `tests/test_demo.py` uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.data.digit_eval import adherence, fit_classifier, label_histogram, sample_digits  # noqa: E402
from ldm.generation.generate import SAMPLER_NAMES, SOLVERS  # noqa: E402
from ldm.generation.load import load_config, load_model  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "demo", "digits.yaml")
MARKER = "<!-- digits demo: written by scripts/digits_eval.py -->"


def load_demo():
    """(model, runtime, guidance scale, classifier) of the committed digits demo."""
    config = load_config(CONFIG)
    runtime = resolve_runtime(config)
    model = load_model(config, os.path.join(REPO, config.txt2img.ckpt), runtime, verbose=False)
    return model, runtime, float(config.txt2img.scale), fit_classifier()


def build(per_digit: int, steps: int, seed: int) -> str:
    model, runtime, scale, classifier = load_demo()
    rows = []
    for name in SAMPLER_NAMES:
        schedules = ["discrete", "karras"] if name in SOLVERS else ["discrete"]
        for schedule in schedules:
            t0 = time.time()
            samples = sample_digits(model, runtime, sampler=name, steps=steps, scale=scale, per_digit=per_digit,
                                    seed=seed, schedule=schedule)
            acc = adherence(classifier, samples)
            label = name + (" karras" if schedule == "karras" else "")
            rows.append(f"| {label} | {100 * acc:.0f}% | {time.time() - t0:.1f} |")
            print(rows[-1], file=sys.stderr)
    uncond = sample_digits(model, runtime, sampler="dpmpp_2m", steps=steps, scale=1.0, per_digit=per_digit,
                           seed=seed, unconditional=True)
    hist = label_histogram(classifier, uncond)
    n = 10 * per_digit
    return "\n".join([
        MARKER,
        "## The digits demo: do samples follow the prompt?",
        "",
        f"`configs/demo/digits.yaml` with its committed checkpoint, {n} samples per sampler ({per_digit} of each "
        f"digit, prompts \"a handwritten digit N\"), {steps} steps, guidance scale {scale:g}, seed {seed}; each "
        "sample labelled by an SVM fitted on scikit-learn's real digits (about 99% accurate on them). "
        "Written by `python scripts/digits_eval.py`; `tests/test_demo.py` holds the 90% bar.",
        "",
        f"| sampler | labelled as prompted | seconds ({torch.get_num_threads()} thread(s)) |",
        "|---|---|---|",
        *rows,
        "",
        f"Empty prompt, guidance scale 1 (the unconditional model), dpmpp_2m, {n} samples: labels per digit "
        + ", ".join(f"{d}: {c}" for d, c in hist.items()) + ".",
        "",
    ])


def sweep(per_digit: int, steps: int, seed: int, option: str, values) -> tuple[float, list[tuple]]:
    """(guidance scale, rows): per value of the `sample_digits` keyword `option`, (value, prompt adherence, mean
    change of the pixels in levels of 255 against the first value's samples, seconds)."""
    model, runtime, scale, classifier = load_demo()
    rows, first = [], None
    for value in values:
        t0 = time.time()
        samples = sample_digits(model, runtime, sampler="dpmpp_2m", steps=steps, scale=scale, per_digit=per_digit,
                                seed=seed, **{option: value})
        seconds = time.time() - t0
        first = samples.images if first is None else first
        diff = (samples.images - first).abs().mean().item() / 2 * 255  # images in [-1, 1]: mean levels of 255
        rows.append((value, adherence(classifier, samples), diff, seconds))
        print(rows[-1], file=sys.stderr)
    return scale, rows


def table(title_cells: list[str], lines: list[str], per_digit: int, steps: int, seed: int, scale: float) -> str:
    return "\n".join([
        f"dpmpp_2m, {steps} steps, guidance scale {scale:g}, seed {seed}, {10 * per_digit} samples "
        f"({per_digit} of each digit):",
        "",
        "| " + " | ".join([*title_cells, f"seconds ({torch.get_num_threads()} thread(s))"]) + " |",
        "|" + "---|" * (len(title_cells) + 1),
        *lines,
        "",
    ])


def deepcache_table(per_digit: int, steps: int, seed: int) -> str:
    """Prompt adherence and change of the pixels against full UNet calls, for --deepcache intervals."""
    scale, rows = sweep(per_digit, steps, seed, "reuse_interval", (1, 2, 3, 4, 5))
    lines = [f"| {n} | {-(-steps // n)} of {steps} | {100 * acc:.0f}% | {diff:.1f} | {sec:.1f} |"
             for n, acc, diff, sec in rows]
    head = ["--deepcache", "full UNet calls", "labelled as prompted", "mean change, levels of 255"]
    return table(head, lines, per_digit, steps, seed, scale)


def tome_table(per_digit: int, steps: int, seed: int) -> str:
    """Prompt adherence and change of the pixels against no merging, for --tome ratios."""
    scale, rows = sweep(per_digit, steps, seed, "token_merge", (0.0, 0.3, 0.5, 0.7))
    lines = [f"| {r:g} | {100 * acc:.0f}% | {diff:.1f} | {sec:.1f} |" for r, acc, diff, sec in rows]
    return table(["--tome", "labelled as prompted", "mean change, levels of 255"], lines, per_digit, steps, seed, scale)


def write_section(path: str, section: str) -> None:
    """Replace everything from MARKER on (or append), keeping the rest of the file."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    head = text.split(MARKER)[0].rstrip("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write((head + "\n\n" if head else "") + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "samplers.md"), help="markdown file, or -")
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--deepcache", action="store_true", help="print the --deepcache table instead (to stdout)")
    parser.add_argument("--tome", action="store_true", help="print the --tome table instead (to stdout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.deepcache or args.tome:
        table = deepcache_table if args.deepcache else tome_table
        sys.stdout.write(table(args.per_digit, args.steps, args.seed))
        return 0
    section = build(args.per_digit, args.steps, args.seed)
    if args.out == "-":
        sys.stdout.write(section)
    else:
        write_section(args.out, section)
        print(f"wrote the digits section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
