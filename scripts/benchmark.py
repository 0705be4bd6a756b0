#!/usr/bin/env python
"""Time the full-size SD v1 model, row by row, and optionally the same weights in diffusers beside it.

Rows: one UNet evaluation with classifier-free guidance (batch 2: cond + uncond) per resolution, text
encoding of a prompt pair (batch 2), VAE decode (batch 1) per resolution, and an estimate of a whole image
(text encode + N UNet steps + decode, no sampler overhead). Each row is run once to warm up, then
`--repeats` times; the median is reported. With `--vs diffusers`, diffusers' UNet2DConditionModel and
AutoencoderKL (and transformers' CLIP text model the way a diffusers pipeline loads it) get the same
tensors as ours, in the same process; ours and theirs alternate (ABBA order) so drift on a shared
machine hits both, and the relative error between the two outputs is printed to show the comparison
is apples to apples. Reduced precisions also report their error against float32 on the same inputs.

Weights are random (deterministic, the same values as `scripts/make_fake_ckpt.py --seed S`),
generated straight in the target dtype, or read with `--ckpt`. The markdown table goes to stdout,
progress to stderr.

    python scripts/benchmark.py --sizes 256,512 --precisions fp32,bf16 --vs diffusers --repeats 3
    python scripts/benchmark.py --device cuda --precisions fp16 --sizes 512 --vs diffusers --steps 50
    python scripts/benchmark.py --device cuda --precisions fp16 --sizes 512 --vs diffusers --steps 50 \
        --rows unet --compile max-autotune

`--compile [MODE]` compiles both UNets (ours and diffusers') with torch.compile in the same mode, and on a CPU
with inductor's weight freezing for both, so compiled is compared with compiled (`--compile_side` compiles one
side only: ours eager against diffusers compiled, say); the warm-up call compiles, and its time is reported
beside the table. Text encoder and VAE stay eager on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from ldm.files.fake_checkpoint import model_shapes, random_tensor  # noqa: E402
from ldm.files.mapped_file import trim_heap  # noqa: E402
from ldm.generation.load import OPTIONAL_KEYS, build_model, freeze_compiled_weights, load_config  # noqa: E402
from ldm.speed.feature_reuse import FeatureReuse  # noqa: E402
from ldm.speed.runtime import Runtime, native_attention_pays  # noqa: E402
from ldm.speed.token_merge import merge_tokens  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference-cpu.yaml"
PROMPTS = ["a photograph of an astronaut riding a horse", ""]  # cond + uncond, as guidance encodes them
TIMESTEP = 500
GIB = 1024**3
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SIDES = {"both": "both sides", "ours": "ours only (diffusers eager)", "theirs": "diffusers' only (ours eager)"}

# name -> (weight dtype, autocast dtype or None, compute dtype or None: layers compute in it from their weights)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None, torch.dtype | None]] = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "fp16": (torch.float16, None, None),
    "bf16-autocast": (torch.float32, torch.bfloat16, None),
    "fp16-autocast": (torch.float32, torch.float16, None),
    # 16-bit weights, float32 arithmetic: ours via ldm.speed.weight_cast (what --precision bf16 does on a
    # CPU without bf16 instructions), diffusers via enable_layerwise_casting
    "bf16-weights": (torch.bfloat16, None, torch.float32),
    "fp16-weights": (torch.float16, None, torch.float32),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- weights


def random_state_dict(model_config: Any, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight of the model, drawn in float32 one tensor at a time and cast at once, so a bf16 run never
    holds a float32 copy and gets exactly the float32 run's weights, rounded."""
    shapes = model_shapes(model_config)
    return {k: random_tensor(seed, k, shape).to(dtype) for k, shape in shapes.items() if k not in OPTIONAL_KEYS}


def build_ours(config: Any, args: argparse.Namespace, runtime: Runtime) -> nn.Module:
    if args.ckpt:
        from ldm.files.checkpoints import read_state_dict

        sd, _ = read_state_dict(args.ckpt)  # memory-mapped; build_model casts straight to the weight dtype
    else:
        sd = random_state_dict(config["model"], args.seed, runtime.weight_dtype)
    model, _ = build_model(config["model"], sd, runtime)
    return model


