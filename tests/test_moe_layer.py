"""MoEMLP: compact == dense == an explicit per-expert reference, routing, structure, training hooks, dtypes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from h3fusion.moe import PROJECTIONS, LowRankDelta, MoEMLP

H, I = 64, 128  # noqa: E741  (hidden, intermediate)
THRESHOLD = 16
T_SMALL, T_LARGE = 5, 40  # below / above decode_threshold
F64 = dict(rtol=0, atol=1e-10)


def make_base(dtype: torch.dtype = torch.float64, seed: int = 0) -> LlamaMLP:
    config = LlamaConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(seed)
    return LlamaMLP(config).to(dtype)


def make_deltas(n: int, dtype: torch.dtype = torch.float64, seed: int = 1, rank: int = 4) -> list[dict]:
    """Rank-4 deltas with non-trivial B and differing scales; expert 1 has rank 2 on gate, expert 2 no down."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    experts = []
    for k in range(n):
        d = {}
        for p, (out_f, in_f) in shapes.items():
            if k == 2 and p == "down_proj":
                continue
            r = 2 if (k == 1 and p == "gate_proj") else rank
            a = torch.randn(r, in_f, generator=g, dtype=dtype) / math.sqrt(in_f)
            b = 0.5 * torch.randn(out_f, r, generator=g, dtype=dtype)
            d[p] = LowRankDelta(A=a, B=b, scale=(1.0 + k) / r)
        experts.append(d)
    return experts


def expert_weights(base: LlamaMLP, delta: dict) -> dict[str, torch.Tensor]:
    out = {}
    for p in PROJECTIONS:
        w = getattr(base, p).weight.detach().to(torch.float64)
        if p in delta:
            w = w + delta[p].scale * (delta[p].B.to(torch.float64) @ delta[p].A.to(torch.float64))
        out[p] = w
    return out


