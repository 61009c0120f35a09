"""Stage 3 — `h3fusion fuse`: fine-tune the MoE on the three axes mixed, each example labelled with its axis.

Trainable: LoRA on attention (q,k,v,o), a fusion LoRA on every expert's projections, and the router.

    loss = L_SFT + lambda * L_gate + sum_k gamma_k * R_k

* L_SFT: next-token cross-entropy on response tokens.
* L_gate: per sequence, the router probabilities averaged over its content tokens (never the prompt
  template, whose hidden states are the same for every axis) and all layers
  (p_bar, N values), then -log p_bar[axis]. ``gate_loss: authors_ce`` instead feeds p_bar to
  CrossEntropyLoss as if it were logits (the released code's softmax-twice form; compatibility only).
* R_k: expert k's fusion-stage change, sum over its projections of ||(alpha'/r')·B'A'||_F, averaged over layers.

Built on transformers' Trainer (so ``accelerate launch`` gives DDP; not FSDP / ZeRO-3, see docs/scale-out.md); checkpoints hold only
the trainable tensors, so resuming a killed run costs megabytes, not a copy of the model. The result,
``<run>/fused/``, has the attention and expert LoRAs merged in and loads with
``AutoModelForCausalLM.from_pretrained`` after ``import h3fusion``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Trainer

from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError
from h3fusion.fusion_dropout import use_mask_dropout
from h3fusion.io import stage_writes, write_json
from h3fusion.moe.modeling import H3FusionForCausalLM, moe_layers
from h3fusion.moe.routing import mean_router_probs, routing_stats
from h3fusion.routing_plots import plot_routing
from h3fusion.runs import (
    FUSE_MARKER,
    FUSE_SETTINGS,
    checkpoints_dir,
    fused_dir,
    fused_is_complete,
    moe_dir,
    moe_is_built,
    record_settings,
    refuse_other_settings,
)
from h3fusion.sft import (
    SFTCollator,
    SFTDataset,
    drop_incomplete_checkpoints,
    last_checkpoint,
    response_logits_supported,
    training_arguments,
    training_bytes,
)

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINABLE_FILE = "trainable.safetensors"


def gating_loss(p_bar: torch.Tensor, axis_labels: torch.Tensor, form: str = "nll") -> torch.Tensor:
    """-log p_bar[axis] averaged over the batch (``authors_ce``: CrossEntropy on probabilities)."""
    if form == "authors_ce":
        return F.cross_entropy(p_bar, axis_labels)
    return -torch.log(p_bar.gather(1, axis_labels[:, None]).clamp_min(1e-9)).mean()


def drift_penalties(model) -> torch.Tensor:
    """R_k for every expert [N]: its fusion-LoRA change, averaged over layers."""
    return torch.stack([layer.drift_norms() for layer in moe_layers(model)]).mean(dim=0)


class FusionTrainer(Trainer):
    """Trainer with the H3Fusion loss, per-component logging and trainable-only checkpoints."""

    def __init__(self, *args, gate_lambda: float, gammas: Sequence[float], gate_loss_form: str,
                 expert_names: Sequence[str], router_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_lr = router_lr
        self.gate_lambda = gate_lambda
        self.gammas = torch.tensor(list(gammas), dtype=torch.float32)
        self.gate_loss_form = gate_loss_form
        self.expert_names = list(expert_names)
        self._sums: dict[str, float] = defaultdict(float)
        self._steps = 0.0  # optimizer steps (on this process) behind ``_sums``
        self.loss_is_scaled_for_ga = True  # compute_loss scales every term for accumulation itself

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.router_lr is not None:  # the routers get their own learning rate
            routers = {id(p) for n, p in (model or self.model).named_parameters()
                       if n.endswith("router.weight") and p.requires_grad}
            moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in routers]
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in routers]
            if moved:
                optimizer.add_param_group({"params": moved, "lr": self.router_lr, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The H3Fusion loss of one micro-batch, scaled so that summing over the micro-batches of a step
        and averaging over processes (DDP) gives the loss of the whole global batch, as one process would:
        L_SFT is the token mean over every process's micro-batches (``num_items_in_batch``, counted by the
        Trainer across accumulation steps and, with ``average_tokens_across_devices``, across processes);
        L_gate the mean over sequences (per-process batches are equal in size); the drift term once."""
        axis_labels = inputs.pop("axis_label")
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        processes = self.accelerator.num_processes
        if num_items_in_batch is not None:
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)  # sum over this micro-batch / N
            lm_loss = outputs.loss
            if self.args.average_tokens_across_devices and processes > 1:
                lm_loss = lm_loss * processes  # N counts every process's tokens; DDP averages the gradients
        else:
            outputs = model(**inputs)
            lm_loss = outputs.loss / accumulation
        p_bar = mean_router_probs(model)  # over each sequence's content tokens: the template says nothing of its axis
        gate = gating_loss(p_bar, axis_labels, self.gate_loss_form)
        drift = drift_penalties(model)
        penalty = (self.gammas.to(drift.device, drift.dtype) * drift).sum()
        loss = lm_loss + (self.gate_lambda * gate + penalty) / accumulation
        with torch.no_grad():  # this micro-batch's share of the step's values, summed over processes in log()
            share = 1.0 / (accumulation * processes)
            self._sums["lm_loss"] += lm_loss.item() / processes
            self._sums["gate_loss"] += gate.item() * share
            self._sums["router_accuracy"] += (p_bar.argmax(dim=1) == axis_labels).float().mean().item() * share
            for name, value in zip(self.expert_names, drift.tolist(), strict=True):
                self._sums[f"drift_{name}"] += value * share
            self._steps += 1.0 / accumulation
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the Trainer logs on every process at the same steps: sum the shares of all processes
        if self._steps and "loss" in logs:
            keys = sorted(self._sums)
            totals = torch.tensor([self._sums[key] for key in keys], dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({key: round(value / self._steps, 6) for key, value in zip(keys, totals.tolist(), strict=True)})
            self._sums.clear()
            self._steps = 0.0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # only what training changes: a checkpoint of a 7B fusion stays a few hundred MB
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        state = load_file(os.path.join(resume_from_checkpoint, TRAINABLE_FILE))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise H3FusionError(f"checkpoint {resume_from_checkpoint} does not match this fusion set-up; "
                                "delete it to start the fusion stage afresh")
        model.load_state_dict(state, strict=False)


def prepare_for_fusion(model: H3FusionForCausalLM, config: RunConfig) -> None:
    """Attach the fusion-stage LoRAs and set what trains: attention LoRA, expert LoRA, router."""
    from transformers import set_seed

    fusion = config.fusion
    set_seed(config.seed)  # the fusion LoRAs' init draws from the global RNG before the Trainer seeds it
    for param in model.parameters():
        param.requires_grad_(False)
    if fusion.attention_lora:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(
            LoraConfig(r=fusion.lora_r, lora_alpha=fusion.lora_alpha, lora_dropout=fusion.lora_dropout,
                       target_modules=ATTENTION_PROJECTIONS, bias="none"),
            model,
        )
        use_mask_dropout(model)  # bool masks: less memory and RNG time than nn.Dropout's float noise
    for layer in model.moe_layers():
        layer.add_fusion_lora(fusion.lora_r, fusion.lora_alpha, fusion.lora_dropout)
        layer.router.weight.requires_grad_(fusion.train_router and not config.compat.frozen_random_router)
    for name, param in model.named_parameters():  # inject_adapter_in_model only marks its own
        if "lora_" in name or ".fusion_" in name:
            param.requires_grad_(True)
        if "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            # inject_adapter_in_model keeps the base's dtype; train the LoRA in fp32 like get_peft_model does
            param.data = param.data.float()


@torch.no_grad()
def merge_fusion_adapters(model: H3FusionForCausalLM) -> H3FusionForCausalLM:
    """Fold the attention LoRA into q/k/v/o and each fusion LoRA into its expert (no LoRA left)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for layer in model.moe_layers():
        layer.merge_fusion_lora()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def heldout_prompts(config: RunConfig, tokenizer, source: str = "pool") -> dict[str, list[str]]:
    """``fusion.heldout_prompts`` formatted prompts per axis that no stage trained on.

    source="pool": prompts of the axis's training distribution left out of its training sample
    (topped up from the axis's test prompts when the sample took the whole pool); source="test":
    the axis's test prompts (AlpacaEval, BeaverTails, TruthfulQA), a harder, shifted distribution.
    """
    from h3fusion.data import format_prompt, load_heldout_train, load_test, prompt_text

    n = config.fusion.heldout_prompts
    prompts = {}
    for axis in config.experts:
        pairs = [(e.instruction, e.input) for e in load_heldout_train(axis, config, n)] if source == "pool" else []
        pairs += [prompt_text(row, axis=axis) for row in load_test(axis, config, limit=n - len(pairs))]
        prompts[axis] = [format_prompt(text, extra, config.data.prompt_format, tokenizer) for text, extra in pairs]
    return prompts


def axis_labels(config: RunConfig) -> dict[str, int]:
    """Router index of each axis' examples; the compat switch reproduces the authors' mislabelling."""
    labels = {axis: i for i, axis in enumerate(config.experts)}
    if config.compat.honest_labelled_harmless and "honest" in labels and "harmless" in labels:
        labels["honest"] = labels["harmless"]
    return labels


@dataclass
class FusionTraining:
    """What the training step did (for ``fusion_log.json``)."""

    examples: int
    axis_labels: dict[str, int]
    steps: int
    train_seconds: float
    trainable_parameters: int
    history: list[dict]
    is_main_process: bool


@dataclass
class RoutingDiagnosis:
    """Routing statistics of held-out prompts before and after fusion, and of the test prompts after."""

    before: dict
    after: dict
    on_test: dict
    routing: dict  # the full statistics after fusion (routing.json)


def fuse_run(config: RunConfig, log=print) -> Path:
    """Stage 3 for a run config: <run>/moe -> <run>/fused (skipped when complete, resumed when killed).

    Train (``train_fusion``), diagnose the routing (``diagnose_routing``), write (``write_fused``)."""
    from h3fusion.build import prompt_template_ids
    from h3fusion.data import mixed_train
    from h3fusion.models import load_model, weights_bytes

    out = fused_dir(config)
    if fused_is_complete(out):
        refuse_other_settings(out, config, FUSE_SETTINGS)
        log(f"[fuse] complete at {out}, skipping")
        return out
    source = moe_dir(config)
    if not moe_is_built(source):
        raise H3FusionError(f"no MoE at {source}; run `h3fusion build` first")
    examples = mixed_train(config, per_axis=config.fusion.examples_per_axis)
    model, tokenizer = load_model(str(source), config.model.dtype)
    if not model.config.template_ids:  # an MoE built before the model knew its template
        model.set_template_ids(prompt_template_ids(config, tokenizer))
    labels = axis_labels(config)
    dataset = SFTDataset(examples, tokenizer, config.data.max_length, config.data.prompt_format, labels)
    prompts = {"pool": heldout_prompts(config, tokenizer), "test": heldout_prompts(config, tokenizer, source="test")}
    before = routing_stats(model, tokenizer, prompts["pool"])["axes"]
    checkpoints = checkpoints_dir(out)
    # a refused write (full disk ...) is one line; a cut checkpoint is dropped: the next call resumes before it
    with stage_writes(out, "fusing", need=weights_bytes(model) + training_bytes(model),
                      cleanup=lambda: drop_incomplete_checkpoints(checkpoints)):
        training = train_fusion(model, tokenizer, dataset, labels, config, checkpoints, log)
        if not training.is_main_process:
            return out
        merge_fusion_adapters(model)
        diagnosis = diagnose_routing(model, tokenizer, prompts, before)
        write_fused(model, tokenizer, config, out, training, diagnosis)
    shutil.rmtree(checkpoints, ignore_errors=True)
    log_fusion(training, diagnosis, log)
    log(f"[fuse] fused model at {out}")
    return out


def train_fusion(model: H3FusionForCausalLM, tokenizer, dataset: SFTDataset, labels: dict[str, int],
                 config: RunConfig, checkpoints: Path, log=print) -> FusionTraining:
    """Train the fusion LoRAs and routers on the mixed examples, labelled by ``labels`` (resuming from
    ``checkpoints``)."""
    prepare_for_fusion(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resume = last_checkpoint(checkpoints)
    log(f"[fuse] {len(dataset)} examples ({', '.join(f'{a}={i}' for a, i in labels.items())}), "
        f"{trainable:,} trainable parameters{', resuming from ' + resume if resume else ''}")
    trainer = FusionTrainer(
        model=model,
        # an expert no token was routed to in a batch gets no gradient: DDP must not wait for it
        args=training_arguments(config.fusion.train, checkpoints, config.seed, ddp_find_unused_parameters=True),
        train_dataset=dataset,
        data_collator=SFTCollator(tokenizer.pad_token_id, keep_axis_label=True,
                                   response_logits=response_logits_supported(model)),
        gate_lambda=config.fusion.gate_lambda, gammas=config.gammas(),
        gate_loss_form=config.fusion.gate_loss, expert_names=config.experts, router_lr=config.fusion.router_lr,
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.wait_for_everyone()  # every process's checkpoint files are written before rmtree
    training = FusionTraining(
        examples=len(dataset), axis_labels=labels, steps=trainer.state.global_step,
        train_seconds=round(time.time() - started, 1), trainable_parameters=trainable,
        history=[row for row in trainer.state.log_history if "lm_loss" in row],
        is_main_process=trainer.is_world_process_zero(),
    )
    return training


def diagnose_routing(model: H3FusionForCausalLM, tokenizer, prompts: dict[str, dict[str, list[str]]],
                     before: dict) -> RoutingDiagnosis:
    """Routing of the held-out pool prompts and of the test prompts after fusion (``prompts["pool"]``,
    ``prompts["test"]``)."""
    routing = routing_stats(model, tokenizer, prompts["pool"])
    on_test = routing_stats(model, tokenizer, prompts["test"])["axes"]
    return RoutingDiagnosis(before=before, after=routing["axes"], on_test=on_test, routing=routing)


def write_fused(model: H3FusionForCausalLM, tokenizer, config: RunConfig, out: Path, training: FusionTraining,
                diagnosis: RoutingDiagnosis) -> None:
    """Write the fused model, its routing diagnostics and plots, and ``fusion_log.json`` (last: the marker)."""
    before, after, on_test = diagnosis.before, diagnosis.after, diagnosis.on_test
    model.save_pretrained(out)
    write_json(out / "routing.json", diagnosis.routing)
    plot_routing(diagnosis.routing, out / "plots", title=f"{config.name}: routing of held-out prompts after fusion")
    tokenizer.save_pretrained(out)
    record_settings(config, out)
    write_json(out / FUSE_MARKER, {  # written last: marks the stage complete
        "examples": training.examples,
        "axis_labels": training.axis_labels,
        "steps": training.steps,
        "train_seconds": training.train_seconds,
        "trainable_parameters": training.trainable_parameters,
        "router_accuracy": {axis: r["accuracy"] for axis, r in after.items()},
        "router_accuracy_before": {axis: r["accuracy"] for axis, r in before.items()},
        "router_accuracy_test_prompts": {axis: r["accuracy"] for axis, r in on_test.items()},
        "heldout_gate_loss": {axis: r["gate_loss"] for axis, r in after.items()},
        "heldout_gate_loss_before": {axis: r["gate_loss"] for axis, r in before.items()},
        "router_mean_probs": {axis: r["mean_probs"] for axis, r in after.items()},
        "heldout_prompts_per_axis": config.fusion.heldout_prompts,
        "log_history": training.history,
    })


def log_fusion(training: FusionTraining, diagnosis: RoutingDiagnosis, log=print) -> None:
    """The losses' first and last quarter, and the routing before and after fusion, in a few lines."""
    history, before, after = training.history, diagnosis.before, diagnosis.after
    if history:
        k = max(1, len(history) // 4)  # quarter means: single batches of mixed axes are noisy

        def mean(key, rows):
            return sum(row[key] for row in rows) / len(rows)

        log(f"[fuse] training (first -> last quarter): lm {mean('lm_loss', history[:k]):.3f} -> "
            f"{mean('lm_loss', history[-k:]):.3f}, gate {mean('gate_loss', history[:k]):.3f} -> "
            f"{mean('gate_loss', history[-k:]):.3f}")
    log("[fuse] gating loss on held-out prompts: " + ", ".join(
        f"{axis} {before[axis]['gate_loss']:.3f} -> {after[axis]['gate_loss']:.3f}" for axis in after))
    log("[fuse] router accuracy on held-out prompts of each axis (chance "
        f"{1 / len(after):.2f}): " + ", ".join(
            f"{axis} {before[axis]['accuracy']:.2f} -> {after[axis]['accuracy']:.2f}" for axis in after))
    log("[fuse] ... on each axis's first test prompts (fusion.heldout_prompts of them; `h3fusion generate` records "
        "every evaluated one): " + ", ".join(
            f"{axis} {r['accuracy']:.2f} of {r['n']}" for axis, r in diagnosis.on_test.items()))