# ----------------------------------------------------------------------------- diffusers, same tensors


@dataclass
class Theirs:
    unet: nn.Module
    vae: nn.Module
    text: nn.Module
    attn_note: str


def parity_module() -> ModuleType:
    """The key mapping and SD v1 configs for diffusers live in tests/test_parity_diffusers.py, where they are
    checked against diffusers' own converter and by sabotage tests; reuse them rather than keep a copy."""
    try:
        return importlib.import_module("tests.test_parity_diffusers")
    except ImportError as e:
        raise SystemExit(
            f"--vs diffusers needs diffusers and pytest (pip install -r requirements-test.txt) and this "
            f"checkout's tests/test_parity_diffusers.py: {e}"
        ) from None


def _assign(module_factory: Callable[[], nn.Module], sd: dict[str, torch.Tensor]) -> nn.Module:
    """Build on the meta device (no random init, no memory), then take the given tensors as they are:
    diffusers shares storage with ours, so the comparison costs no second copy of the weights."""
    with torch.device("meta"):
        module = module_factory()
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: {len(left)} tensors not set by the state dict, e.g. {left[0]}")
    return module.eval().requires_grad_(False)


def build_theirs(ours: nn.Module, config: Any) -> Theirs:
    par = parity_module()
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_params = dict(config["model"]["params"]["unet_config"]["params"])
    cfg = {k: unet_params[k] for k in ("model_channels", "num_res_blocks", "transformer_depth")}
    cfg["channel_mult"] = tuple(unet_params["channel_mult"])
    cfg["attention_resolutions"] = tuple(unet_params["attention_resolutions"])
    cfg["num_heads"] = unet_params["num_heads"]
    unet_config = {
        **par.diffusers_unet_config(cfg),
        "cross_attention_dim": unet_params["context_dim"],
        "sample_size": config["model"]["params"]["image_size"],
    }
    unet_sd = par.unet_to_diffusers(ours.model.diffusion_model, cfg)
    unet = _assign(lambda: UNet2DConditionModel(**unet_config), unet_sd)

    fs = config["model"]["params"]["first_stage_config"]["params"]
    dd = dict(fs["ddconfig"])
    dd["ch_mult"] = tuple(dd["ch_mult"])
    dd["attn_resolutions"] = tuple(dd["attn_resolutions"])
    if fs["embed_dim"] != dd["z_channels"]:
        raise SystemExit("diffusers' AutoencoderKL has one latent width: embed_dim must equal z_channels")
    vae_config = {**par.diffusers_vae_config(dd), "sample_size": 8 * config["model"]["params"]["image_size"]}
    vae_sd = par.convert(ours.first_stage_model.state_dict(), par.vae_block_map(dd), par.VAE_RENAMES)
    vae = _assign(lambda: DiffusersAutoencoderKL(**vae_config), vae_sd)

    # A diffusers pipeline loads transformers' CLIPTextModel with transformers' default attention (SDPA where
    # available); ours is plain PyTorch with the eager arithmetic. Same weights, built on the CPU (small).
    ours_text = ours.cond_stage_model.transformer.text_model
    with torch.device(ours_text.embeddings.token_embedding.weight.device):
        text = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(ours_text.config)))
    text.load_state_dict(ours_text.state_dict(), strict=True, assign=True)
    text.eval().requires_grad_(False)
    return Theirs(unet, vae, text, f"text encoder attention: ours eager, theirs {text.config._attn_implementation}")


