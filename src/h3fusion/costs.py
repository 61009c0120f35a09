"""What a system costs: parameters (total, active per token) and peak memory while it runs.

Shared by the report's cost columns (recorded per system by ``generate``) and the benchmark.
On CPU, peak memory is the peak RSS above the level at entry: the kernel's own peak mark (VmHWM, reset
at entry through /proc/self/clear_refs), which sees an allocation however briefly it lived, and where
that is unavailable (some sandboxes refuse the reset or keep the mark still: a probe checks once) the
maximum a sampling thread saw; on CUDA it is the torch allocator's peak above
the allocation at entry.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import os
import threading

import torch

_LIBC = None


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The kernel's peak-RSS mark of this process (VmHWM), 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_block(size: int) -> mmap.mmap:
    """A fresh anonymous mapping of ``size`` bytes, every page touched (resident); ``close()`` unmaps it.

    Fresh pages whatever the allocator holds: a freed heap block reused would not raise RSS.
    """
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


@functools.cache
def kernel_peak_mark_works() -> bool:
    """Whether the kernel's peak-RSS mark can be reset here and then rises with a short-lived allocation.

    Checked once on an 8 MiB ``resident_block``, unmapped at once: the mark must rise by it, and a second
    reset must bring the mark back down. Where either fails, ``PeakMemory`` samples.
    """
    size = 8 << 20
    if not _reset_peak_rss():
        return False
    base = rss_bytes()
    resident_block(size).close()
    rises = _peak_rss_bytes() >= base + 0.9 * size
    resets = _reset_peak_rss() and _peak_rss_bytes() < base + size / 2
    return rises and resets


def release_freed_memory_to_os() -> None:
    """Serve >= 64 KiB allocations by mmap (glibc) so freed tensors leave RSS; for memory measurements."""
    global _LIBC
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
        _LIBC.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except OSError:
        _LIBC = None


class PeakMemory:
    """Context manager: ``peak`` and ``end`` bytes above the level at entry.

    ``exact`` says whether the peak comes from a mark that sees every allocation (the CUDA allocator's, the
    kernel's) or only from the sampling thread, which misses one shorter than its interval or one made while
    the thread could not take the GIL.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device, self.interval = device, interval
        self.start = self.peak = self.end = 0
        self.exact = device == "cuda"

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        # The sampler stays beside the kernel's mark: a nested PeakMemory resets the mark, and a
        # sample between the two entries keeps what the outer one had seen.
        self.exact = kernel_peak_mark_works() and _reset_peak_rss()
        self.start = self._max = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, rss_bytes())

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            self.end = torch.cuda.memory_allocated() - self.start
            return
        self._stop.set()
        self._thread.join()
        now = rss_bytes()
        kernel_peak = _peak_rss_bytes() if self.exact else 0
        self.peak = max(self._max, kernel_peak, now) - self.start
        self.end = now - self.start


def unique_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Named parameters, each tensor once (tied embeddings count once)."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = (p.data_ptr(), p.shape, p.dtype) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            out.append((name, p))
    return out


def param_counts(model: torch.nn.Module, kind: str, n: int = 3, k: int = 2) -> dict:
    """Total parameters, parameters active per generated token, weight bytes.

    ``kind``: base (every weight runs), compact (h3fusion's low-rank experts: ``delta_A``/``delta_B``),
    dense / mixtral (full expert copies under ``.experts.``); a token runs k of the n experts, the
    embedding counts (as for Mixtral).
    """
    params = unique_params(model)
    total = sum(p.numel() for _, p in params)
    if kind == "base":
        expert = 0
    elif kind == "compact":
        expert = sum(p.numel() for name, p in params if ".delta_A." in name or ".delta_B." in name)
    else:
        expert = sum(p.numel() for name, p in params if ".experts." in name)
    inactive = expert * (n - k) // n
    weight_bytes = sum(p.numel() * p.element_size() for _, p in params)
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"total": total, "active_per_token": total - inactive, "weight_bytes": weight_bytes}


def system_param_counts(model: torch.nn.Module) -> dict:
    """param_counts for whatever ``systems.load_system`` returned."""
    adapters = getattr(model, "ensemble_adapters", None)
    if adapters:  # base + every adapter resident; each token runs the base once per expert, with its adapter
        counts = param_counts(model, "base")
        lora = sum(p.numel() for name, p in unique_params(model) if "lora_" in name)
        per_forward = counts["total"] - lora + lora // len(adapters)
        return {**counts, "active_per_token": per_forward * len(adapters)}
    if hasattr(model, "moe_layers"):
        return param_counts(model, model.config.storage, n=model.config.num_experts,
                            k=model.config.num_experts_per_tok)
    return param_counts(model, "base")
