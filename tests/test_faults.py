"""Faults of the machine and of neighbours: refused writes, two processes on one run, a failing judge endpoint.

The one-line messages of each fault through the CLI are cases of tests/test_bad_input.py (with the rerun
that finishes the stage); here are the mechanisms behind them: how a refused write is recognised whatever
library wrote, the run lock (a real second process, a stale lock, the ranks of one job), and the API
judge's retries against a local stub endpoint that injects each fault.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from h3fusion.errors import H3FusionError
from h3fusion.io import read_jsonl, write_errno, write_failure
from h3fusion.judges.external import OpenAIPairwiseJudge
from h3fusion.runlock import LOCK_NAME, RunLock
from tests.conftest import write_config
from tests.data_fixtures import write_data_dir, write_jsonl
from tests.judge_stub import JudgeStub

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


# ----------------------------------------------------------------------------- one process per run


def cli(args, **env):
    return subprocess.run([sys.executable, "-m", "h3fusion.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "H3FUSION_NO_PROGRESS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                               "TRANSFORMERS_VERBOSITY": "error", **env}, timeout=300)


@pytest.fixture
def answering(tmp_path, tiny_llama_dir):
    """`h3fusion generate` of the tiny base's answers to three prompts: a verb that writes into a run."""
    data = write_data_dir(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data)},
                          evaluate={"helpful_n": 3}, generate={"max_new_tokens": {"helpful": 4}})
    return ["generate", config, "--system", "base", "--axis", "helpful"], tmp_path / "run"


