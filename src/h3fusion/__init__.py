"""h3fusion: fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM."""

from h3fusion.errors import H3FusionError
from h3fusion.models import load_model

__all__ = ["H3FusionError", "load_model"]
__version__ = "0.1.0"
