"""The GPU path, checked in one run: build, fuse, generate, export and reload a small MoE, then time it
against the base and its peers (``bench/gpu_check.sh`` runs this; bench/README.md has the device command).

    bash bench/gpu_check.sh [--device cuda|cpu] [--out gpu_check.json]

It needs only torch, transformers and what a device call can carry: the project's source and the wheels
of its other pure-Python dependencies (``gpu_check.sh`` installs those from ``.whl/`` when they are
missing). No model or data is read from disk: the base is a random-init Llama, on CUDA of SmolLM2-135M's
shape (its real weights, 98 MB as GGUF, are too large to carry; speed depends on the shape, not the
values), on CPU a tiny one, with three random PEFT LoRA experts (r=8, alpha=16, gate/up/down) and random
token prompts. Defaults: bf16 on CUDA, float32 on CPU.

Steps, each printed as one ``[step] ok|FAILED ...`` line and recorded in the JSON; the exit status is 1
when any step failed (later steps still run where they can):

1. ``build``: ``build_moe`` compact and dense on the device; their logits agree.
2. ``fuse``: the fusion stage's set-up (``prepare_for_fusion`` with the default ``RunConfig``: attention
   LoRA, fusion LoRA, router) and a few AdamW steps of ``FusionTrainer.compute_loss`` on random tokens;
   the loss is finite and the trainable weights moved; then ``merge_fusion_adapters``.
3. ``generate``: greedy generation with the fused model.
4. ``export``: ``export_mixtral`` of the fused model, loaded by ``MixtralForCausalLM`` with no missing or
   unexpected key; its logits and greedy tokens agree with the fused model's.
5. ``speed``: base, compact, dense, the Mixtral export and PEFT X-LoRA (as ``bench_moe.py`` builds them)
   at batch 1 and 8: tokens/s (median of alternating repeats), peak memory, parameters; ratios printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import bench_moe as bench  # same folder: the peers, the timing and the table's ratios
import torch

# SmolLM2-135M-Instruct's architecture (its config.json), for a random-init model of the same cost
SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
NAMES = bench.NAMES
# two layouts of one function agree: in float32, max |diff| within 1e-4 of the logits' spread; in bf16, where
# rounding can flip a near-tied top-k routing somewhere in a deep model, the mean |diff| within 5% of the mean
# |logit| and the argmax the same at >= 90% of positions
FP32_MAX_REL, BF16_MEAN_REL, BF16_ARGMAX = 1e-4, 0.05, 0.9


class Steps:
    """Runs named steps, printing one line each; a failed step is recorded and the run goes on."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn, show=None):
        """``show`` turns the step's result into its printed summary (default: the result as JSON)."""
        started = time.perf_counter()
        try:
            info = fn() or {}
            self.results[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 2), **info}
            summary = show(info) if show else json.dumps(info, default=str)
            print(f"[{name}] ok ({self.results[name]['seconds']}s) {summary}", flush=True)
            return info
        except Exception as error:  # noqa: BLE001 - a check run reports every failure and carries on
            self.results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()}
            print(f"[{name}] FAILED {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()
            return None

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if not r["ok"]]


