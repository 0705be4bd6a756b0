"""Give back the pages of a memory-mapped checkpoint once their tensors have been copied.

A checkpoint read with mmap costs no memory until it is touched; converting it (fp32 file to 16-bit
weights, or copying unaligned safetensors views) touches every page, so the process would briefly hold
the file and the converted copy at once. Dropping each tensor's pages right after its copy keeps the
peak near the converted model alone. Only ranges that /proc/self/maps shows mapped from the checkpoint
file are ever released: those pages are the file's, and a later read simply faults them in again, so
nothing can be lost; anything else (a tensor in ordinary memory) is left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

_MADV_DONTNEED = 4


class MappedFile:
    """The address ranges of this process mapped from `path` (empty where /proc is not available)."""

    def __init__(self, path: str | os.PathLike):
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        try:
            st = os.stat(path)
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return
        self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] != str(st.st_ino):
                continue
            try:
                same = os.path.samefile(fields[5], path)
            except OSError:
                same = False
            if same:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                self.ranges.append((start, end))

    def release(self, t: torch.Tensor) -> int:
        """Drop the whole pages under `t` if they are mapped from the file; returns the bytes released."""
        if not self.ranges or t.device.type != "cpu" or t.is_mkldnn or not t.is_contiguous():
            return 0
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        page = mmap.PAGESIZE
        a, b = -(-start // page) * page, end // page * page
        if b <= a or not any(lo <= a and b <= hi for lo, hi in self.ranges):
            return 0
        if self._madvise(a, b - a, _MADV_DONTNEED) != 0:
            return 0
        return b - a


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Mid-sized tensors (up to 32 MB) live in the heap once glibc has raised its mmap threshold, which it does
    after the first large free; freeing a whole model part then leaves its pages resident, counted against the
    process, until something reuses them. Trimming makes `--low_memory`'s frees show in the resident set.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