def mlp_with(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w = {p: t.to(x.dtype) for p, t in weights.items()}
    return F.linear(F.silu(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"]), w["down_proj"])


def reference(base, deltas, router_w, bias, x, top_k, weights=None):
    """Every expert on every token (explicit full weights), mixed with Mixtral's renormalised top-k softmax.

    ``weights``: per-expert full weight dicts to use instead of base + deltas."""
    x2 = x.reshape(-1, H).to(torch.float64)
    weights = weights or [expert_weights(base, d) for d in deltas]
    outs = torch.stack([mlp_with(w, x2) for w in weights])  # [N, T, H]
    probs = torch.softmax(x2 @ router_w.to(torch.float64).t() + bias.to(torch.float64), dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    dense_w = torch.zeros_like(probs).scatter(1, top_i, top_w)  # [T, N]
    return (outs * dense_w.t().unsqueeze(-1)).sum(0).reshape(x.shape)


def router_w(n: int, dtype=torch.float64, seed: int = 2, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, H, generator=g, dtype=dtype) / math.sqrt(H)


def tokens(t: int, dtype=torch.float64, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, t, H, generator=g, dtype=dtype)


def top_ks(n: int) -> list[int]:
    return sorted({1, min(2, n), n})


CASES = [(n, k) for n in (1, 2, 3, 4) for k in top_ks(n)]


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
@pytest.mark.parametrize(("n", "top_k"), CASES)
def test_compact_dense_reference_agree_fp64(n, top_k, t):
    base, deltas, rw = make_base(), make_deltas(n), router_w(n)
    x = tokens(t)
    compact = MoEMLP(base, deltas, top_k=top_k, router_weight=rw, decode_threshold=THRESHOLD)
    dense = MoEMLP(base, deltas, top_k=top_k, storage="dense", router_weight=rw, decode_threshold=THRESHOLD)
    bias = torch.linspace(-0.3, 0.3, n)
    for layer in (compact, dense):
        layer.set_expert_bias(bias)
    ref = reference(base, deltas, rw, bias, x, top_k)
    with torch.no_grad():
        y_compact = compact(x)
        compact.decode_threshold = 10**9  # force the decode path (masked all-experts; rank-masked at top-1)
        y_batched = compact(x)
        compact.decode_threshold = 0  # force the index-gather path (top-1 without autograd: rank-masked)
        y_gather = compact(x)
        y_dense = dense(x)
        compact.decode_threshold = dense.inference_chunk_tokens = compact.inference_chunk_tokens = 3
        y_chunked = compact(x)  # without autograd, many tokens mix slice by slice
        y_dense_chunked = dense(x)
    with torch.enable_grad():  # under autograd above the threshold every top-k takes the index-gather loop
        y_gather_grad = compact(x).detach()
    assert y_compact.shape == x.shape
    for y in (y_compact, y_batched, y_gather, y_gather_grad, y_dense, y_chunked, y_dense_chunked):
        torch.testing.assert_close(y, ref, **F64)
    assert (ref - mlp_with(expert_weights(base, {}), x)).abs().max() > 1e-2  # the deltas matter


@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_compact_dense_reference_agree_fp32(t):
    base32 = make_base(torch.float32)
    deltas, rw = make_deltas(3, torch.float32), router_w(3, torch.float32)
    x = tokens(t, torch.float32)
    ref = reference(base32, deltas, rw, torch.zeros(3), x, 2).to(torch.float32)
    for storage in ("compact", "dense"):
        layer = MoEMLP(base32, deltas, top_k=2, storage=storage, router_weight=rw)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_expert_weight_matches_explicit():
    base, deltas = make_base(), make_deltas(3)
    for storage in ("compact", "dense"):
        layer = MoEMLP(base, deltas, storage=storage)
        for k, d in enumerate(deltas):
            want = expert_weights(base, d)
            for p in PROJECTIONS:
                torch.testing.assert_close(layer.expert_weight(k, p), want[p], **F64)


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("storage", ["compact", "dense"])
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_forced_routing_gives_that_experts_mlp(storage, t):
    n = 4
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, top_k=1, storage=storage, router_weight=router_w(n))
    x = tokens(t)
    for k in range(n):
        plain = copy.deepcopy(base)
        with torch.no_grad():
            for p, w in expert_weights(base, deltas[k]).items():
                getattr(plain, p).weight.copy_(w)
        bias = torch.zeros(n)
        bias[k] = 1e3
        layer.set_expert_bias(bias.tolist())
        with torch.no_grad():
            torch.testing.assert_close(layer(x), plain(x), **F64)
            assert (layer.router_probs.argmax(-1) == k).all()


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("threshold", [10**9, 0])  # masked path, gather path
def test_top1_only_the_chosen_expert_contributes(threshold):
    n, chosen = 3, 1
    base, deltas = make_base(), make_deltas(n)
    others = make_deltas(n, seed=99)  # different deltas for the experts that must not contribute
    mixed = [deltas[k] if k == chosen else others[k] for k in range(n)]
    zero_router = torch.zeros(n, H, dtype=torch.float64)
    bias = [0.0, 0.5, -0.2]  # logits = bias exactly -> expert 1 wins everywhere
    x = tokens(T_LARGE)
    outs = []
    for ds in (deltas, mixed):
        layer = MoEMLP(base, ds, top_k=1, router_weight=zero_router, decode_threshold=threshold)
        layer.set_expert_bias(bias)
        with torch.no_grad():
            outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], **F64)
    torch.testing.assert_close(outs[0], mlp_with(expert_weights(base, deltas[chosen]), x), **F64)


@pytest.mark.parametrize("threshold", [10**9, 0])
def test_topk_weights_are_renormalised(threshold):
    n = 3
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(
        base,
        deltas,
        top_k=2,
        router_weight=torch.zeros(n, H, dtype=torch.float64),
        decode_threshold=threshold,
    )
    layer.set_expert_bias([1.0, 0.0, -1.0])  # p ∝ (e, 1, 1/e); keep experts 0, 1
    x = tokens(T_LARGE)
    w0, w1 = math.e / (math.e + 1), 1 / (math.e + 1)
    want = w0 * mlp_with(expert_weights(base, deltas[0]), x) + w1 * mlp_with(
        expert_weights(base, deltas[1]), x
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, **F64)
    probs = layer.router_probs
    assert probs.shape == (T_LARGE, n)
    torch.testing.assert_close(
        probs[0], torch.softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 0)
    )


def test_top_k_validation():
    base, deltas = make_base(), make_deltas(3)
    for bad in (0, 4):
        with pytest.raises(ValueError):
            MoEMLP(base, deltas, top_k=bad)
    layer = MoEMLP(base, deltas, top_k=3)
    with pytest.raises(ValueError):
        layer.top_k = 5
    with pytest.raises(ValueError):
        layer.set_expert_bias([1.0, 2.0])
    with pytest.raises(ValueError):
        MoEMLP(base, [{"q_proj": deltas[0]["gate_proj"]}])


