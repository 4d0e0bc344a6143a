"""Large CPU tensors on 2 MB pages (Linux transparent huge pages) where the system lets a program ask for them.

Decoding one token streams every weight from memory once: on 4 KB pages about 120,000 page-table walks a token
for GPT-2 124M. Linux backs a region with 2 MB pages when ``/sys/kernel/mm/transparent_hugepage/enabled`` says
``always``, or ``madvise`` and the program advised the region (``madvise(MADV_HUGEPAGE)``) before writing it:
that advice is what this module gives, for the tensors it is handed only (``GPT2.from_pretrained(...,
huge_pages=True)``). Each such page costs the system a fault of its own when first written: about 5 ms in the
VM these figures come from, whose host backs the memory only when it is first touched (not measured on a
machine's own memory; gain and cost in ``benchmarks/RESULTS.md``, round 12). Paging changes, contents never; off
Linux, in mode ``never`` or without ``madvise`` in the C library nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
"""The x86-64 and arm64 (4 KB base pages) huge page size: regions aligned to it get huge pages."""
MADV_HUGEPAGE = 14
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_mode(setting: Path = THP_SETTING) -> str:
    """The system's transparent huge page mode: ``always``, ``madvise`` or ``never`` (the bracketed word of
    ``setting``); ``""`` where there is no such file (not Linux, or a kernel without them)."""
    try:
        text = setting.read_text(encoding="ascii")
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The C library's ``madvise`` (None off Linux or where it cannot be found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def huge_page_span(tensor: Tensor) -> tuple[int, int]:
    """The (start address, length) of the whole 2 MB pages inside ``tensor``'s memory; length 0 when none."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    return first, max(0, last - first)


def empty_on_huge_pages(shape: Sequence[int], dtype: torch.dtype, mode: str | None = None) -> Tensor:
    """An uninitialised contiguous CPU tensor that starts on a 2 MB boundary, its whole 2 MB pages advised onto
    huge pages before anything is written (``mode``: the system's :func:`huge_page_mode` by default).

    The memory is an anonymous mapping of its own (released with the last tensor on it) of which the tensor's
    storage is exactly its own bytes, so saving it writes nothing more. Tensors under 2 MB, or where the system
    gives no huge pages, are a plain ``torch.empty``.
    """
    size = math.prod(shape) * dtype.itemsize
    if size < HUGE_PAGE:  # decided before reading the system's setting: most of a model's tensors are small
        return torch.empty(tuple(shape), dtype=dtype)
    mode = huge_page_mode() if mode is None else mode
    madvise = _madvise()
    if mode not in ("always", "madvise") or (mode == "madvise" and madvise is None):
        return torch.empty(tuple(shape), dtype=dtype)
    try:  # private: an anonymous shared mapping would be shmem, which takes huge pages by another setting
        region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room to align
    except OSError:  # no mapping to be had (a limit on mappings): torch's own allocation, on whatever pages
        return torch.empty(tuple(shape), dtype=dtype)
    address = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    raw = torch.frombuffer(region, dtype=torch.uint8, count=size, offset=-address % HUGE_PAGE)
    if mode == "madvise":  # "always" pages every aligned region without being asked
        start, length = huge_page_span(raw)
        madvise(start, length, MADV_HUGEPAGE)  # a refusal leaves 4 KB pages: nothing else changes
    return raw.view(dtype).view(tuple(shape))