def test_second_process_is_refused_then_a_killed_holders_lock_is_taken_over(answering):
    """Real processes: while the first holds the run, a second is refused with one line naming it; once the
    first is SIGKILLed, the next call takes its stale lock over, and releases it when it ends."""
    args, run = answering
    first = subprocess.Popen([sys.executable, "-m", "h3fusion.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "H3FUSION_NO_PROGRESS": "1"})
    deadline = time.time() + 120
    while not (run / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # past the microseconds in which it writes the lock
    first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second takes
    try:
        assert (run / LOCK_NAME).exists(), "the first process never took the lock"
        second = cli(["evaluate", args[1]])
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.splitlines() == [
        f"error: {run} is in use by another h3fusion process: pid {first.pid} on {socket.gethostname()}, running "
        f"`h3fusion generate` since {json.loads((run / LOCK_NAME).read_text())['since']}; wait for it to finish "
        f"or stop it (if it no longer runs, delete {run / LOCK_NAME})"]
    third = cli(["report", args[1]])  # any verb of the run (test_pipeline's kill tests then finish the stage)
    assert f"took over the lock of pid {first.pid} (h3fusion generate since " in third.stdout
    assert third.returncode == 2 and "run `h3fusion evaluate` first" in third.stderr, third.stderr[-2000:]
    assert not (run / LOCK_NAME).exists()  # released, on the error too


def test_ranks_of_one_launched_job_run_under_rank_0s_lock(tmp_path):
    """Under accelerate / torchrun only rank 0 takes the lock: a rank > 0 runs under it (here it reaches the
    verb's own check) and leaves it alone."""
    config = write_config(tmp_path / "c.yaml")
    lock = tmp_path / "run" / LOCK_NAME
    holder = RunLock(tmp_path / "run", "align").acquire()  # rank 0 of the job: this live process
    try:
        rank_1 = cli(["report", config], RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
        assert json.loads(lock.read_text())["token"] == holder.info["token"]  # neither taken nor removed
    finally:
        holder.release()
    assert rank_1.returncode == 2 and rank_1.stderr.splitlines() == [
        f"error: no {tmp_path / 'run' / 'results.json'}; run `h3fusion evaluate` first"]


def test_which_locks_are_stale(tmp_path):
    """Another host's lock is kept (it cannot be checked from here); on this host a lock is stale when its
    pid has exited, is a zombie, is now another process (another start time) or the host has rebooted."""
    from h3fusion.runlock import _boot_id, _proc_stat

    lock = RunLock(tmp_path, "build")

    def held_by(**holder):
        (tmp_path / LOCK_NAME).write_text(json.dumps({**lock.info, "token": "theirs", **holder}))

    held_by(host="another-host")
    with pytest.raises(H3FusionError, match=r"pid \d+ on another-host \(another host: not checked from here\)"):
        lock.acquire()
    held_by()  # this very process, under another token: alive, so kept
    with pytest.raises(H3FusionError, match=f"pid {os.getpid()} on {socket.gethostname()}, running `h3fusion build`"):
        lock.acquire()
    exited, zombie = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    started = {p.pid: _proc_stat(p.pid)[1] for p in (exited, zombie)}
    for process in (exited, zombie):
        process.kill()
    exited.wait()  # reaped: its pid runs nothing (or, reused, another start time)
    time.sleep(0.2)  # the zombie is dead, not reaped
    stale = [{"pid": exited.pid, "started": started[exited.pid]}, {"pid": zombie.pid, "started": started[zombie.pid]},
             {"started": -1}, *([{"boot": "before-a-reboot"}] if _boot_id() else [])]
    for holder in stale:
        held_by(**holder)
        lock.acquire()  # taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.info["token"], holder
        lock.release()
        assert not (tmp_path / LOCK_NAME).exists()
    zombie.wait()


# ----------------------------------------------------------------------------- a failing judge endpoint

RECORDS = [{"instruction": f"Name fruit number {i}.", "reference": "Apple.", "response": f"A banana, {i}."}
           for i in range(3)]


def pairwise(url, **kwargs) -> OpenAIPairwiseJudge:
    return OpenAIPairwiseJudge(url, "judge-model", api_key_env="H3_TEST_KEY",
                               **{"retries": 2, "backoff": 0.01, "timeout": 0.5, **kwargs})


@pytest.mark.parametrize("fault", ["timeout", "429", "500", "503", "malformed"])
def test_judge_retries_each_transient_fault(fault, monkeypatch):
    monkeypatch.setenv("H3_TEST_KEY", "sk-test-secret")
    with JudgeStub(faults=[fault, fault]) as stub:
        assert pairwise(stub.url).score(RECORDS) == [1.0] * 3  # the candidate mentions banana
    assert stub.answered(fault) == 2 and stub.answered("ok") == 3


def test_judge_waits_as_retry_after_asks(monkeypatch):
    monkeypatch.setenv("H3_TEST_KEY", "sk-test-secret")
    with JudgeStub(faults=["429"], retry_after="1") as stub:
        started = time.monotonic()
        assert pairwise(stub.url).score(RECORDS[:1]) == [1.0]
    assert 1.0 <= time.monotonic() - started < 5  # the server's 1 s, not the 0.01 s backoff


def test_judge_gives_up_after_its_retries_with_one_line(monkeypatch):
    monkeypatch.setenv("H3_TEST_KEY", "sk-test-secret")
    with JudgeStub(then="503") as stub, pytest.raises(H3FusionError) as failed:
        pairwise(stub.url).score(RECORDS)
    assert str(failed.value).startswith(f"judge endpoint {stub.url} failed after 3 tries (last: HTTP 503); ")
    assert stub.answered("503") == 3 and "sk-test-secret" not in str(failed.value)
    with JudgeStub(then="malformed") as stub, pytest.raises(H3FusionError, match="last: a reply that is not a chat"):
        pairwise(stub.url, retries=0).score(RECORDS)


def test_evaluate_keeps_what_was_judged_when_the_endpoint_fails(tmp_path):
    """The endpoint fails after two judgements: evaluating stops with the endpoint's line, the two are kept,
    and the rerun asks the endpoint only for the third."""
    from h3fusion.config import load_config
    from h3fusion.evaluate import evaluate_run
    from h3fusion.generate import evaluated_records

    data = write_data_dir(tmp_path / "data")
    with JudgeStub(faults=["ok", "ok"], then="503") as stub:
        config = load_config(write_config(
            tmp_path / "c.yaml", data={"dir": str(data)}, experts=["helpful"], moe={"top_k": 1},
            evaluate={"helpful_n": 3}, judges={"helpful": "api", "api_base_url": stub.url, "api_key_env": None,
                                               "api_retries": 1, "api_backoff_s": 0.01}))
        answers = [{**r, "response": f"A banana answer to {r['instruction'][:20]}"}
                   for r in evaluated_records(config, "helpful")]
        write_jsonl(tmp_path / "run" / "generations" / "base" / "helpful.jsonl", answers)
        with pytest.raises(H3FusionError, match=f"judge endpoint {stub.url} failed after 2 tries"):
            evaluate_run(config, log=lambda _: None)
        judged = read_jsonl(tmp_path / "run" / "judgements" / "base" / "helpful.jsonl")
        assert [r["score"] for r in judged] == [1.0, 1.0]
        stub.then = "ok"
        results = json.loads(evaluate_run(config, log=lambda _: None).read_text())
    assert stub.answered("ok") == 3  # only the third answer was sent again
    assert results["systems"]["base"]["helpful"]["win_rate"] == 1.0
