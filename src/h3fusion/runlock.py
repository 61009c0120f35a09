"""One process per run directory: ``<run>/.h3fusion.lock``, taken by every verb that writes into a run.

The lock is a file created with ``O_EXCL`` that says who holds it: pid, host, verb and since when. A
second process gets one line naming that holder and exits 2. A lock whose process is gone is stale and
the next call takes it over, so a killed run resumes with the same command: on the holder's own host,
when its pid no longer runs, is a zombie, is now another process (its start time differs) or the host has
rebooted since. A lock held from another host cannot be checked from here and is always respected.

Under ``accelerate launch`` (or ``torchrun``) every process of one job runs the same verb: only global rank
0 takes the lock (``RANK``, else ``LOCAL_RANK``), the other ranks run under it. They are one job, and
rank 0 alone writes the run's files; if rank 0 is refused, the launcher stops the others with it.

Checking a stale lock and replacing it happen under a short ``flock`` of the run directory, so two
processes that find the same stale lock cannot both take it over (where ``flock`` is unsupported the
window is a few microseconds).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from h3fusion.errors import H3FusionError
from h3fusion.runs import LOCK_NAME


def process_rank() -> int:
    """This process's global rank under a distributed launcher (0 when there is none)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a pid from /proc; None if /proc has no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _running(holder: dict[str, Any]) -> bool:
    """Whether the process a lock on this host names still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return False  # the host rebooted since
    if Path("/proc/self/stat").is_file():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or killed and not yet reaped
            return False
        return holder.get("started") in (None, stat[1])  # another start time: the pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _exclusive(directory: Path, patience: float = 5.0) -> Iterator[bool]:
    """A short exclusive ``flock`` of ``directory`` around reading, replacing or removing the lock. Yields
    False where the platform or filesystem has none, or when a holder stopped inside it (Ctrl-Z) keeps it
    past ``patience`` seconds: its users hold it for microseconds."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        deadline, locked = time.monotonic() + patience, False
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:  # a filesystem without flock
                break
        yield locked
    finally:
        os.close(fd)  # closing drops the flock


class RunLock:
    """The lock of one run directory, held by this process between ``acquire`` and ``release``."""

    def __init__(self, run_dir: str | Path, verb: str, log: Callable[[str], Any] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.log = log
        self.held = False
        self.info = {
            "pid": os.getpid(), "host": socket.gethostname(), "verb": verb,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started": (_proc_stat(os.getpid()) or (None, None))[1],
            "boot": _boot_id(), "token": uuid.uuid4().hex,
        }

    def acquire(self) -> RunLock:
        if process_rank() != 0:  # a non-zero rank of a launched job: rank 0 holds the lock for all of them
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.run_dir) as guarded:
            while not self._create():
                holder = self._read()
                if holder is None and not guarded:
                    raise H3FusionError(f"{self.run_dir} is in use by another h3fusion process ({self.path} is "
                                        f"unreadable); if none is running, delete {self.path}")
                if holder is not None and (holder.get("host") != self.info["host"] or _running(holder)):
                    raise H3FusionError(self._refusal(holder))
                # stale: its process is gone (or, under the guard, it died while writing the lock)
                with suppress(FileNotFoundError):
                    self.path.unlink()
                if holder is not None:
                    self.log(f"[lock] {self.run_dir}: took over the lock of pid {holder.get('pid')} "
                             f"(h3fusion {holder.get('verb')} since {holder.get('since')}), which no longer runs")
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _exclusive(self.run_dir), suppress(OSError):
            holder = self._read()
            if holder is not None and holder.get("token") == self.info["token"]:  # never another's lock
                self.path.unlink()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.info, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as error:
            with suppress(OSError):
                self.path.unlink()
            if isinstance(error, OSError) and error.filename is None:
                error.filename = str(self.path)  # a full disk names the lock it could not write
            raise
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refusal(self, holder: dict[str, Any]) -> str:
        here = holder.get("host") == self.info["host"]
        return (f"{self.run_dir} is in use by another h3fusion process: pid {holder.get('pid')} on "
                f"{holder.get('host')}{'' if here else ' (another host: not checked from here)'}, running "
                f"`h3fusion {holder.get('verb')}` since {holder.get('since')}; wait for it to finish or stop it "
                f"(if it no longer runs, delete {self.path})")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run_dir: str | Path, verb: str, log: Callable[[str], Any] = print) -> RunLock:
    """``with run_lock(run, "build"):`` holds ``run``'s lock for the block (see the module docstring)."""
    return RunLock(run_dir, verb, log)
