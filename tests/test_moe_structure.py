"""Structure of the compact MoE (no timing): the base FFN is held once and its gate/up run once per token.

Built with build_moe from real PEFT adapters on the tiny random Llama (2 layers, hidden 64, MLP 128).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from h3fusion.models import decoder_layers, load_model
from h3fusion.moe.build import build_moe
from h3fusion.moe.layer import PROJECTIONS, MoEMLP
from tests.moe_fixtures import make_adapter

N_EXPERTS = 3
RANK = 4


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structure-adapters")
    return {name: make_adapter(tiny_llama_dir, root / name, seed=i + 1, r=RANK, alpha=2.0 * RANK)
            for i, name in enumerate(("helpful", "harmless", "honest")[:N_EXPERTS])}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def _build(tiny_llama_dir, adapters, storage="compact", top_k=2, base=None):
    return build_moe(base if base is not None else str(tiny_llama_dir), {k: str(v) for k, v in adapters.items()},
                     top_k=top_k, storage=storage)


def test_compact_holds_each_base_ffn_weight_once(tiny_llama_dir, adapters):
    base, _ = load_model(str(tiny_llama_dir))
    base_total = _count(base)
    base_ptrs = [{p: getattr(layer.mlp, p).weight.data_ptr() for p in PROJECTIONS} for layer in decoder_layers(base)]
    config = base.config
    h, i, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers

    model = _build(tiny_llama_dir, adapters, base=base)  # in place: the base's own tensors must be reused
    layers = model.moe_layers()
    assert len(layers) == n_layers
    ffn_shapes = {(i, h), (h, i)}
    for layer, ptrs in zip(layers, base_ptrs, strict=True):
        assert isinstance(layer, MoEMLP) and layer.storage == "compact" and layer.num_experts == N_EXPERTS
        for p in PROJECTIONS:
            assert getattr(layer, p).weight.data_ptr() == ptrs[p]  # the very same storage, not a copy
            assert not getattr(layer, p).weight.requires_grad
        full = [(name, tuple(t.shape)) for name, t in layer.named_parameters()
                if tuple(t.shape[-2:]) in ffn_shapes or t.numel() >= h * i]
        assert sorted(full) == sorted(
            [("gate_proj.weight", (i, h)), ("up_proj.weight", (i, h)), ("down_proj.weight", (h, i))]
        )
        # no buffer hides a copy either
        assert all(b.numel() < h * i for b in layer.buffers())
    # across the whole model: every base FFN storage appears exactly once among the parameters
    ptrs = [t.data_ptr() for t in model.parameters()]
    for layer_ptrs in base_ptrs:
        for ptr in layer_ptrs.values():
            assert ptrs.count(ptr) == 1

    # exact accounting: base + routers + the stored low-rank factors (rank RANK on all three projections)
    router = n_layers * N_EXPERTS * h
    deltas = n_layers * N_EXPERTS * sum(RANK * (a + b) for a, b in ((h, i), (h, i), (i, h)))
    for layer in layers:
        assert {p: layer.delta_A[p].shape[1] for p in PROJECTIONS} == dict.fromkeys(PROJECTIONS, RANK)
    total = _count(model)
    assert total == base_total + router + deltas
    assert total <= 1.05 * base_total

    # the dense layout for contrast: N full copies of every FFN weight
    dense = _build(tiny_llama_dir, adapters, storage="dense")
    assert _count(dense) == base_total + n_layers * ((N_EXPERTS - 1) * 3 * h * i + N_EXPERTS * h)


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("below_threshold", [True, False])
def test_compact_runs_base_gate_and_up_once_per_token(tiny_llama_dir, adapters, monkeypatch, top_k, below_threshold):
    model = _build(tiny_llama_dir, adapters, top_k=top_k)
    layers = model.moe_layers()
    threshold = layers[0].decode_threshold
    tokens = max(1, threshold // 2) if below_threshold else threshold + 7
    assert (tokens <= threshold) == below_threshold

    # which compact path ran
    paths: list[str] = []
    for name in ("_compact_batched", "_compact_gather"):
        original = getattr(MoEMLP, name)

        def spy(self, *args, _original=original, _name=name):
            paths.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(MoEMLP, name, spy)

    # every use of a base gate/up weight, whether through the module or through F.linear directly
    base_weights = {}
    for index, layer in enumerate(layers):
        base_weights[layer.gate_proj.weight.data_ptr()] = (index, "gate")
        base_weights[layer.up_proj.weight.data_ptr()] = (index, "up")
    linear_calls: dict[tuple[int, str], list[int]] = {key: [] for key in base_weights.values()}
    real_linear = F.linear

    def counting_linear(inp, weight, *rest, **kw):
        key = base_weights.get(weight.data_ptr())
        if key is not None:
            linear_calls[key].append(inp.reshape(-1, inp.shape[-1]).shape[0])
        return real_linear(inp, weight, *rest, **kw)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    hook_calls: dict[tuple[int, str], list[int]] = {key: [] for key in base_weights.values()}
    handles = []
    for index, layer in enumerate(layers):
        for proj, tag in ((layer.gate_proj, "gate"), (layer.up_proj, "up")):
            handles.append(proj.register_forward_hook(
                lambda mod, args, out, key=(index, tag): hook_calls[key].append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            ))
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()

    expected_path = "_compact_batched" if below_threshold else "_compact_gather"
    assert paths == [expected_path] * len(layers)
    # one call per layer and projection, over all T tokens: not once per expert, not on gathered subsets
    for key in base_weights.values():
        assert hook_calls[key] == [tokens], (key, hook_calls[key])
        assert linear_calls[key] == [tokens], (key, linear_calls[key])