# ---------------------------------------------------------------------------------------------- 4
def test_compact_holds_base_once_and_dense_holds_copies():
    base, deltas = make_base(), make_deltas(4)
    layer = MoEMLP(base, deltas)
    for p in PROJECTIONS:
        assert getattr(layer, p).weight is getattr(base, p).weight
        assert getattr(layer, p).weight.data_ptr() == getattr(base, p).weight.data_ptr()
        assert not getattr(base, p).weight.requires_grad
    big = [name for name, t in [*layer.named_parameters(), *layer.named_buffers()] if t.numel() >= H * I]
    assert sorted(big) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    n_base = sum(t.numel() for t in base.parameters())
    n_layer = sum(t.numel() for t in layer.parameters())
    assert n_layer < 1.5 * n_base
    keys = set(layer.state_dict())
    assert keys == {
        "router.weight",
        "expert_bias",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    } | {f"delta_{ab}.{p}" for ab in "AB" for p in PROJECTIONS}
    dense = MoEMLP(base, deltas, storage="dense")
    assert set(dense.state_dict()) == {"router.weight", "expert_bias"} | {f"experts.{p}" for p in PROJECTIONS}
    assert dense.experts["gate_proj"].shape == (4, I, H)
    assert dense.experts["down_proj"].shape == (4, H, I)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("threshold", [10**9, 0])
