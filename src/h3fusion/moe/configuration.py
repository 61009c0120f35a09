"""The fused model's transformers config, ``H3FusionConfig``, registered with ``AutoConfig``.

Apart from ``modeling.py`` because it needs no torch model code: ``h3fusion.registration`` imports it
as soon as transformers loads ``AutoConfig``, which happens while transformers' own modeling code is
still importing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig


class H3FusionConfig(PretrainedConfig):
    """Config of a fused model: the base model's config plus the MoE settings.

    Args:
        base_config: the base model's config as a dict (its ``model_type`` picks the architecture).
        expert_names: one name per expert, in router order (e.g. helpful, harmless, honest).
        num_experts_per_tok: experts per token, top-k (1..N); Mixtral's name (``top_k`` would clash
            with the generation parameter of that name).
        storage: ``compact`` (base FFN once + low-rank expert factors) or ``dense`` (N FFN copies).
        delta_ranks: compact storage only: rank of the stored expert factors per projection.
        expert_bias: per-expert router-logit bias applied at inference (the alignment dial).
        decode_threshold: token count up to which the compact layer uses its batched decode path.
        routing: ``token`` (each token routed on its own: the paper), ``sequence`` (one decision per
            sequence and layer from its prompt's content tokens, kept for the whole answer) or
            ``sequence-shared`` (one decision per sequence, the first layer's, followed by every layer).
        template_ids: token ids of the prompt format's fixed pieces (``h3fusion.data.prompts.template_pieces``);
            their occurrences are template, every other token content (empty: every token is content).
    """

    model_type = "h3fusion"

    def __init__(
        self,
        base_config: dict | None = None,
        expert_names: Sequence[str] = (),
        num_experts_per_tok: int = 2,
        storage: str = "compact",
        delta_ranks: Mapping[str, int] | None = None,
        expert_bias: Sequence[float] | None = None,
        decode_threshold: int = 16,
        routing: str = "token",
        template_ids: Sequence[Sequence[int]] = (),
        **kwargs,
    ):
        self.base_config = dict(base_config or {})
        self.expert_names = list(expert_names)
        self.num_experts_per_tok = num_experts_per_tok
        self.storage = storage
        self.delta_ranks = dict(delta_ranks or {})
        self.expert_bias = list(expert_bias) if expert_bias is not None else [0.0] * len(self.expert_names)
        self.decode_threshold = decode_threshold
        self.routing = routing
        self.template_ids = [list(piece) for piece in template_ids]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        super().__init__(**kwargs)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def make_base_config(self) -> PretrainedConfig:
        params = {k: v for k, v in self.base_config.items() if k != "model_type"}
        return AutoConfig.for_model(self.base_config["model_type"], **params)


AutoConfig.register("h3fusion", H3FusionConfig, exist_ok=True)
