"""h3fusion: fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM.

Importing the package registers the fused-model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(<run>/fused)`` works without ``trust_remote_code``. The
registration waits until transformers loads its Auto classes (``h3fusion.registration``), and the
public names below are imported on first use, so ``import h3fusion`` and ``h3fusion --help`` load
neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from h3fusion.errors import H3FusionError
from h3fusion.registration import register_with_auto_classes

# public name -> the module that defines it (imported on first access: PEP 562)
_LAZY = {
    "H3FusionConfig": "h3fusion.moe.configuration",
    "H3FusionForCausalLM": "h3fusion.moe.modeling",
    "build_moe": "h3fusion.moe.assemble",
    "export_mixtral": "h3fusion.moe.export",
    "load_model": "h3fusion.models",
}

__all__ = ["H3FusionConfig", "H3FusionError", "H3FusionForCausalLM", "build_moe", "export_mixtral", "load_model"]
try:
    __version__ = importlib.metadata.version("h3fusion")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

register_with_auto_classes()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'h3fusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