def test_base_gate_up_computed_once_per_forward(n, threshold, monkeypatch):
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, top_k=min(2, n), decode_threshold=threshold)
    rows: dict[str, list[int]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for p in PROJECTIONS:
        getattr(layer, p).register_forward_hook(lambda m, args, out, p=p: rows[p].append(args[0].shape[0]))
    big_linear_calls: list[int] = []
    real_linear = F.linear
    base_ids = {id(getattr(base, p).weight) for p in PROJECTIONS}

    def counting_linear(inp, weight, bias=None):
        if id(weight) in base_ids or weight.numel() >= H * I:  # any full-size FFN matmul
            big_linear_calls.append(inp.reshape(-1, inp.shape[-1]).shape[0])
        return real_linear(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    x = tokens(T_LARGE)
    with torch.no_grad():
        layer(x)
    assert rows == {"gate_proj": [T_LARGE], "up_proj": [T_LARGE], "down_proj": [T_LARGE]}
    assert big_linear_calls == [T_LARGE] * 3  # gate, up, down: once each, over all tokens, for any N


# ---------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("storage", ["compact", "dense"])
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_gradients_and_frozen_params(storage, t):
    base, deltas = make_base(torch.float32), make_deltas(3, torch.float32)
    layer = MoEMLP(base, deltas, top_k=2, storage=storage)
    layer.add_fusion_lora(r=2, alpha=4.0)
    trainable = {name for name, prm in layer.named_parameters() if prm.requires_grad}
    assert trainable == {"router.weight"} | {f"fusion_{ab}.{p}" for ab in "AB" for p in PROJECTIONS}
    for p in PROJECTIONS:
        assert layer.fusion_A[p].dtype == torch.float32
        assert torch.count_nonzero(layer.fusion_B[p]) == 0
    with torch.no_grad():  # non-zero B' so that A' gets a gradient too
        for p in PROJECTIONS:
            layer.fusion_B[p].normal_(0, 0.1)
    x = tokens(t, torch.float32)
    y = layer(x)
    probs = layer.router_probs
    assert probs.shape == (t, 3) and probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(t))
    loss = (y**2).mean() - torch.log(probs[:, 0].mean()) + layer.drift_norms().sum()
    loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    for p in PROJECTIONS:
        assert layer.fusion_A[p].grad.abs().sum() > 0
        assert layer.fusion_B[p].grad.abs().sum() > 0
    for name, prm in layer.named_parameters():
        if name not in trainable:
            assert prm.grad is None, name
    for p in PROJECTIONS:
        assert getattr(base, p).weight.grad is None


@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_top1_paths_give_dense_gradients(t):
    """Top-1 on few tokens takes the rank-masked path under autograd too: same gradients as dense."""
    grads = {}
    for storage in ("compact", "dense"):
        base, deltas = make_base(), make_deltas(3)
        layer = MoEMLP(base, deltas, top_k=1, storage=storage, router_weight=router_w(3), decode_threshold=THRESHOLD)
        torch.manual_seed(0)
        layer.add_fusion_lora(r=2, alpha=4.0)
        with torch.no_grad():
            for p in PROJECTIONS:
                layer.fusion_B[p].normal_(0, 0.1)
        y = layer(tokens(t))
        ((y**2).mean() - torch.log(layer.router_probs[:, 0].mean())).backward()
        grads[storage] = {n: prm.grad for n, prm in layer.named_parameters() if prm.requires_grad}
    assert grads["compact"].keys() == grads["dense"].keys()
    for name, g in grads["compact"].items():
        torch.testing.assert_close(g, grads["dense"][name], **F64)
    assert grads["compact"]["router.weight"].abs().sum() > 0


def test_router_probs_can_be_switched_off():
    layer = MoEMLP(make_base(), make_deltas(3))
    layer.record_router_probs = False
    layer(tokens(T_SMALL))
    assert layer.router_probs is None


def test_drift_norms():
    base, deltas = make_base(torch.float32), make_deltas(3, torch.float32)
    layer = MoEMLP(base, deltas)
    assert torch.equal(layer.drift_norms(), torch.zeros(3))
    layer.add_fusion_lora(r=4, alpha=8.0)
    d0 = layer.drift_norms()
    assert d0.shape == (3,) and torch.equal(d0, torch.zeros(3))
    d0.sum().backward()
    for p in PROJECTIONS:
        assert torch.isfinite(layer.fusion_A[p].grad).all() and torch.isfinite(layer.fusion_B[p].grad).all()
        layer.fusion_A[p].grad = layer.fusion_B[p].grad = None
    with torch.no_grad():
        layer.fusion_B["up_proj"][1].normal_(0, 0.05)  # only expert 1 drifts
    d1 = layer.drift_norms()
    assert d1[0] == 0 and d1[2] == 0 and d1[1] > 0
    want = 2.0 * torch.linalg.matrix_norm(layer.fusion_B["up_proj"][1] @ layer.fusion_A["up_proj"][1])
    torch.testing.assert_close(d1[1], want.detach(), rtol=1e-4, atol=1e-6)
    d1.sum().backward()
    for p in PROJECTIONS:
        assert torch.isfinite(layer.fusion_A[p].grad).all() and torch.isfinite(layer.fusion_B[p].grad).all()
    assert layer.fusion_B["up_proj"].grad[1].abs().sum() > 0
    with torch.no_grad():
        layer.fusion_B["up_proj"][1] *= 2
    assert layer.drift_norms()[1] > d1[1]


@pytest.mark.parametrize("storage", ["compact", "dense"])
def test_merge_fusion_lora_keeps_outputs(storage):
    n = 3
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, storage=storage, router_weight=router_w(n))
    layer.add_fusion_lora(r=3, alpha=6.0, dropout=0.1)
    with torch.no_grad():
        for p in PROJECTIONS:
            layer.fusion_B[p].normal_(0, 0.2)
    layer.eval()  # dropout off
    xs, ys = [tokens(T_SMALL), tokens(T_LARGE)], []
    with torch.no_grad():
        ys = [layer(x) for x in xs]
        weights = [[layer.expert_weight(k, p) for p in PROJECTIONS] for k in range(n)]
        for x, y in zip(xs, ys, strict=True):  # fusion LoRA forward == explicit base + s·BA + s'·B'A'
            explicit = [
                {
                    p: w + 2.0 * (layer.fusion_B[p][k] @ layer.fusion_A[p][k])
                    for p, w in expert_weights(base, d).items()
                }
                for k, d in enumerate(deltas)
            ]
            ref = reference(base, deltas, router_w(n), torch.zeros(n), x, 2, weights=explicit)
            torch.testing.assert_close(y, ref, **F64)
        assert (
            ys[1] - MoEMLP(base, deltas, storage=storage, router_weight=router_w(n))(xs[1])
        ).abs().max() > 1e-3
        layer.train()
        assert not torch.allclose(layer(xs[1]), ys[1])  # dropout acts on the fusion LoRA input in train mode
        layer.eval()
    layer.merge_fusion_lora()
    assert not layer.fusion_A and not layer.fusion_B
    assert not any(prm.requires_grad for name, prm in layer.named_parameters() if name != "router.weight")
    with torch.no_grad():
        for x, y in zip(xs, ys, strict=True):
            torch.testing.assert_close(layer(x), y, **F64)
        for k in range(n):
            for p, w in zip(PROJECTIONS, weights[k], strict=True):
                torch.testing.assert_close(layer.expert_weight(k, p), w, **F64)
    # reload recipe from the class docstring: same experts, add + merge, then load_state_dict
    fresh = MoEMLP(make_base(), deltas, storage=storage)
    fresh.add_fusion_lora(r=3, alpha=6.0)
    fresh.merge_fusion_lora()
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(xs[1]), ys[1], **F64)


