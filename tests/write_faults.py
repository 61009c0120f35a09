"""Run the h3fusion CLI with one write failing as on a full disk: ``python tests/write_faults.py GLOB:N ARGS...``.

The N-th write of a file whose path matches GLOB (fnmatch, on the absolute path) fails the way its writer
fails on a full filesystem, as measured on a full tmpfs: a Python file (JSONL, JSON, YAML) gets half of its
data and ``OSError(ENOSPC)``; safetensors raises its ``SafetensorError`` "... (os error 28)" and leaves no
file; ``torch.save`` (Trainer checkpoints' optimizer state) leaves a cut file and raises its
``RuntimeError`` "unexpected pos". Everything else writes normally. A real full disk cannot be made in a
test without root (mounting a small filesystem), so the fault is injected at the writers' boundary; the
manual check on a real small tmpfs is in docs/errors.md.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import sys

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Fault:
    """Counts the writes of files matching ``pattern`` and says when the ``nth`` one must fail."""

    def __init__(self, spec: str):
        self.pattern, nth = spec.rsplit(":", 1)
        self.nth, self.seen = int(nth), 0

    def now(self, path) -> bool:
        if not isinstance(path, str | os.PathLike) or not fnmatch.fnmatch(os.path.abspath(os.fspath(path)),
                                                                          self.pattern):
            return False
        self.seen += 1
        return self.seen == self.nth


class _FillsUp:
    """A file handle on a disk that fills up during the next write: half of it lands, then ENOSPC."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def install(fault: Fault) -> None:
    import safetensors.numpy
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    real_open, real_torch_save = io.open, torch.save

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FillsUp(handle) if any(m in mode for m in "wax+") and fault.now(file) else handle

    def safetensors_save(real):
        def save_file(tensors, filename, *args, **kwargs):
            if fault.now(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *args, **kwargs)
        return save_file

    def torch_save(obj, f, *args, **kwargs):
        if fault.now(f):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *args, **kwargs)
            with real_open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: buffer.tell() // 2])
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_torch_save(obj, f, *args, **kwargs)

    builtins.open = io.open = open_
    safetensors.torch.save_file = safetensors_save(safetensors.torch.save_file)
    safetensors.numpy.save_file = safetensors_save(safetensors.numpy.save_file)
    torch.save = torch_save


if __name__ == "__main__":
    install(Fault(sys.argv[1]))  # before transformers / peft import save_file by name
    sys.argv = ["h3fusion", *sys.argv[2:]]
    from h3fusion.cli import main

    main()
