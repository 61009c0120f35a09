"""h3fusion: fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM.

Importing the package registers the fused-model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(<run>/fused)`` works without ``trust_remote_code``.
"""

from h3fusion.errors import H3FusionError
from h3fusion.models import load_model
from h3fusion.moe.build import build_moe
from h3fusion.moe.export import export_mixtral
from h3fusion.moe.modeling import H3FusionConfig, H3FusionForCausalLM

__all__ = ["H3FusionConfig", "H3FusionError", "H3FusionForCausalLM", "build_moe", "export_mixtral", "load_model"]
__version__ = "0.1.0"