# ---------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("storage", ["compact", "dense"])
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_bf16_base_matches_fp32(storage, t):
    n = 3
    base_bf16 = make_base(torch.bfloat16)
    base_fp32 = copy.deepcopy(base_bf16).to(torch.float32)  # identical (bf16-representable) weights
    deltas = make_deltas(n, torch.float32)
    rw = router_w(n, torch.float32, scale=0.05)
    layers = {}
    for dt, base in ((torch.bfloat16, base_bf16), (torch.float32, base_fp32)):
        layers[dt] = MoEMLP(base, deltas, top_k=2, storage=storage, router_weight=rw)
        layers[dt].set_expert_bias([2.0, 1.0, -2.0])  # clear top-2 margin: no routing flips between dtypes
    lb = layers[torch.bfloat16]
    assert lb.router.weight.dtype == torch.float32
    if storage == "compact":
        assert lb.gate_proj.weight.dtype == torch.bfloat16 and lb.delta_A["gate_proj"].dtype == torch.float32
    else:
        assert lb.experts["gate_proj"].dtype == torch.bfloat16
    x32 = tokens(t, torch.float32)
    with torch.no_grad():
        y16 = lb(x32.to(torch.bfloat16))
        y32 = layers[torch.float32](x32)
    assert y16.dtype == torch.bfloat16
    assert lb.router_probs.dtype == torch.float32
    scale = y32.abs().max()
    assert (y16.float() - y32).abs().max() < 3e-2 * scale


# ---------------------------------------------------------------------------------------------- cache
def layer_reference(layer: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    weights = [
        {p: layer.expert_weight(k, p, torch.float64) for p in PROJECTIONS} for k in range(layer.num_experts)
    ]
    return reference(
        None, [], layer.router.weight.detach(), layer.expert_bias, x, layer.top_k, weights=weights
    )


@pytest.mark.parametrize("storage", ["compact", "dense"])
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_inference_factor_cache_follows_parameter_updates(storage, t):
    """The cast/stacked factors are cached under no_grad; in-place updates, optimizer steps, reloads,
    add/merge of the fusion LoRA must all be seen by the next forward."""
    n = 3
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, storage=storage, router_weight=router_w(n))
    x = tokens(t)
    fresh_state = copy.deepcopy(layer.state_dict())

    def check():
        with torch.no_grad():
            y = layer(x)
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # cached call == first call
            torch.testing.assert_close(y, layer_reference(layer, x), **F64)
        return y

    y0 = check()
    if storage == "compact":
        for name, prm in (("A", layer.delta_A["gate_proj"]), ("B", layer.delta_B["down_proj"])):
            with torch.no_grad():
                prm.mul_(2.0)  # in place: only the version counter changes
            assert not torch.allclose(check(), y0), name
    layer.load_state_dict(fresh_state)
    torch.testing.assert_close(check(), y0, **F64)
    layer.add_fusion_lora(r=2, alpha=2.0)
    torch.testing.assert_close(check(), y0, **F64)  # B' = 0
    with torch.no_grad():
        layer.fusion_B["down_proj"].normal_(0, 0.1)
    y_fb = check()
    assert not torch.allclose(y_fb, y0)
    with torch.no_grad():
        layer.fusion_A["down_proj"].mul_(-1.0)
    assert not torch.allclose(check(), y_fb)
    opt = torch.optim.SGD([layer.fusion_B[p] for p in PROJECTIONS], lr=1.0)
    layer(x).square().sum().backward()
    opt.step()
    y1 = check()
    assert not torch.allclose(y1, y0)
    layer.merge_fusion_lora()
    torch.testing.assert_close(check(), y1, **F64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [T_SMALL, T_LARGE])
def test_cuda_bf16_compact_matches_dense(t):
    n = 3
    base = make_base(torch.bfloat16).cuda()
    deltas = make_deltas(n, torch.float32)
    rw = router_w(n, torch.float32, scale=0.05)
    layers = [MoEMLP(base, deltas, storage=s, router_weight=rw) for s in ("compact", "dense")]
    for layer in layers:
        layer.set_expert_bias([2.0, 1.0, -2.0])
    assert layers[0].delta_A["gate_proj"].is_cuda and layers[0].router.weight.is_cuda
    x = tokens(t, torch.float32).cuda().to(torch.bfloat16)
    with torch.no_grad():
        yc, yd = (layer(x) for layer in layers)
    assert yc.is_cuda and yc.dtype == torch.bfloat16
    assert (yc.float() - yd.float()).abs().max() < 3e-2 * yd.float().abs().max()


