"""Surface features of a text for the judges: words, overlaps, refusal phrases, 16 text statistics."""

from __future__ import annotations

import math
import re
import zlib

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
