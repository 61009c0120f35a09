"""Faults of the machine and of neighbours: refused writes, two processes on one run, a failing judge endpoint.

The one-line messages of each fault through the CLI are cases of tests/test_bad_input.py (with the rerun
that finishes the stage); here are the mechanisms behind them: how a refused write is recognised whatever
library wrote, the run lock (a real second process, a stale lock, the ranks of one job), and the API
judge's retries against a local stub endpoint that injects each fault.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from h3fusion.errors import H3FusionError
from h3fusion.io import write_errno, write_failure

FULL = Path("/dev/full")  # every write to it fails with ENOSPC: a real full disk for one file


# ----------------------------------------------------------------------------- refused writes


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_refused_writes_are_recognised_however_the_writer_reports_them(tmp_path):
    """Real ENOSPC from the kernel through Python and torch.save; safetensors' message as it reads on a
    full tmpfs; and errors that are no refused write stay unrecognised."""
    full = tmp_path / "full"
    full.symlink_to(FULL)
    with pytest.raises(OSError) as python_write:
        full.write_text("x" * 10000)
    with pytest.raises(RuntimeError) as torch_save:  # torch.save keeps no errno
        torch.save({"w": torch.zeros(100_000)}, full)
    assert write_errno(python_write.value) == errno.ENOSPC
    assert write_errno(torch_save.value) == 0
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_errno(rust) == errno.ENOSPC
    for code in (errno.EDQUOT, errno.EROFS, errno.EACCES):
        assert write_errno(OSError(code, os.strerror(code))) == code
    try:  # wrapped by a library: still found through the chain
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as error:
            raise RuntimeError("saving failed") from error
    except RuntimeError as wrapped:
        assert write_errno(wrapped) == errno.EROFS
    for other in (ValueError("x"), RuntimeError("CUDA out of memory"), FileNotFoundError(errno.ENOENT, "gone"),
                  H3FusionError("cannot write x: no space left on device")):
        assert write_errno(other) is None
    line = write_failure(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.json")),
                         tmp_path, "building the MoE", 3 << 20)
    assert line.startswith(f"cannot write {tmp_path / 'a.json'}: no space left on device (")
    assert " free there; building the MoE needs about 3.0 MiB)" in line and "rerun the same command" in line