# ---------------------------------------------------------------------------------------------- lean backward
def _composite(g, u, w, a, n_fusion, keep_mask, p):
    """routed_swiglu written with plain autograd ops (the reference)."""
    h = F.silu(g) * u * w.unsqueeze(-1)
    keep = a.shape[0] - n_fusion
    hd = h if keep_mask is None else h * keep_mask / (1 - p)
    return h, torch.cat([h @ a[:keep].t(), hd @ a[keep:].t()], dim=-1)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_routed_swiglu_matches_autograd_composition(p):
    from h3fusion.moe.lowrank import dropout_mask
    from h3fusion.moe.routed_swiglu import routed_swiglu

    gen = torch.Generator().manual_seed(0)
    t, r_keep, r_fus = 7, 3, 2
    leaves = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
              for s in ((t, I), (t, I), (t,), (r_keep + r_fus, I))]
    mask = dropout_mask(leaves[0], p)
    grads_h = torch.randn(t, I, generator=gen, dtype=torch.float64)
    grads_z = torch.randn(t, r_keep + r_fus, generator=gen, dtype=torch.float64)
    outs = {}
    for name, fn in (("lean", routed_swiglu), ("composite", _composite)):
        args = [x.detach().clone().requires_grad_() for x in leaves]
        h, z = fn(*args, r_fus, mask, p) if name == "composite" else fn(*args, r_fus, p, keep_mask=mask)
        ((h * grads_h).sum() + (z * grads_z).sum()).backward()
        outs[name] = [h, z, *(x.grad for x in args)]
    for lean, ref in zip(outs["lean"], outs["composite"], strict=True):
        torch.testing.assert_close(lean, ref, **F64)
    # and torch's own numerical check of the hand-written backward
    args = tuple(x.detach().clone().requires_grad_() for x in leaves)
    assert torch.autograd.gradcheck(lambda g, u, w, a: routed_swiglu(g, u, w, a, r_fus, p, keep_mask=mask), args)