# ----------------------------------------------------------------------------- timing and memory


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak memory, per call and per phase. On the CPU: the process's resident set (VmHWM), whose high-water mark
    Linux lets a process reset (`echo 5 > /proc/self/clear_refs`), so each call's own peak is seen; where that is
    refused, the peak only grows and is reported as such. On CUDA: torch's allocator peak. Open phases (`push`)
    keep the highest peak seen across the per-call resets inside them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.lifetime = 0.0
        self.marks: list[float] = []
        self.resettable = self.cuda or self._clear_refs()

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + 1024

    def _fold(self) -> None:
        p = self.peak()
        self.lifetime = max(self.lifetime, p)
        self.marks = [max(m, p) for m in self.marks]

    def reset(self) -> None:
        self._fold()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._clear_refs()

    def push(self) -> None:
        self.reset()
        self.marks.append(self.now())

    def pop(self) -> float:
        """The peak since the matching `push`."""
        self._fold()
        return self.marks.pop()

    def now(self) -> float:
        """Bytes in use: CUDA allocations, or the resident set."""
        if self.cuda:
            return float(torch.cuda.memory_allocated())
        return 1024.0 * (_proc_status_kib("VmRSS") or 0)

    def peak(self) -> float:
        """Bytes at the high-water mark since the last reset (since the start where no reset is possible)."""
        if self.cuda:
            return float(torch.cuda.max_memory_allocated())
        hwm = _proc_status_kib("VmHWM")
        if hwm is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS), the lifetime peak
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return float(r if sys.platform == "darwin" else 1024 * r)
        return 1024.0 * hwm

    def process_peak(self) -> float:
        self._fold()
        return self.lifetime


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of one call: CUDA events around it on a GPU (after draining queued work), wall clock on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, y
    t0 = time.perf_counter()
    y = fn()
    return time.perf_counter() - t0, y


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps many freed mid-sized tensors otherwise), so the resident
    set after one precision does not count into the next one's figures."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    extra_bytes: float = 0.0  # peak during a call minus what was in use just before it, max over calls
    warmup: float | None = None  # seconds of the untimed first call (with --compile: compiling included)
    output: torch.Tensor | None = None
    error: str | None = None  # the call raised: this model cannot run this row (reported, not fatal)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def measure(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device, memory: Memory
) -> dict[str, Measured]:
    """One warm-up each, then `repeats` rounds in ABBA order, so slow drift (another process, heat) is shared."""
    out = {name: Measured() for name in fns}
    names = list(fns)

    def once(name: str, keep: bool) -> None:
        if out[name].error:
            return
        gc.collect()
        memory.reset()
        before = memory.now()
        try:
            seconds, y = timed(fns[name], device)
        except Exception as e:  # one side unable to run a row is a result to report, not the end of the run
            lines = str(e).strip().splitlines()
            out[name].error = f"{type(e).__name__}: {lines[0] if lines else ''}"
            log(f"[benchmark]   {name} failed: {out[name].error}")
            return
        out[name].extra_bytes = max(out[name].extra_bytes, memory.peak() - before)
        out[name].output = y.detach().float().cpu()
        if keep:
            out[name].seconds.append(seconds)
        else:
            out[name].warmup = seconds
        del y

    for name in names:
        once(name, keep=False)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            once(name, keep=True)
    return out


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    precision: str
    what: str
    ours: Measured
    theirs: Measured | None = None
    err_vs_fp32: tuple[float | None, float | None] = (None, None)
    note: str = ""


@dataclass
class Phase:
    what: str
    seconds: float
    in_use: float
    peak: float


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if any(s <= 0 or s % 8 for s in size):
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be positive multiples of 8")
    return size


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@contextlib.contextmanager
def phase(phases: list[Phase], what: str, memory: Memory) -> Iterator[None]:
    log(f"[benchmark] {what} ...")
    gc.collect()
    memory.push()
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    gc.collect()
    peak = memory.pop()
    phases.append(Phase(what, seconds, memory.now(), peak))


@dataclass
class Context:
    """What every row of one run needs, besides the models."""

    args: argparse.Namespace
    config: Any
    device: torch.device
    memory: Memory
    phases: list[Phase]
    # row key -> (ours, theirs) float32 outputs, for the reduced precisions' error
    fp32_outputs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)


