"""`accelerate launch` with two processes (DDP over gloo, CPU only) trains exactly like one process.

Two processes of per-device batch 2 see the same global batches as one process of batch 4 (accelerate
shards the same seeded sampler), the Trainer normalises the loss by the token count of the global batch,
and the gradients are all-reduced, so the logged losses, the gradient norms and the trained weights
agree to float rounding. The tolerances are far below what a broken set-up gives: un-synchronised
ranks, or a loss averaged per process, move the adapters by tens of percent and the losses by >1e-4.

`accelerate launch --cpu --num_processes 2` starts a single process (accelerate's CPU launcher needs
mpirun for more), so the test uses the torchrun launcher (``--multi_gpu``) with CUDA hidden: the Trainer
then runs on the CPU and accelerate picks the gloo backend.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_config

LOSS = dict(rel=1e-5, abs=5e-6)  # fusion logs its components rounded to 6 decimals
WEIGHTS = 1e-4  # max |difference| per tensor, relative to its largest entry (measured ~1e-6) ...
WEIGHT_SCALE_FLOOR = 0.1
"""... but at least 0.1: LoRA B tensors start at 0 and move ~1e-3 in two steps, so their own scale would make
summation-order noise across the two processes (3e-6 to 9e-6 seen on this machine) a failure; a missing
gradient all-reduce moves them by about the whole update."""


def _env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "H3FUSION_NO_PROGRESS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def h3fusion(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "h3fusion.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=600)


def h3fusion_ddp(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the CLI on two CPU processes, from a config file of its own (so that a
    user's default accelerate config cannot change the set-up)."""
    accelerate_config = root / "accelerate-2proc.yaml"
    accelerate_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": 2,
        "num_machines": 1, "machine_rank": 0, "mixed_precision": "no", "use_cpu": False, "gpu_ids": "all",
        "rdzv_backend": "static", "same_network": True, "main_training_function": "main",
    }))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "--dynamo_backend", "no",
           "-m", "h3fusion.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, data_dir):
    """The tiny pipeline once in one process (batch 4) and its align / fuse again in two (batch 2 each)."""
    root = tmp_path_factory.mktemp("scale-out")
    config = write_config(
        root / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
        # 2 steps x 4 examples stay inside one epoch even on the small fixture data (helpful: 9 examples): a
        # partial last batch is padded differently by accelerate and would not match
        train={"max_steps": 2, "batch_size": 4, "save_steps": 2},  # a checkpoint under DDP, then cleaned up
        fusion={"examples_per_axis": 4, "heldout_prompts": 2, "lora_dropout": 0.0,  # dropout masks are per process
                "train": {"max_steps": 2, "batch_size": 4, "save_steps": 1}},
    )
    single, ddp_align, ddp_fuse = root / "single", root / "ddp-align", root / "ddp-fuse"
    results = {"config": config, "single": single, "ddp_align": ddp_align, "ddp_fuse": ddp_fuse}
    results["single_align"] = h3fusion("run", str(config), "--stage", "align", "--stage", "build",
                                       "--out", str(single))
    if results["single_align"].returncode == 0:
        for part in ("experts", "moe"):  # the DDP fusion starts from the very same MoE
            shutil.copytree(single / part, ddp_fuse / part)
    results["single_fuse"] = h3fusion("fuse", str(config), "--out", str(single))
    results["ddp_align_run"] = h3fusion_ddp(root, "align", str(config), "--axis", "helpful",
                                            "--set", "train.batch_size=2", "--out", str(ddp_align))
    results["ddp_fuse_run"] = h3fusion_ddp(root, "fuse", str(config), "--set", "fusion.train.batch_size=2",
                                           "--out", str(ddp_fuse))
    return results


def files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def assert_close_tensors(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        scale = max(tensor.abs().max().item(), WEIGHT_SCALE_FLOOR)
        assert (ours[name] - tensor).abs().max().item() <= WEIGHTS * scale, name


def assert_same_curve(ours: list[dict], reference: list[dict], keys: list[str]) -> None:
    assert [row["step"] for row in ours] == [row["step"] for row in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine["epoch"] == theirs["epoch"]  # same global batch: 2 processes x 2 = 1 process x 4
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], **LOSS), (mine["step"], key)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]


def test_align_on_two_processes_matches_one(runs):
    _ok(runs["single_align"])
    out = _ok(runs["ddp_align_run"])
    assert out.count("[align] helpful: adapter at") == 1  # only process 0 writes and reports
    ours, reference = runs["ddp_align"] / "experts" / "helpful", runs["single"] / "experts" / "helpful"
    assert files(ours) == files(reference)  # no checkpoints or per-process leftovers
    log, ref_log = (json.loads((p / "training_log.json").read_text()) for p in (ours, reference))
    assert log["steps"] == ref_log["steps"] == 2 and ref_log["examples"] >= 2 * 4
    assert_same_curve(log["log_history"], ref_log["log_history"], ["loss"])
    for key in ("heldout_loss_before", "heldout_loss_after"):  # None where the data leaves nothing held out
        assert log[key] == (ref_log[key] if ref_log[key] is None else pytest.approx(ref_log[key], **LOSS))
    adapter, ref_adapter = (load_file(p / "adapter_model.safetensors") for p in (ours, reference))
    updates = {n: t for n, t in ref_adapter.items() if "lora_B" in n}  # B starts at zero: B is the update
    assert updates and all(t.abs().max() > 0 for t in updates.values())
    assert_close_tensors(adapter, ref_adapter)
    meta, ref_meta = (json.loads((p / "h3fusion_expert.json").read_text()) for p in (ours, reference))
    assert meta == ref_meta


def test_fuse_on_two_processes_matches_one(runs):
    from transformers import AutoModelForCausalLM

    import h3fusion  # noqa: F401  registers the MoE with transformers' Auto classes

    _ok(runs["single_align"])
    _ok(runs["single_fuse"])
    out = _ok(runs["ddp_fuse_run"])
    assert out.count("[fuse] fused model at") == 1
    ours, reference = runs["ddp_fuse"] / "fused", runs["single"] / "fused"
    assert files(ours) == files(reference) and "checkpoints" not in files(ours)
    log, ref_log = (json.loads((p / "fusion_log.json").read_text()) for p in (ours, reference))
    assert log["steps"] == ref_log["steps"] == 2 and ref_log["examples"] >= 2 * 4
    keys = ["loss", "lm_loss", "gate_loss", "router_accuracy", "drift_helpful", "drift_harmless", "drift_honest"]
    assert_same_curve(log["log_history"], ref_log["log_history"], keys)
    assert log["router_accuracy"] == ref_log["router_accuracy"]
    assert_close_tensors(load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors"))
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (ours, reference)]
    ids = torch.arange(1, 17)[None] * 97
    with torch.no_grad():
        logits, ref_logits = (model(input_ids=ids).logits for model in models)
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-4 * ref_logits.abs().max().item())
