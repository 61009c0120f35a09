"""Stage 1 — `h3fusion align`: one LoRA expert per axis, trained on the FFN projections only.

Each expert is a stock PEFT adapter in ``<run>/experts/<axis>/`` (loadable with
``PeftModel.from_pretrained``) plus ``training_log.json`` (loss curve) and ``config.yaml`` (the
config that produced it). An expert is complete when its ``training_log.json`` exists — it is
written last, atomically — so re-running skips finished experts and resumes an interrupted one
from its last Trainer checkpoint.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from h3fusion.config import AXES, RunConfig
from h3fusion.data import load_expert_train, load_heldout_train
from h3fusion.errors import H3FusionError
from h3fusion.io import stage_writes, write_json
from h3fusion.models import base_fingerprint, load_model
from h3fusion.runs import (
    ALIGN_SETTINGS,
    EXPERT_MARKER,
    EXPERT_META,
    checkpoints_dir,
    expert_dir,
    expert_is_complete,
    other_experts_data,
    record_settings,
    refuse_other_settings,
)
from h3fusion.sft import (
    SFTCollator,
    SFTDataset,
    drop_incomplete_checkpoints,
    last_checkpoint,
    loss_curve,
    response_logits_supported,
    training_arguments,
    training_bytes,
)
from h3fusion.tokens import leading_special_ids

HELDOUT_EXAMPLES = 32  # fixed examples the expert never trains on: a noise-free "did it learn" check
LOSS_WINDOW = 10  # logged steps averaged for the first / last training loss reported


def align_expert(config: RunConfig, axis: str, log=print) -> Path:
    """Train (or resume, or skip) the LoRA expert of one axis; returns its directory (a given one as it is)."""
    given = config.moe.adapters.get(axis)
    if given:  # the user's own expert: every later stage reads it (runs.adapter_paths), so none is trained
        log(f"[align] {axis}: given by moe.adapters ({given}), not trained")
        return Path(given)
    out = expert_dir(config, axis)
    if expert_is_complete(out):
        refuse_other_settings(out, config, ALIGN_SETTINGS, ignore=other_experts_data(axis, AXES))
        log(f"[align] {axis}: complete at {out}, skipping")
        return out
    lora = config.lora
    return train_lora_adapter(
        config, f"[align] {axis}", out,
        examples=load_expert_train(axis, config), heldout=load_heldout_train(axis, config, HELDOUT_EXAMPLES),
        target_modules=list(lora.target_modules), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
        train=config.train, meta={"axis": axis}, log=log,
    )


def train_lora_adapter(config: RunConfig, label: str, out: Path, *, examples, heldout, target_modules: list[str],
                       r: int, alpha: float, dropout: float, train, meta: dict, log=print) -> Path:
    """LoRA SFT of the base on ``examples`` into ``out`` (a stock PEFT adapter + training_log.json),
    resuming from the last checkpoint; ``heldout`` examples give a loss before/after training."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed

    model, tokenizer = load_model(
        config.model.base, config.model.dtype,
        trust_remote_code=config.model.trust_remote_code, cache_dir=config.model.cache_dir,
    )
    fingerprint = base_fingerprint(model)  # before training: under FSDP / ZeRO-3 a process later holds a shard
    dataset = SFTDataset(examples, tokenizer, config.data.max_length, config.data.prompt_format)
    if len(dataset) == 0:
        raise H3FusionError(f"{label}: no training examples left after filtering; "
                            "raise data.max_length or the data sizes")
    peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             bias="none", task_type="CAUSAL_LM")
    set_seed(config.seed)  # LoRA's A init draws from the global RNG before the Trainer seeds it
    model = get_peft_model(model, peft_config)
    checkpoints = checkpoints_dir(out)
    resume = last_checkpoint(checkpoints)
    trainable = model.get_nb_trainable_parameters()[0]
    log(f"{label}: {len(dataset)} examples, {trainable:,} trainable "
        f"parameters{', resuming from ' + resume if resume else ''}")
    heldout = SFTDataset(heldout, tokenizer, config.data.max_length, config.data.prompt_format)
    trainer = Trainer(
        model=model,
        args=training_arguments(train, checkpoints, config.seed, per_device_eval_batch_size=train.batch_size),
        train_dataset=dataset,
        eval_dataset=heldout if len(heldout) else None,
        data_collator=SFTCollator(tokenizer.pad_token_id, response_logits=response_logits_supported(model)),
    )
    # a refused write (full disk ...) is one line; a cut checkpoint is dropped: the next call resumes before it
    with stage_writes(out, f"training {out.parent.name}/{out.name}", need=training_bytes(model) + 4 * trainable,
                      cleanup=lambda: drop_incomplete_checkpoints(checkpoints)):
        started = time.time()
        trainer.train(resume_from_checkpoint=resume)
        heldout_after = trainer.evaluate()["eval_loss"] if len(heldout) else None
        # The "before" loss is taken after training with the adapter switched off: LoRA's B starts at zero, so
        # that is exactly the untrained model. Evaluating before train() would let accelerate mark the bare
        # model as prepared, and train() would then skip the DDP wrapping: no gradient all-reduce, the ranks
        # drift apart and rank 0 saves an adapter trained on its shard alone.
        if len(heldout):
            with model.disable_adapter():
                heldout_before = trainer.evaluate()["eval_loss"]
        else:
            heldout_before = None
        # every process takes part: under FSDP / ZeRO-3 the Trainer gathers the sharded adapter for process 0
        trainer.save_model(str(out))  # safetensors adapter + adapter_config.json
        if not trainer.is_world_process_zero():
            return out
        (out / "training_args.bin").unlink(missing_ok=True)  # save_model's extra: the adapter dir stays stock PEFT
        curve = loss_curve(trainer.state.log_history)
        write_json(out / EXPERT_META, {
            **meta,
            "base": config.model.base,
            "base_fingerprint": fingerprint,
            "prompt_prefix_ids": leading_special_ids(tokenizer),  # what h3fusion.tokens put in front of prompts
            "r": r, "alpha": alpha, "target_modules": sorted(target_modules),
            "prompt_format": config.data.prompt_format,
        })
        record_settings(config, out)
        # a single step's loss says little (the last batch may hold one example): mean of the first / last steps
        window = max(1, min(LOSS_WINDOW, len(curve) // 2))
        first, last = (sum(r["loss"] for r in part) / len(part) if part else None
                       for part in (curve[:window], curve[-window:]))
        write_json(out / EXPERT_MARKER, {  # written last: marks the adapter complete
            **meta,
            "examples": len(dataset),
            "steps": trainer.state.global_step,
            "train_seconds": round(time.time() - started, 1),
            "first_loss": first,  # mean over the first `loss_window` logged steps
            "last_loss": last,  # ... and over the last ones
            "loss_window": window,
            "heldout_examples": len(heldout),
            "heldout_loss_before": heldout_before,
            "heldout_loss_after": heldout_after,
            "log_history": curve,
        })
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is saved; optimizer state is no longer needed
    if curve:
        log(f"{label}: training loss {first:.3f} -> {last:.3f} (mean of the first / last {window} steps)")
    if heldout_before is not None:
        log(f"{label}: held-out loss ({len(heldout)} examples) {heldout_before:.3f} -> {heldout_after:.3f}")
    log(f"{label}: adapter at {out}")
    return out


def align(config: RunConfig, axes: list[str] | None = None, log=print) -> dict[str, Path]:
    """Stage 1 for every configured axis (or the given subset)."""
    axes = axes or config.experts
    unknown = [a for a in axes if a not in config.experts]
    if unknown:
        raise H3FusionError(f"--axis {unknown[0]} is not among the config's experts {config.experts}")
    return {axis: align_expert(config, axis, log) for axis in axes}