def run_precision(precision: str, c: Context) -> list[Row]:
    """Build ours (and theirs on the same tensors), time every row, then free both before the next precision."""
    weight_dtype, _, compute = PRECISIONS[precision]
    source = f"--ckpt {c.args.ckpt}" if c.args.ckpt else f"random weights, seed {c.args.seed}"
    compiled = c.args.compile is not None and c.args.compile_side in ("both", "ours")
    runtime = Runtime(
        device=c.device,
        weight_dtype=weight_dtype,
        compute_dtype=compute,
        channels_last=c.args.channels_last,
        compile=compiled,
        compile_mode=c.args.compile,
        # as resolve_runtime decides it for txt2img
        native_attention=native_attention_pays(c.device, weight_dtype, compute, compiled)
        and not c.args.no_native_attention,
    )
    if c.args.channels_last:
        source += ", channels last"
    if runtime.native_attention:
        source += ", ldm.speed.native attention"
    if runtime.compile:
        source += f", UNet compiled ({c.args.compile})"
    with phase(c.phases, f"{precision}: build ours ({source})", c.memory):
        ours = build_ours(c.config, c.args, runtime)
    theirs = None
    if c.args.vs == "diffusers":
        with phase(c.phases, f"{precision}: build diffusers (same tensors, shared)", c.memory):
            theirs = build_theirs(ours, c.config)
            if compute is not None:
                for module in (theirs.unet, theirs.vae):
                    module.enable_layerwise_casting(storage_dtype=weight_dtype, compute_dtype=compute)
                theirs.text = None  # transformers' CLIPTextModel has no layerwise casting
            if c.args.channels_last:  # diffusers' documented speed-up, the same layout as ours
                for module in (theirs.unet, theirs.vae):
                    module.to(memory_format=torch.channels_last)
            if c.args.compile and c.args.compile_side in ("both", "theirs"):  # the same mode as ours
                theirs.unet.compile(mode=c.args.compile)
    rows = time_rows(precision, ours, theirs, c)
    del ours, theirs
    with phase(c.phases, f"{precision}: models freed", c.memory):
        release_freed_memory()
    return rows


