"""How much of the machine the judges use: their thread count and their progress bars."""

from __future__ import annotations

import os

from h3fusion.errors import H3FusionError


def judge_threads() -> int:
    """Threads the judges use: ``H3FUSION_JUDGE_THREADS`` if set, else every core this process may run on
    (a judge fit or a scoring pass runs alone, so leaving a core idle only slows it down)."""
    value = os.environ.get("H3FUSION_JUDGE_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise H3FusionError(f"H3FUSION_JUDGE_THREADS={value!r} is not a number of threads; "
                                "set a positive integer or unset it") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_threads() -> None:
    """Torch and BLAS use ``judge_threads()`` threads (set once, before the judges' first model)."""
    threads = judge_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def progress(total: int, what: str, unit: str = "it"):
    """A tqdm bar (rate and time left) for a judge step; silent with ``H3FUSION_NO_PROGRESS=1`` or tiny work."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False,
                disable=os.environ.get("H3FUSION_NO_PROGRESS") == "1" or total < 64)
