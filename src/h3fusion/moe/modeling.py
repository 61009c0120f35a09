"""The fused model as a transformers model: ``H3FusionConfig`` + ``H3FusionForCausalLM``.

The fused model wraps the base causal LM (any gated-MLP decoder) with every layer's MLP replaced by
a ``MoEMLP``. Importing this module registers the model class with ``AutoModelForCausalLM``
(``import h3fusion`` arranges that for when transformers loads its Auto classes: see
``h3fusion.registration``), so ``AutoModelForCausalLM.from_pretrained(<run>/fused)`` works without
``trust_remote_code``, and ``save_pretrained`` writes plain safetensors.

State dict: the base model's own keys under ``model.`` (``model.model.layers.3.self_attn.q_proj.weight``),
with each layer's MLP holding the ``MoEMLP`` keys (``model.model.layers.3.mlp.router.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from h3fusion.moe.configuration import H3FusionConfig
from h3fusion.moe.content import template_mask
from h3fusion.moe.layer import MoEMLP
from h3fusion.moe.lowrank import PROJECTIONS, LowRankDelta
from h3fusion.moe.router import RoutingInputs

IGNORE_INDEX = -100  # label of the prompt (and padding) tokens in a training batch


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Every MoE MLP of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


class H3FusionForCausalLM(PreTrainedModel, GenerationMixin):
    """A gated-MLP decoder whose MLPs are mixtures of LoRA experts (see ``h3fusion.moe.layer``)."""

    config_class = H3FusionConfig
    base_model_prefix = "h3fusion"  # never a key prefix: loading a plain base checkpoint is not supported
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["MoEMLP"]

    def __init__(
        self,
        config: H3FusionConfig,
        base_model: PreTrainedModel | None = None,
        expert_deltas: Sequence[Sequence[dict[str, LowRankDelta]]] | None = None,
    ):
        """Either build empty from ``config`` (for from_pretrained), or from a loaded base model and
        per-layer expert deltas (``expert_deltas[layer][expert] = {proj: LowRankDelta}``)."""
        super().__init__(config)
        if base_model is None:
            # from_pretrained(dtype=...) sets the default dtype while it builds us; from_config would
            # otherwise take the stored base config's dtype and load a bf16 request in fp32
            base_model = AutoModelForCausalLM.from_config(config.make_base_config(), dtype=torch.get_default_dtype())
        self.model = base_model
        self._tied_weights_keys = {
            f"model.{k}": f"model.{v}" for k, v in (getattr(base_model, "_tied_weights_keys", None) or {}).items()
        }
        self.generation_config = base_model.generation_config
        # post_init before the MoE swap: the base's weight init must not touch the routers we set up
        self.post_init()
        layers = self.model.get_decoder().layers
        n = config.num_experts
        self.routing_inputs = RoutingInputs()  # one object, shared by every layer
        for i, layer in enumerate(layers):
            if expert_deltas is not None:
                deltas = expert_deltas[i]
            else:  # placeholders with the stored ranks; from_pretrained fills them in
                deltas = [_zero_deltas(layer.mlp, config.delta_ranks) for _ in range(n)]
            layer.mlp = MoEMLP(
                layer.mlp, deltas, top_k=config.num_experts_per_tok, storage=config.storage,
                decode_threshold=config.decode_threshold, routing=config.routing,
            )
            layer.mlp.set_expert_bias(config.expert_bias)
            layer.mlp.routing_inputs = self.routing_inputs
            layer.mlp.decides = i == 0  # sequence-shared routing: the first layer decides for all

    # transformers plumbing: embeddings, decoder and generation delegate to the wrapped model
    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        return self.model.get_decoder()

    def _init_weights(self, module):
        pass  # weights come from the base model and the experts, or from the checkpoint

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        # logits_to_keep is named so that generate() sees it and asks for the last position's logits only
        # on the prompt (else the vocabulary-sized head runs on every prompt token); passed on where the base
        # takes it
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        self.set_routing_inputs(input_ids, attention_mask, labels=labels, cache=cache)
        if logits_to_keep is not None and (not isinstance(logits_to_keep, int) or logits_to_keep) \
                and self.model._supports_logits_to_keep():
            kwargs["logits_to_keep"] = logits_to_keep
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def decoder_forward(self, input_ids, attention_mask=None, prompt_length: int | None = None):
        """The decoder alone (no LM head: routing diagnostics need only the MoE layers' router probabilities),
        with the routing inputs set as ``forward`` sets them; ``prompt_length``: the input's first tokens are
        the prompt, the rest an answer (sequence routing decides from the prompt)."""
        self.set_routing_inputs(input_ids, attention_mask, prompt_length=prompt_length)
        return self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    # ------------------------------------------------------------------ H3Fusion knobs
    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    def moe_layers(self) -> list[MoEMLP]:
        return moe_layers(self)

    def set_expert_bias(self, bias: Mapping[str, float] | Sequence[float]) -> None:
        """The runtime alignment dial: a logit bias per expert, by name ({'harmless': 2.0}) or as a list.

        Names not given get 0. A large bias on one expert with top_k=1 reproduces that expert exactly.
        """
        if isinstance(bias, Mapping):
            unknown = set(bias) - set(self.expert_names)
            if unknown:
                raise ValueError(f"unknown expert(s) {sorted(unknown)}; experts are {self.expert_names}")
            values = [float(bias.get(name, 0.0)) for name in self.expert_names]
        else:
            values = [float(v) for v in bias]
        for layer in self.moe_layers():
            layer.set_expert_bias(values)
        self.config.expert_bias = values

    # ------------------------------------------------------------------ routing inputs
    def set_routing_inputs(self, input_ids, attention_mask=None, *, labels=None, cache=None,
                           prompt_length: int | None = None) -> None:
        """Tell the MoE layers which of this forward's tokens are content and which a sequence decides from.

        Content: attended tokens outside the prompt template (``config.template_ids``); a row with none
        counts all its attended tokens. A sequence decides from its prompt's content tokens: the prompt is
        the labels' ignored tokens when ``labels`` are given (training), the first ``prompt_length`` tokens
        when given, else the whole input. A forward with a non-empty KV ``cache`` continues decoding.
        """
        inputs = self.routing_inputs
        inputs.shared_decision = None  # sequence-shared: the first layer decides afresh in this forward
        inputs.continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if input_ids is None:  # embeddings given directly: no token ids to tell template from content
            inputs.content_mask = inputs.decision_mask = None
            return
        length = input_ids.shape[-1]
        attended = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask[..., -length:].bool())
        content = attended & ~template_mask(input_ids, self.config.template_ids)
        content = torch.where(content.any(dim=-1, keepdim=True), content, attended)
        prompt = attended.clone()
        if labels is not None:
            prompt &= labels == IGNORE_INDEX
        if prompt_length is not None:
            prompt[..., prompt_length:] = False
        decide = content & prompt
        inputs.content_mask = content
        inputs.decision_mask = torch.where(decide.any(dim=-1, keepdim=True), decide, prompt)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows' sequence-routing decisions: call it where the KV cache drops rows."""
        for layer in self.moe_layers():
            layer.select_rows(rows)

    @property
    def routing(self) -> str:
        return self.config.routing

    def set_template_ids(self, template_ids: Sequence[Sequence[int]]) -> None:
        """The prompt format's fixed pieces as token ids (``h3fusion.moe.content.template_token_ids``)."""
        self.config.template_ids = [list(piece) for piece in template_ids]

    def set_top_k(self, top_k: int) -> None:
        for layer in self.moe_layers():
            layer.top_k = top_k
        self.config.num_experts_per_tok = top_k

    def save_pretrained(self, save_directory, *args, **kwargs):
        # the stored factor ranks can grow (merged fusion LoRA): record them so from_pretrained
        # builds placeholders of the right shapes
        layers = self.moe_layers()
        if layers and layers[0].stored_ranks():
            self.config.delta_ranks = layers[0].stored_ranks()
        return super().save_pretrained(save_directory, *args, **kwargs)


def _zero_deltas(mlp: nn.Module, ranks: Mapping[str, int]) -> dict[str, LowRankDelta]:
    deltas = {}
    for p in PROJECTIONS:
        rank = int(ranks.get(p, 0))
        if rank:
            out_f, in_f = getattr(mlp, p).weight.shape
            deltas[p] = LowRankDelta(torch.zeros(rank, in_f), torch.zeros(out_f, rank), 1.0)
    return deltas


AutoModelForCausalLM.register(H3FusionConfig, H3FusionForCausalLM, exist_ok=True)
