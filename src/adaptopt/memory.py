"""Buffers for buckets, on transparent huge pages where the CPU and the kernel allow it.

A step streams every buffer of a bucket once. With 4 KiB pages that is a TLB miss every 4 KiB of each
stream, and the hardware prefetchers stop at every page boundary; a 2 MiB huge page removes both, which
makes the memory-bound compiled step of large buckets a few percent faster (the figures, measured against
the same buckets on torch's allocator, are in docs/performance.md, section "Buckets").

Linux gives an anonymous mapping huge pages either always or only where `madvise(MADV_HUGEPAGE)` asks for them
(`/sys/kernel/mm/transparent_hugepage/enabled`; many distributions default to the latter). torch's own
allocator asks only when the environment variable `THP_MEM_ALLOC_ENABLE=1` is set before it starts, so
`bucket_buffer` asks for the bucket's buffers itself: a private anonymous mapping, the tensor starting at a
2 MiB boundary, and the advice for the whole huge pages inside it. The tail past the last whole huge page
stays on small pages, so no memory is spent on rounding; the slack before the 2 MiB boundary is address
space that is never touched. Anywhere else (accelerators, small buffers, other systems, huge pages turned
off) it is `torch.empty`; so it is everywhere with `ADAPTOPT_HUGE_PAGES=0` in the environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch

__all__ = ["HUGE_PAGE", "HUGE_PAGE_MIN_BYTES", "as_bucket_buffer", "bucket_buffer", "huge_pages_available"]

HUGE_PAGE = 2 << 20
"""The size of a transparent huge page on x86-64 and on arm64 with 4 KiB base pages."""

HUGE_PAGE_MIN_BYTES = 2 * HUGE_PAGE
"""Smaller buffers are allocated by torch: at least half of one would stay on small pages."""

_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def huge_pages_available() -> bool:
    """Whether an anonymous mapping can be advised onto transparent huge pages here (and is to be)."""
    if os.environ.get("ADAPTOPT_HUGE_PAGES", "1") == "0":
        return False
    if not all(hasattr(mmap, name) for name in ("MADV_HUGEPAGE", "MAP_ANONYMOUS", "MAP_PRIVATE")):
        return False  # Not Linux.
    try:
        setting = _SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def _mapped(nbytes: int, device: torch.device) -> bool:
    """Whether `bucket_buffer` maps a buffer of `nbytes` on `device` itself (else torch allocates it)."""
    return device.type == "cpu" and nbytes > 0 and nbytes >= HUGE_PAGE_MIN_BYTES and huge_pages_available()


def bucket_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized 1-d tensor of `numel` elements, on huge pages where that is possible (see above)."""
    nbytes = numel * dtype.itemsize
    if not _mapped(nbytes, device):
        return torch.empty(numel, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    start = -address % HUGE_PAGE
    if nbytes >= HUGE_PAGE:
        with contextlib.suppress(OSError):  # A kernel built without huge pages: small pages it is.
            mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    # The tensor's storage keeps the mapping alive, and unmaps it when the last view is gone.
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=start)


def as_bucket_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous `tensor` where `bucket_buffer` would have put it: itself where torch's allocator would,
    a copy on huge pages otherwise."""
    if not _mapped(tensor.numel() * tensor.element_size(), tensor.device):
        return tensor
    return bucket_buffer(tensor.numel(), tensor.dtype, tensor.device).view(tensor.shape).copy_(tensor)