def make_base(shape: dict, out: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM saved as safetensors (what every variant loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    model.save_pretrained(out)
    return out


def load_base(base_dir: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()


def make_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """Three stock PEFT LoRA adapters with random non-zero A and B (as tests/moe_fixtures.make_adapter)."""
    from peft import LoraConfig, get_peft_model

    adapters = {}
    for i, name in enumerate(NAMES):
        model = load_base(base_dir, torch.float32, "cpu")
        torch.manual_seed(i + 1)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                      target_modules=["gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.05)
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
    return adapters


def random_prompts(vocab: int, batch: int, length: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> dict:
    """How close two models' logits are (see FP32_MAX_REL); raises when they are not close enough."""
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    found = {"max_diff_rel_spread": float(diff.max() / a.std()), "mean_diff_rel": float(diff.mean() / a.abs().mean()),
             "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    if dtype == torch.float32:
        ok = found["max_diff_rel_spread"] <= FP32_MAX_REL
    else:
        ok = found["mean_diff_rel"] <= BF16_MEAN_REL and found["argmax_agreement"] >= BF16_ARGMAX
    if not ok:
        raise AssertionError(f"logits differ beyond the {dtype} tolerance: {found}")
    return found


def check_build(base_dir, adapters, args) -> dict:
    compact = bench.build(load_base(base_dir, args.torch_dtype, args.device), adapters, "compact", args.torch_dtype,
                          args.device)
    dense = bench.build(load_base(base_dir, args.torch_dtype, args.device), adapters, "dense", args.torch_dtype,
                        args.device)
    inputs = random_prompts(args.vocab, 2, args.prompt_tokens, args.device)
    with torch.no_grad():
        agree = logits_agree(compact(**inputs).logits, dense(**inputs).logits, args.torch_dtype)
    return {"compact_vs_dense": agree, "compact_dtype": str(compact.dtype), "device": str(compact.device)}


def check_fuse(base_dir, adapters, args, workdir: Path, state: dict) -> dict:
    from h3fusion.config import RunConfig
    from h3fusion.fusion import FusionTrainer, merge_fusion_adapters, prepare_for_fusion
    from h3fusion.sft import training_arguments

    config = RunConfig()
    model = bench.build(load_base(base_dir, args.torch_dtype, args.device), adapters, "compact", args.torch_dtype,
                        args.device)
    prepare_for_fusion(model, config)
    model.train()
    trainer = FusionTrainer(model=model, args=training_arguments(config.fusion.train, workdir / "trainer", 0),
                            gate_lambda=config.fusion.gate_lambda, gammas=config.gammas(),
                            gate_loss_form=config.fusion.gate_loss, expert_names=list(NAMES),
                            router_lr=config.fusion.router_lr)
    optimizer = trainer.create_optimizer()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = random_prompts(args.vocab, 4, 2 * args.prompt_tokens, args.device, seed=1)
    batch |= {"labels": batch["input_ids"].clone(), "axis_label": torch.tensor([0, 1, 2, 0], device=args.device)}
    losses = []
    for _ in range(args.fuse_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if not all(torch.isfinite(torch.tensor(losses))):
        raise AssertionError(f"non-finite fusion loss: {losses}")
    moved = sum(not torch.equal(p.detach(), trainable[n]) for n, p in model.named_parameters() if n in trainable)
    if moved == 0:
        raise AssertionError("no trainable weight changed in the fusion steps")
    model.eval()
    state["fused"] = merge_fusion_adapters(model)
    return {"losses": [round(x, 4) for x in losses], "trainable_tensors": len(trainable), "moved": moved,
            "trainable_dtype": str(next(iter(trainable.values())).dtype)}


def check_generate(args, state: dict) -> dict:
    inputs = random_prompts(args.vocab, 2, args.prompt_tokens, args.device)
    out = bench.greedy(state["fused"], inputs, args.new_tokens, pad_id=2)
    state["fused_tokens"] = out
    return {"shape": list(out.shape)}


def check_export(args, workdir: Path, state: dict) -> dict:
    mixtral = bench.load_mixtral_export(state["fused"], workdir / "mixtral", args.torch_dtype, args.device)
    inputs = random_prompts(args.vocab, 2, args.prompt_tokens, args.device)
    with torch.no_grad():
        agree = logits_agree(state["fused"](**inputs).logits, mixtral(**inputs).logits, args.torch_dtype)
    tokens = bench.greedy(mixtral, inputs, args.new_tokens, pad_id=2)
    new = slice(args.prompt_tokens, None)
    same = float((tokens[:, new] == state["fused_tokens"][:, new]).float().mean())
    if args.torch_dtype == torch.float32 and same < 1.0:
        raise AssertionError(f"greedy tokens of the export differ from the fused model's ({same:.3f} agree)")
    return {"fused_vs_mixtral": agree, "greedy_token_agreement": same,
            "files": sorted(p.name for p in (workdir / "mixtral").iterdir())}


def check_speed(base_dir, adapters, args, workdir: Path) -> dict:
    from h3fusion.costs import PeakMemory, param_counts

    models = {"base": load_base(base_dir, args.torch_dtype, args.device)}
    for storage in ("compact", "dense"):
        models[storage] = bench.build(load_base(base_dir, args.torch_dtype, args.device), adapters, storage,
                                      args.torch_dtype, args.device)
    # the same experts routed once per sequence (moe.routing: sequence), one expert each: its speed against the base
    models["compact-seq"] = bench.build(load_base(base_dir, args.torch_dtype, args.device), adapters, "compact",
                                        args.torch_dtype, args.device, routing="sequence", top_k=bench.SEQ_TOP_K)
    models["mixtral"] = bench.load_mixtral_export(models["compact"], workdir / "speed-mixtral", args.torch_dtype,
                                                  args.device)
    models["xlora"] = bench.build_xlora(load_base(base_dir, args.torch_dtype, args.device), adapters, args.device)
    result: dict = {}
    for batch in (1, 8):
        inputs = random_prompts(args.vocab, batch, args.prompt_tokens, args.device, seed=batch)

        def runner(model, tokens=args.new_tokens, inputs=inputs):
            return lambda: bench.timed(lambda: bench.greedy(model, inputs, tokens, pad_id=2), args.device)[1]

        samples = bench.alternating({n: runner(m) for n, m in models.items()}, args.repeats,
                                    warmups={n: runner(m, 2) for n, m in models.items()})
        result[f"b{batch}"] = {n: {"tok_s": batch * args.new_tokens / bench.median(s), "seconds": s}
                               for n, s in samples.items()}
    inputs = random_prompts(args.vocab, 8, args.prompt_tokens, args.device, seed=8)
    result["parameters"] = {}
    for name, model in models.items():
        with PeakMemory(args.device) as mem:
            bench.greedy(model, inputs, args.new_tokens, pad_id=2)
        result["parameters"][name] = param_counts(model, bench.PARAM_KIND[name]) | {"generate_b8_peak_bytes": mem.peak}
    result["ratios"] = {
        f"{num}/{den} {b}": {"of_medians": result[b][num]["tok_s"] / result[b][den]["tok_s"],
                             "median_per_repeat": bench.paired(result[b][den]["seconds"], result[b][num]["seconds"])}
        for b in ("b1", "b8") for num, den in bench.RATIOS
    }
    return result


def speed_table(speed: dict) -> str:
    lines = ["| variant | tok/s b1 | tok/s b8 | params total / active (M) | weights / generate-b8 peak (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for name, c in speed["parameters"].items():
        lines.append(f"| {name} | {speed['b1'][name]['tok_s']:.1f} | {speed['b8'][name]['tok_s']:.1f} | "
                     f"{c['total'] / 1e6:.2f} / {c['active_per_token'] / 1e6:.2f} | "
                     f"{bench.mib(c['weight_bytes'])} / {bench.mib(c['generate_b8_peak_bytes'])} |")
    lines += ["", "| ratio | of medians | median of per-repeat ratios | target |", "|---|---:|---:|---|"]
    for name, r in speed["ratios"].items():
        target = " ".join(map(str, bench.TARGETS[name])) if name in bench.TARGETS else ""
        lines.append(f"| {name} | {r['of_medians']:.3f} | {r['median_per_repeat']:.3f} | {target} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--model", choices=["smollm2-shape", "tiny"],
                        help="random-init base: SmolLM2-135M's shape (default on cuda) or a tiny Llama (on cpu)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per generation (default 32 on cuda, 4 on cpu)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 5 on cuda, 1 on cpu)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU; run with --device cpu on a machine without one")
        return 2
    args.torch_dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shape = SMOLLM2_135M_SHAPE if (args.model or ("smollm2-shape" if cuda else "tiny")) == "smollm2-shape" else TINY_SHAPE
    args.vocab = shape["vocab_size"]
    args.prompt_tokens = bench.PROMPT_TOKENS
    args.new_tokens = args.new_tokens or (bench.GEN_TOKENS if cuda else 4)
    args.repeats = args.repeats or (5 if cuda else 1)
    args.fuse_steps = 3
    if not cuda:
        torch.set_num_threads(1)

    import peft
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    started = time.perf_counter()
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name() if cuda else None, "dtype": str(args.torch_dtype)},
        "settings": {"model_shape": shape, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "fuse_steps": args.fuse_steps, "top_k": bench.TOP_K},
    }
    print(f"gpu_check: {report['machine']}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check."))
    steps, state = Steps(), {}
    setup = steps.run("setup", lambda: {
        "base": str(make_base(shape, workdir / "base", args.torch_dtype)),
        "adapters": {k: str(v) for k, v in make_adapters(workdir / "base", workdir / "adapters").items()}})
    if setup:
        base_dir = workdir / "base"
        adapters = {k: Path(v) for k, v in setup["adapters"].items()}
        steps.run("build", lambda: check_build(base_dir, adapters, args))
        if (steps.run("fuse", lambda: check_fuse(base_dir, adapters, args, workdir, state)) is not None
                and steps.run("generate", lambda: check_generate(args, state)) is not None):
            steps.run("export", lambda: check_export(args, workdir, state))
        state.clear()
        if cuda:
            torch.cuda.empty_cache()
        steps.run("speed", lambda: check_speed(base_dir, adapters, args, workdir), show=lambda s: "\n" + speed_table(s))
    shutil.rmtree(workdir, ignore_errors=True)
    report["steps"] = steps.results
    report["failed"] = steps.failed
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: {'FAILED ' + ', '.join(steps.failed) if steps.failed else 'all steps ok'}; "
          f"wall {report['wall_seconds']}s; JSON: {args.out}", flush=True)
    return 1 if steps.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