def time_rows(precision: str, ours: nn.Module, theirs: Theirs | None, c: Context) -> list[Row]:
    weight_dtype, autocast_dtype, compute = PRECISIONS[precision]
    input_dtype = compute or weight_dtype
    device, args = c.device, c.args

    def call(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                return fn()

        return run

    rows: list[Row] = []

    def add(
        what: str,
        key: str,
        ours_fn: Callable[[], torch.Tensor],
        theirs_fn: Callable[[], torch.Tensor] | None,
        note: str = "",
    ) -> None:
        fns = {"ours": call(ours_fn)}
        if theirs_fn is not None:
            fns["theirs"] = call(theirs_fn)
        with phase(c.phases, f"{precision}: {what}", c.memory):
            m = measure(fns, args.repeats, device, c.memory)
        row = Row(precision, what, m["ours"], m.get("theirs"), note=note)
        if precision == "fp32":
            c.fp32_outputs[key] = (row.ours.output, row.theirs.output if row.theirs else None)
        elif key in c.fp32_outputs:
            ref_ours, ref_theirs = c.fp32_outputs[key]
            row.err_vs_fp32 = (
                rel_err(row.ours.output, ref_ours),
                rel_err(row.theirs.output, ref_theirs) if row.theirs else None,
            )
        rows.append(row)
        log(
            f"[benchmark]   ours {seconds_cell(row.ours)} s"
            + (f", diffusers {seconds_cell(row.theirs)} s" if theirs else "")
        )

    # Inputs are float32 draws from one seeded generator, then cast: every precision sees the same values.
    g = torch.Generator().manual_seed(args.seed + 1)
    params = c.config["model"]["params"]
    context_dim, channels = params["unet_config"]["params"]["context_dim"], params["channels"]

    def unet_inputs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, timesteps, context) of one guided call, the next draws from `g`; the same latents for
        cond and uncond."""
        x1 = torch.randn(1, channels, h, w, generator=g)
        x = torch.cat([x1, x1]).to(device=device, dtype=input_dtype)
        ctx = torch.randn(2, 77, context_dim, generator=g).to(device=device, dtype=input_dtype)
        return x, torch.full((2,), TIMESTEP, dtype=torch.int64, device=device), ctx
    if "text" in args.rows:
        tokens = ours.cond_stage_model.tokenize(PROMPTS).to(device)
        add(
            "text encode (batch 2)",
            "text",
            lambda: ours.get_learned_conditioning(PROMPTS),
            (lambda: theirs.text(input_ids=tokens).last_hidden_state) if theirs and theirs.text else None,
            note=f"{theirs.attn_note}; ours includes tokenizing" if theirs and theirs.text else "",
        )
    for size in args.sizes:
        h, w = size[0] // 8, size[1] // 8
        if "unet" in args.rows:
            x, t, ctx = unet_inputs(h, w)
            add(
                f"UNet {size_name(size)}, guidance (batch 2)",
                f"unet{size}",
                lambda x=x, t=t, ctx=ctx: ours.apply_model(x, t, ctx),
                (lambda x=x, t=t, ctx=ctx: theirs.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0])
                if theirs
                else None,
            )
        if "reuse" in args.rows:
            x, t, ctx = unet_inputs(h, w)
            unet = ours.model.diffusion_model
            # The row's warm-up call runs in full and keeps the deep feature; every timed call is then shallow.
            unet.feature_reuse = FeatureReuse(interval=2**62)
            add(
                f"UNet {size_name(size)}, shallow call of --deepcache (batch 2)",
                f"reuse{size}",
                lambda x=x, t=t, ctx=ctx: ours.apply_model(x, t, ctx),
                None,
                note="ours only: the outer blocks on the deep feature kept from a full call",
            )
            unet.feature_reuse = None
        if "tome" in args.rows:
            x, t, ctx = unet_inputs(h, w)
            with merge_tokens(ours, args.tome):
                add(
                    f"UNet {size_name(size)}, guidance, --tome {args.tome:g} (batch 2)",
                    f"tome{size}",
                    lambda x=x, t=t, ctx=ctx: ours.apply_model(x, t, ctx),
                    None,
                    note="ours only: token merging before the full-resolution self-attentions",
                )
        if "vae" in args.rows:
            # Latents as a sampler hands them over (unit scale), divided by the scale factor as decoding does.
            z = (torch.randn(1, channels, h, w, generator=g) / params["scale_factor"]).to(device, input_dtype)
            add(
                f"VAE decode {size_name(size)} (batch 1)",
                f"vae{size}",
                lambda z=z: ours.first_stage_model.decode(z),
                (lambda z=z: theirs.vae.decode(z, return_dict=False)[0]) if theirs else None,
            )
    return rows


# ----------------------------------------------------------------------------- report


def machine(device: torch.device, threads: int) -> list[str]:
    cpu, flags = "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    cpu = cpu or platform.processor() or platform.machine()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]
    mem = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        mem = f", {int(f.readline().split()[1]) / 1024**2:.1f} GiB RAM"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- CPU: {cpu}, {cores} cores available{mem}; flags: {' '.join(isa) or 'none of the AVX ones'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- torch {torch.__version__}, {threads} intra-op threads, python {platform.python_version()}",
    ]
    with contextlib.suppress(ImportError):
        import diffusers
        import transformers

        lines[-1] += f", diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return lines


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def seconds_cell(m: Measured | None, spread: bool = False) -> str:
    """The median; with `spread`, the fastest and slowest repeat too, to show how much the machine wobbled."""
    if m is not None and m.error:
        return "failed"
    if m is None or not m.seconds:
        return "-"
    if spread and len(m.seconds) > 1:
        return f"{m.median:.3f} ({min(m.seconds):.2f}-{max(m.seconds):.2f})"
    return f"{m.median:.3f}"


def report(
    rows: list[Row], phases: list[Phase], args: argparse.Namespace, device: torch.device, memory: Memory, command: str
) -> str:
    vs = args.vs == "diffusers"
    gib = "GPU allocations" if device.type == "cuda" else "resident set"
    out = [
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"Command: `{command}`",
        *machine(device, torch.get_num_threads()),
        "",
        f"Seconds: median of {args.repeats} after 1 warm-up"
        + (", ours and diffusers alternating (ABBA)" if vs else "")
        + (
            f"; UNet compiled with torch.compile, mode {args.compile}"
            + (" (inductor freezing on)" if device.type == "cpu" else "")
            + (f", {COMPILE_SIDES[args.compile_side]}" if vs else "")
            if args.compile
            else ""
        )
        + (" (CUDA events)" if device.type == "cuda" else " (wall clock)")
        + f". Memory: the most the {gib} grew during one call, over what was in use before it "
        + (
            "(activations and workspace; weights excluded)."
            if memory.resettable
            else "(process peak only grows here: "
            "no per-call reset possible, so figures after the first are lower bounds)."
        ),
        "",
    ]
    head = ["precision", "row", "ours s (min-max)"]
    if vs:
        head += ["diffusers s (min-max)", "ours/diffusers", "rel err ours vs diffusers"]
    head += [
        "rel err vs fp32 (ours" + (" / diffusers)" if vs else ")"),
        "call peak +GiB (ours" + (" / diffusers)" if vs else ")"),
    ]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = sorted({f"{r.what}: {r.note}" for r in rows if r.note})
    if args.compile:
        for r in rows:
            if r.what.startswith("UNet "):
                first = [f"{who} {m.warmup:.1f} s" for who, m in (("ours", r.ours), ("diffusers", r.theirs))
                         if m is not None and m.warmup is not None]  # fmt: skip
                notes.append(f"{r.precision} {r.what}: first call, compiling included: {', '.join(first)}")
    for r in rows:
        for who, m in (("ours", r.ours), ("diffusers", r.theirs)):
            if m is not None and m.error:
                notes.append(f"{r.precision} {r.what}: {who} failed: {m.error}")
        cells = [r.precision, r.what, seconds_cell(r.ours, spread=True)]
        if vs:
            t = r.theirs
            ratio = r.ours.median / t.median if t and t.median and r.ours.median else None
            cells += [
                seconds_cell(t, spread=True),
                fmt(ratio, ".2f"),
                fmt(rel_err(r.ours.output, t.output) if t else None, ".1e"),
            ]
        err = fmt(r.err_vs_fp32[0], ".1e") + (" / " + fmt(r.err_vs_fp32[1], ".1e") if vs else "")
        mem = fmt(r.ours.extra_bytes / GIB, ".2f") + (
            " / " + fmt(r.theirs.extra_bytes / GIB if r.theirs else None, ".2f") if vs else ""
        )
        out.append("| " + " | ".join([*cells, err, mem]) + " |")
    # A whole image, estimated from the rows (no sampler arithmetic, no PNG writing).
    for precision in dict.fromkeys(r.precision for r in rows):
        by = {r.what: r for r in rows if r.precision == precision}
        text = by.get("text encode (batch 2)")
        for size in args.sizes:
            unet = by.get(f"UNet {size_name(size)}, guidance (batch 2)")
            vae = by.get(f"VAE decode {size_name(size)} (batch 1)")
            if not (text and unet and vae) or None in (text.ours.median, unet.ours.median, vae.ours.median):
                continue
            ours_s = text.ours.median + args.steps * unet.ours.median + vae.ours.median
            cells = [
                precision,
                f"whole image {size_name(size)}, {args.steps} steps (sum of the rows above)",
                f"{ours_s:.1f}",
            ]
            if vs:
                if (
                    text.theirs
                    and unet.theirs
                    and vae.theirs
                    and None not in (text.theirs.median, unet.theirs.median, vae.theirs.median)
                ):
                    th = text.theirs.median + args.steps * unet.theirs.median + vae.theirs.median
                    cells += [f"{th:.1f}", f"{ours_s / th:.2f}", "-"]
                else:
                    cells += ["-", "-", "-"]
            out.append("| " + " | ".join([*cells, "-", "-"]) + " |")
    if notes:
        out += ["", *[f"Note, {n}." for n in notes]]
    out += [
        "",
        f"Phases in order ({gib}; 'peak' is the high-water mark during that phase"
        + ("" if memory.resettable else ", cumulative since the process started")
        + "):",
        "",
        "| phase | s | in use after, GiB | peak, GiB |",
        "|---|---|---|---|",
        *[f"| {p.what} | {p.seconds:.1f} | {p.in_use / GIB:.2f} | {p.peak / GIB:.2f} |" for p in phases],
        "",
        f"Process peak ({gib}) over the whole run: {memory.process_peak() / GIB:.2f} GiB",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config (default: the SD v1 CPU config)")
    p.add_argument("--ckpt", help="load this checkpoint instead of random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--sizes", default="256,512", help="image sizes, N or HxW, comma-separated (default 256,512)")
    p.add_argument("--precisions", default="fp32,bf16", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument(
        "--autocast",
        action="store_true",
        help="also run each reduced precision as float32 weights under torch.autocast to it",
    )
    p.add_argument(
        "--rows",
        default="text,unet,vae",
        help="which rows: text, unet, vae, reuse (a --deepcache shallow UNet call), tome (a UNet call with "
        "--tome) (default text,unet,vae)",
    )
    p.add_argument("--tome", type=float, default=0.5, help="token merging ratio of the tome row (default 0.5)")
    p.add_argument("--vs", choices=("none", "diffusers"), default="none", help="compare with diffusers in-process")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per row after one warm-up (default 3)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: every core this process may use)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--channels_last", action="store_true", help="NHWC convolution weights, ours and diffusers' alike"
    )
    p.add_argument(
        "--no_native_attention",
        action="store_true",
        help="keep PyTorch's attention kernel in our bf16 UNet where ldm.speed.native's would be used (for an A/B run)",
    )
    p.add_argument("--steps", type=int, default=20, help="UNet steps in the whole-image estimate (default 20)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the UNet, ours and diffusers' alike, in this mode (default: torch's default mode); "
        "reduce-overhead and max-autotune add CUDA graphs on a GPU",
    )
    p.add_argument(
        "--compile_side",
        choices=tuple(COMPILE_SIDES),
        default="both",
        help="with --compile: whose UNet to compile (default both)",
    )
    args = p.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(f"--sizes {args.sizes!r}: expected sizes like 256,512 or 512x768 ({e})")
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if args.autocast:
        precisions += [f"{q}-autocast" for q in precisions if q in ("bf16", "fp16")]
    bad = [q for q in precisions if q not in PRECISIONS]
    if bad or not precisions:
        p.error(f"--precisions: unknown {bad or 'none given'}; choose from {', '.join(PRECISIONS)}")
    if "fp32" in precisions:  # first, so the others can be compared with its outputs
        precisions.remove("fp32")
        precisions.insert(0, "fp32")
    args.precisions = list(dict.fromkeys(precisions))
    args.rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    if not args.rows or args.rows - {"text", "unet", "vae", "reuse", "tome"}:
        p.error("--rows: choose from text, unet, vae, reuse, tome")
    if args.compile_side == "theirs" and args.vs != "diffusers":
        p.error("--compile_side theirs compiles diffusers' UNet: add --vs diffusers")
    if args.compile and args.rows & {"reuse", "tome"}:
        p.error("--compile: the reuse and tome rows change the UNet between calls; leave them out")
    if not 0.0 <= args.tome < 1.0:
        p.error(f"--tome must be in [0, 1), got {args.tome}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: use cpu or cuda[:N]")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    if device.type == "cpu" and any(q.startswith("fp16") for q in args.precisions):
        log("[benchmark] note: float16 on a CPU is mostly emulated; expect it to be slow")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if args.compile and device.type == "cpu":
        freeze_compiled_weights()  # for whichever side compiles, ours through compile_unet or diffusers'
    config = load_config(args.config)
    c = Context(args, config, device, Memory(device), [])
    rows: list[Row] = []
    for precision in args.precisions:
        rows += run_precision(precision, c)
    print(report(rows, c.phases, args, device, c.memory, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