def _saved_activation_rows(layer, x) -> float:
    """[T_e, I]-sized float activations the layer keeps for backward, in rows per routed token.

    Rows of the weights' low-rank factors ([R, I], R <= 6 here) are not activations and are skipped."""
    params = {prm.untyped_storage().data_ptr() for prm in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.is_floating_point() and t.dim() == 2 and t.shape[-1] == I and t.shape[0] > 6 and ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(seen.values()) / (x.shape[1] * layer.top_k * I * x.element_size())


def test_training_path_keeps_two_intermediate_activations_per_routed_token(monkeypatch):
    """Pins the fusion step's memory fix: g and u per routed token (+ a bool dropout mask), not ~7 tensors."""
    base, deltas = make_base(torch.float32), make_deltas(3, torch.float32)
    layer = MoEMLP(base, deltas, top_k=2, storage="compact", decode_threshold=THRESHOLD)
    layer.add_fusion_lora(r=2, alpha=4.0, dropout=0.1)
    layer.train()
    x = tokens(T_LARGE, torch.float32)
    lean = _saved_activation_rows(layer, x)
    assert lean <= 2.0 + 1e-9
    monkeypatch.setattr("h3fusion.moe.compact.is_silu", lambda act: False)  # the plain autograd path
    assert _saved_activation_rows(layer, x) >= 5.5  # g, silu(g), u, silu(g)*u, h, dropout(h)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_path_equals_plain_autograd_path(monkeypatch, dropout):
    base, deltas = make_base(torch.float64), make_deltas(3, torch.float64)
    layer = MoEMLP(base, deltas, top_k=2, storage="compact", decode_threshold=THRESHOLD)
    layer.add_fusion_lora(r=2, alpha=4.0, dropout=dropout)
    with torch.no_grad():
        for p in PROJECTIONS:
            layer.fusion_B[p].normal_(0, 0.1)
    layer.train()
    x = tokens(T_LARGE)
    results = []
    for plain in (False, True):
        if plain:  # both paths draw the same dropout masks (x's, then one [T, I] mask for the down inputs)
            monkeypatch.setattr("h3fusion.moe.compact.is_silu", lambda act: False)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        y = layer(x)
        (y.square().mean() - torch.log(layer.router_probs[:, 0].mean())).backward()
        results.append([y.detach(), *(prm.grad for prm in layer.parameters() if prm.requires_grad)])
    assert all(g is not None and g.abs().sum() > 0 for g in results[0][1:])
    for lean, plain in zip(*results, strict=True):
        torch.testing.assert_close(lean, plain, **F64)


def test_mask_dropout_is_inverted_dropout_keeping_only_a_bool_mask():
    from h3fusion.fusion_dropout import MaskDropout

    drop = MaskDropout(0.25).train()
    x = torch.ones(400, 500, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01  # drop rate p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))  # survivors scaled by 1/(1-p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [torch.bool]  # no float noise kept
    assert drop.eval()(x) is x


def test_shared_input_dropout_gives_siblings_one_mask_per_input():
    from h3fusion.fusion_dropout import SharedInputDropout

    drop = SharedInputDropout(0.5).train()
    x = torch.randn(64, 32)
    first = drop(x)
    assert drop(x) is first  # q, k and v reading the same tensor see the same dropped copy
    other = drop(x.clone())
    assert other is not first and not torch.equal(other, first)  # another tensor: a fresh mask
    y = torch.randn(64, 32)
    before = drop(y)
    y.add_(1.0)  # modified in place: not the same input any more
    assert drop(y) is not before
    assert drop.eval()(x) is x


# ---------------------------------------------------------------------------------------------- sequence routing
def test_sequence_routing_decides_once_per_row_from_its_decision_tokens():
    n, t = 3, 7
    base, deltas, rw = make_base(), make_deltas(n), router_w(n, scale=4.0)
    layer = MoEMLP(base, deltas, top_k=2, router_weight=rw, routing="sequence")
    x = torch.cat([tokens(t, seed=3), tokens(t, seed=4)])  # [2, T, H]
    decide = torch.zeros(2, t, dtype=torch.bool)
    decide[0, 1:4] = True  # row 0 decides from tokens 1-3, row 1 from tokens 2-6
    decide[1, 2:] = True
    layer.routing_inputs.decision_mask = decide
    with torch.no_grad():
        y = layer(x)
    for row in range(2):
        pooled = x[row][decide[row]].mean(dim=0, keepdim=True)  # the row's mean over its decision tokens
        probs = torch.softmax(pooled @ rw.t(), dim=-1)[0]
        top_w, top_i = probs.topk(2)
        top_w = top_w / top_w.sum()
        want = sum(w * mlp_with(expert_weights(base, deltas[k]), x[row]) for w, k in zip(top_w, top_i.tolist(),
                                                                                          strict=True))
        torch.testing.assert_close(y[row], want, **F64)
        torch.testing.assert_close(layer.router_probs.view(2, t, n)[row], probs.expand(t, n), **F64)

    # a continuing decoding step keeps each row's decision (not one from its new token), also after a row
    # left the batch
    decided = layer.router_probs.view(2, t, n)[:, 0].clone()
    step = torch.cat([tokens(1, seed=5), tokens(1, seed=6)])
    layer.routing_inputs.continuing = True
    with torch.no_grad():
        layer(step)
    torch.testing.assert_close(layer.router_probs.view(2, n), decided, **F64)
    fresh = torch.softmax(step.reshape(2, H) @ rw.t(), dim=-1)
    assert (fresh - decided).abs().max() > 1e-3  # deciding anew from the step would differ
    layer.select_rows(torch.tensor([1]))
    with torch.no_grad():
        layer(step[1:])
    torch.testing.assert_close(layer.router_probs.view(1, n), decided[1:], **F64)
    with pytest.raises(RuntimeError, match="select_rows"):
        layer(step)  # two rows, one decision kept


def test_sequence_routing_top1_runs_each_rows_expert_mixed_or_agreeing():
    """One expert per sequence: rows that chose different experts (rank-masked path) and rows that all agree
    (only that expert's factors read) both give each row's expert MLP exactly, at prefill and while decoding
    (mixed, then once only agreeing rows are left)."""
    n, t = 3, 6
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, top_k=1, router_weight=router_w(n, scale=4.0), routing="sequence")
    x = torch.cat([tokens(t, seed=s) for s in (3, 4, 5, 7, 8)])  # [5, T, H]
    with torch.no_grad():
        y = layer(x)
    chosen = layer.sequence_decision.indices[:, 0].tolist()
    assert len(set(chosen)) > 1 and layer.single_expert is None  # a mixed batch
    for row, k in enumerate(chosen):
        torch.testing.assert_close(y[row], mlp_with(expert_weights(base, deltas[k]), x[row]), **F64)
    step = torch.cat([tokens(1, seed=s) for s in (10, 11, 12, 13, 14)])
    layer.routing_inputs.continuing = True
    masks = []
    for _ in range(2):  # decoding steps of the mixed batch (the second reuses the rank masks the first built)
        with torch.no_grad():
            y = layer(step)
        for row, k in enumerate(chosen):
            torch.testing.assert_close(y[row], mlp_with(expert_weights(base, deltas[k]), step[row]), **F64)
        masks.append(layer._rank_mask_cache)
    assert masks[0] is masks[1] and masks[0][0] is layer.sequence_decision.indices
    keep = torch.tensor([row for row, k in enumerate(chosen) if k == chosen[0]])  # the rows that agree
    layer.select_rows(keep)
    with torch.no_grad():
        y = layer(step[keep])
    assert layer.single_expert == chosen[0]
    torch.testing.assert_close(y, mlp_with(expert_weights(base, deltas[chosen[0]]), step[keep]), **F64)


def test_token_routing_ignores_the_decision_mask():
    base, deltas, rw = make_base(), make_deltas(3), router_w(3)
    x = tokens(T_LARGE)
    plain = MoEMLP(base, deltas, router_weight=rw)
    told = MoEMLP(base, deltas, router_weight=rw)
    told.routing_inputs.decision_mask = torch.zeros(1, T_LARGE, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(told(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="routing"):
        MoEMLP(base, deltas, routing="prompt")


# ---------------------------------------------------------------------------------------------- decode fast paths
@pytest.mark.parametrize("routing,top_k", [("token", 2), ("token", 1), ("sequence", 1)])
def test_projections_with_hooks_still_run_as_modules(routing, top_k):
    """The decode paths multiply by a plain nn.Linear's weight directly; a projection with hooks (offloading,
    ZeRO-3 gathering) must still be called, and both give the same numbers."""
    n = 3
    base, deltas, rw = make_base(), make_deltas(n), router_w(n, scale=4.0)
    plain = MoEMLP(base, deltas, top_k=top_k, router_weight=rw, routing=routing)
    hooked = MoEMLP(copy.deepcopy(base), deltas, top_k=top_k, router_weight=rw, routing=routing)
    with torch.no_grad():
        hooked(tokens(1))  # factors prepared before the hooks exist: hooks added later must still run
    calls = []
    for p in PROJECTIONS:
        getattr(hooked, p).register_forward_pre_hook(lambda m, args, p=p: calls.append(p))
    for t in (1, T_SMALL, T_LARGE):
        x = torch.cat([tokens(t, seed=s) for s in (3, 4)])  # [2, T, H]
        with torch.no_grad():
            torch.testing.assert_close(hooked(x), plain(x), rtol=0, atol=1e-12)
            torch.testing.assert_close(plain(x), reference_rows(plain, base, deltas, x), **F64)
        assert set(calls) == set(PROJECTIONS), t
        calls.clear()
    assert plain._prepared(torch.float64).base_t is not None and hooked._prepared(torch.float64).base_t is None


def reference_rows(layer, base, deltas, x):
    """Each row's routed mixture of expert MLPs, routed as ``layer`` routed it (token or sequence)."""
    probs = layer.router_probs.view(*x.shape[:2], -1)
    out = []
    for row in range(x.shape[0]):
        w, i = probs[row].topk(layer.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out.append(torch.stack([sum(w[tok, j] * mlp_with(expert_weights(base, deltas[int(i[tok, j])]), x[row, tok])
                                    for j in range(layer.top_k)) for tok in range(x.shape[1])]))
    return torch.stack(out)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_decoding_steps_reuse_the_factors_their_prompt_prepared(routing):
    """A step that continues a KV cache skips the factor cache's key check (at one token it costs as much as a
    thin matmul): it reads what the prompt's forward prepared; the next prompt, and any forward under autograd,
    sees the live factors."""
    n = 3
    base, deltas = make_base(), make_deltas(n)
    layer = MoEMLP(base, deltas, top_k=1, router_weight=router_w(n, scale=4.0), routing=routing)
    prompt, step = tokens(T_SMALL), tokens(1, seed=9)
    with torch.no_grad():
        layer(prompt)
        layer.routing_inputs.continuing = True
        y_step = layer(step)
        layer.delta_B["gate_proj"].mul_(2.0)  # in place, mid-generation
        torch.testing.assert_close(layer(step), y_step, rtol=0, atol=0)  # the prompt's factors
    changed = layer(step)  # autograd on: live factors
    assert not torch.allclose(changed, y_step)
    layer.routing_inputs.continuing = False
    with torch.no_grad():
        layer(prompt)  # a new prompt validates again
        layer.routing_inputs.continuing = True
        torch.testing.assert_close(layer(step), changed.detach(), **F64)
