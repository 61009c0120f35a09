"""Supervised fine-tuning pieces shared by every training stage: tokenised datasets and Trainer set-up.

The loss is on response tokens only (prompt tokens get label -100), as in the paper, and where the model
allows it (``response_logits_supported``) the LM head runs on those tokens only: transformers'
``logits_to_keep`` given a boolean mask of the positions whose next token is a response token, with
``shift_labels`` holding those tokens. The loss is the same; what is saved is the vocabulary-sized head and
softmax on every prompt and padding position (for a 262k-token vocabulary, as Gemma-3's, most of a step). Training
goes through transformers' ``Trainer`` so that ``accelerate launch`` scales it without any code of
ours: DDP / FSDP / DeepSpeed for the experts, DDP for fusion (docs/scale-out.md says why).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from h3fusion.config import TrainConfig
from h3fusion.data import SFTExample, format_prompt
from h3fusion.runs import CHECKPOINT_MARKER
from h3fusion.tokens import leading_special_ids
from h3fusion.tokens import prompt_ids as encode_prompt

IGNORE_INDEX = -100


class SFTDataset(Dataset):
    """Examples tokenised as prompt + response + eos, with labels masked on the prompt."""

    def __init__(self, examples: Sequence[SFTExample], tokenizer, max_length: int, prompt_format: str,
                 axis_labels: Mapping[str, int] | None = None):
        """``axis_labels`` maps each axis to its router index (fusion); without it the label is -1."""
        self.rows = []
        lead = leading_special_ids(tokenizer)  # the BOS the tokenizer puts in front, if any: once for all rows
        for example in examples:
            prompt = format_prompt(example.instruction, example.input, prompt_format, tokenizer)
            prompt_ids = encode_prompt(tokenizer, prompt, lead)
            response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id])[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                continue  # prompt alone fills max_length: nothing to learn from this row
            self.rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": labels,
                    "axis_label": axis_labels[example.axis] if axis_labels else -1,
                }
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class SFTCollator:
    """Right-pads a batch; labels padded with -100; keeps ``axis_label`` (used by fusion).

    ``response_logits``: also ``logits_to_keep`` (bool [B, T]: the positions whose next token is a response
    token) and ``shift_labels`` (those tokens, [N]), so the model computes logits and loss there only; for a
    model that ``response_logits_supported`` says takes them."""

    def __init__(self, pad_token_id: int, keep_axis_label: bool = False, response_logits: bool = False):
        self.pad_token_id = pad_token_id
        self.keep_axis_label = keep_axis_label
        self.response_logits = response_logits

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
        if self.keep_axis_label:
            batch["axis_label"] = torch.tensor([row["axis_label"] for row in rows])
        if self.response_logits:
            keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
            batch["logits_to_keep"] = keep
            # the Trainer counts num_items_in_batch from shift_labels when present: the same count as labels'
            batch["shift_labels"] = batch["labels"][:, 1:][keep[:, :-1]]
        return batch


def response_logits_supported(model) -> bool:
    """Whether ``model`` (a transformers causal LM, a PEFT model around one, or the H3Fusion MoE) computes its
    logits and loss on a boolean position mask: its ``forward`` takes ``logits_to_keep`` and slices with
    transformers' ``slice_logits_to_keep``, and that helper takes boolean masks (recent transformers 5; older
    modelling code, and some models still, slice ``hidden_states[:, logits_to_keep]`` themselves). Where it
    does not, the collator leaves the batch as it was and nothing changes."""
    import inspect

    from transformers import modeling_utils

    from h3fusion.moe.modeling import H3FusionForCausalLM

    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    if slicer is None:
        return False
    try:
        if slicer(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape != (1, 1):
            return False
    except (IndexError, RuntimeError, TypeError):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, H3FusionForCausalLM):  # it passes logits_to_keep on to the causal LM it wraps
        inner = inner.model
    supports = getattr(inner, "_supports_logits_to_keep", None)
    if not (supports and supports()):
        return False
    try:
        return "slice_logits_to_keep(" in inspect.getsource(type(inner).forward)
    except (OSError, TypeError):  # no source to read: do not guess
        return False


def training_arguments(train: TrainConfig, output_dir: Path, seed: int, **overrides):
    """TrainingArguments from our config; checkpoints go to ``output_dir`` for resumption."""
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        lr_scheduler_type=train.lr_scheduler,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=1,
        save_only_model=False,
        report_to=[],
        seed=seed,
        data_seed=seed,
        # under DDP the loss is the token mean over every process's batch (counts all-reduced), so N processes
        # of batch b train exactly like one process of batch N*b (tests/test_scale_out.py)
        average_tokens_across_devices=True,
        use_cpu=use_cpu,
        bf16=train.bf16 and not use_cpu,
        activation_checkpointing=train.gradient_checkpointing,
        remove_unused_columns=False,
        # evaluation reports the held-out loss only (evaluate() without compute_metrics does so already): logits,
        # [N, V] with the response-token head and N differing between processes, are never gathered
        prediction_loss_only=True,
        dataloader_num_workers=0,
        disable_tqdm=os.environ.get("H3FUSION_NO_PROGRESS") == "1",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint to resume from. A checkpoint is complete once its
    ``trainer_state.json`` is written (the Trainer writes it last); one a full disk or a kill cut short is
    removed, so it is neither resumed from nor kept by the Trainer's rotation in place of a good one."""
    from transformers.trainer_utils import get_last_checkpoint

    drop_incomplete_checkpoints(output_dir)
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def drop_incomplete_checkpoints(output_dir: Path) -> None:
    for checkpoint in Path(output_dir).glob("checkpoint-*"):
        if checkpoint.is_dir() and not (checkpoint / CHECKPOINT_MARKER).is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)


def training_bytes(model) -> int:
    """About the disk a training stage needs beside its result: two checkpoints at a time (the Trainer
    writes the next before it drops the last), each the trainable weights plus Adam's two moments, in fp32."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 2 * 3 * 4 * trainable


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The per-step training records of a Trainer's log history (drops the final summary)."""
    return [row for row in log_history if "loss" in row and "train_runtime" not in row]
