"""A bf16 attention kernel for CPUs with AVX512-BF16 but no AMX, compiled on first use.

PyTorch's CPU flash attention is the largest cost of a bf16 UNet step on such CPUs (38% on a Zen 4 core) and
runs far below the products' rate for SD's head size 40. `attention_bf16.cpp` does the same arithmetic (fp32
scores and softmax sums, bf16 probabilities) about 2.7x faster (docs/performance.md). It is plain C++ with
AVX-512 intrinsics, built with the system's C++ compiler into a per-user cache and called through ctypes, so
it needs no PyTorch headers and no build step at install time. Where it cannot be built or loaded, or the
CPU lacks the instructions, `kernel()` says why and the model keeps PyTorch's kernel.

`LDM_NATIVE_ATTENTION=0` turns it off; `CXX` picks the compiler; `LDM_CACHE_DIR` the cache (default
`~/.cache/ldm`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.speed.cpu import cpu_flags

SOURCE = Path(__file__).with_name("attention_bf16.cpp")
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fPIC", "-shared"]
MAX_HEAD_DIM = 80  # register tiles for up to 5 vectors of 16 per query row
KEY_MULTIPLE = 32  # keys are processed 32 at a time


@dataclass(frozen=True)
class Kernel:
    function: Callable[..., int] | None
    why_not: str = ""  # when `function` is None: one line on why it is unavailable


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm")


def _build(compiler: str) -> Path:
    """The shared library for this source and compiler, compiled once into the cache (atomically)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + compiler.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"attention_bf16-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-pthread", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{compiler} failed: {last}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def kernel() -> Kernel:
    """The compiled kernel, or why there is none. Built at most once per process (and once per cache)."""
    if os.environ.get("LDM_NATIVE_ATTENTION", "1") == "0":
        return Kernel(None, "turned off by LDM_NATIVE_ATTENTION=0")
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} - cpu_flags()
    if missing:
        return Kernel(None, f"this CPU lacks {', '.join(sorted(missing))}")
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        return Kernel(None, f"no C++ compiler ({compiler!r} not found; set CXX)")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return Kernel(None, f"could not build it: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    fn = lib.ldm_attention_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_long)]
    fn.argtypes += [ctypes.c_float, ctypes.c_int]
    return Kernel(fn)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and layouts the kernel handles: bf16 CPU tensors [B, H, N, D] with the last dim contiguous,
    D even and at most 80, a key count that is a multiple of 32, and no autograd."""
    d, n_keys = q.shape[-1], k.shape[-2]
    return (
        q.dim() == k.dim() == v.dim() == 4
        and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 for t in (q, k, v))
        and d % 2 == 0
        and d <= MAX_HEAD_DIM
        and k.shape[-1] == v.shape[-1] == d
        and n_keys % KEY_MULTIPLE == 0
        and n_keys > 0
        and q.shape[2] > 0
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and v.shape[-2] == n_keys
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, as `F.scaled_dot_product_attention(q, k, v)`: a [B, H, Nq, D] view of a
    [B, Nq, H, D] tensor, so the heads' outputs side by side are a free reshape. Call only where `supports`
    holds and `kernel()` has a function."""
    fn = kernel().function
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype).transpose(1, 2)
    strides = (ctypes.c_long * 12)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    rc = fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        b, h, n, k.shape[2], d, strides, d**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise MemoryError("native attention: no memory for its scratch buffers")
    if rc != 0:
        raise ValueError(f"native attention refused shape q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out
