"""Weight-merge baselines: each merge against hand-computed examples, and merge_experts on real adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from h3fusion.baselines import METHODS, dare, linear, merge_experts, svd_lora, task_arithmetic, ties
from h3fusion.errors import H3FusionError
from h3fusion.models import decoder_layers, load_model
from h3fusion.moe import PROJECTIONS
from tests.moe_fixtures import make_adapter

# Three task vectors of one 2x3 matrix, with sign conflicts and small entries that trimming drops.
T1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.1, -0.2]])
T2 = torch.tensor([[-3.0, 1.0, 0.4], [2.0, -0.3, 0.6]])
T3 = torch.tensor([[2.5, -0.5, -4.0], [-1.0, 0.25, 0.7]])
TASKS = [T1, T2, T3]


# --------------------------------------------------------------------------- pure merges


def test_linear_mean_and_weighted():
    a, b, c = torch.tensor([[2.0, -4.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 8.0]])
    assert_close(linear([a, b, c]), torch.tensor([[2.0, 4.0 / 3.0]]))
    # (1·a + 2·b + 1·c) / 4 = ([2+8+0, -4+0+8]) / 4
    assert_close(linear([a, b, c], weights=[1, 2, 1]), torch.tensor([[2.5, 1.0]]))
    assert_close(linear([a, b, c], weights=[0, 1, 0]), b)  # only ratios matter, zeros allowed


def test_task_arithmetic_scales_the_sum():
    a, b, c = torch.tensor([[2.0, -4.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 8.0]])
    assert_close(task_arithmetic([a, b, c], lam=0.5), torch.tensor([[3.0, 2.0]]))  # 0.5 · [6, 4]
    assert_close(task_arithmetic([a, b, c]), 0.4 * torch.tensor([[6.0, 4.0]]))  # documented default λ
    assert task_arithmetic([a.half(), b.half(), c.half()], lam=1.0).dtype == torch.float32


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    # density 0.5 keeps the 3 largest |values| of each task's 6:
    #   T1 -> [[1, -2, 0], [3, 0, 0]]    T2 -> [[-3, 1, 0], [2, 0, 0]]    T3 -> [[2.5, 0, -4], [-1, 0, 0]]
    # [0,0]: 1-3+2.5 = +0.5 -> +, mean(1, 2.5) = 1.75 (the disagreeing -3 is excluded)
    # [0,1]: -2+1+0  = -1   -> -, mean(-2) = -2 (T2's +1 disagrees; T3's -0.5 was trimmed)
    # [0,2]: 0+0-4          -> -, -4 (the small +0.5 and +0.4 were trimmed)
    # [1,0]: 3+2-1   = +4   -> +, mean(3, 2) = 2.5
    # [1,1], [1,2]: everything trimmed -> 0
    expected = torch.tensor([[1.75, -2.0, -4.0], [2.5, 0.0, 0.0]])
    assert_close(ties(TASKS, density=0.5), expected)
    assert_close(ties(TASKS, density=0.5, lam=2.0), 2 * expected)


def test_ties_without_trimming():
    # density 1: sign election + disjoint mean on the full values
    # [0,1]: -2+1-0.5 -> -, mean(-2, -0.5) = -1.25;  [0,2]: 0.5+0.4-4 -> -, -4
    # [1,1]: 0.1-0.3+0.25 -> +, mean(0.1, 0.25) = 0.175;  [1,2]: -0.2+0.6+0.7 -> +, mean(0.6, 0.7) = 0.65
    expected = torch.tensor([[1.75, -1.25, -4.0], [2.5, 0.175, 0.65]])
    assert_close(ties(TASKS, density=1.0), expected)


def test_ties_edge_cases():
    # an exactly cancelling entry elects sign 0: no task agrees, the result is 0
    assert_close(
        ties([torch.tensor([1.0, 5.0]), torch.tensor([-1.0, 1.0])], density=1.0), torch.tensor([0.0, 3.0])
    )
    # tiny densities still keep one entry per task; magnitude ties at the threshold are all kept
    assert_close(ties([torch.tensor([1.0, -3.0, 2.0])], density=0.01), torch.tensor([0.0, -3.0, 0.0]))
    assert_close(ties([torch.tensor([2.0, -2.0, 1.0])], density=0.3), torch.tensor([2.0, -2.0, 0.0]))


def test_dare_without_dropping_is_task_arithmetic():
    assert_close(dare(TASKS, drop=0.0, lam=0.7), task_arithmetic(TASKS, lam=0.7))
    assert_close(dare(TASKS, drop=0.0, use_ties_sign=True), ties(TASKS, density=1.0))


def test_dare_drops_and_rescales_each_entry():
    delta = torch.arange(1.0, 201.0).reshape(10, 20)
    out = dare([delta], drop=0.75, seed=3)
    kept = out != 0
    assert_close(out[kept], delta[kept] * 4)  # survivors rescaled by 1/(1-p)
    assert 0.1 < kept.float().mean() < 0.4  # about 1 - p of the entries survive
    assert_close(dare([delta], drop=0.75, seed=3, rescale=False)[kept], delta[kept])


def test_dare_rescaling_keeps_the_expectation():
    # one task: each entry is x/(1-p) w.p. 1-p, else 0; with p = 0.5 its std is |x|, so the mean of
    # 4000 seeds has std |x|/63 and 0.1·|x| is > 6 sigma
    seeds = 4000
    mean = sum(dare([T1], drop=0.5, seed=s) for s in range(seeds)) / seeds
    assert_close(mean, T1, rtol=0.1, atol=0.0)
    no_rescale = sum(dare([T1], drop=0.5, seed=s, rescale=False) for s in range(seeds)) / seeds
    assert_close(no_rescale, 0.5 * T1, rtol=0.1, atol=0.0)  # E = (1-p)·x without rescaling


def test_dare_is_deterministic_under_a_seed():
    assert torch.equal(dare(TASKS, seed=7), dare(TASKS, seed=7))
    assert torch.equal(dare(TASKS, seed=7, use_ties_sign=True), dare(TASKS, seed=7, use_ties_sign=True))
    big = [torch.randn(16, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    assert not torch.equal(dare(big, drop=0.5, seed=1), dare(big, drop=0.5, seed=2))


def test_dare_ties_elects_sign_over_survivors():
    # one task: the disjoint mean of a single survivor set is that set, same masks as plain DARE
    assert torch.equal(dare([T1], drop=0.5, seed=5, use_ties_sign=True), dare([T1], drop=0.5, seed=5))
    # surviving entries that cancel exactly elect sign 0 and give 0
    assert torch.equal(dare([T1, -T1], drop=0.0, use_ties_sign=True), torch.zeros_like(T1))
    # with dropping, every entry is 0 or the mean of some survivors x_k/(1-p) of one sign
    out = dare(TASKS, drop=0.5, seed=5, use_ties_sign=True)
    assert (out.abs() <= 2 * torch.stack(TASKS).abs().amax(dim=0) + 1e-6).all()


def test_svd_lora_is_exact_at_full_rank_and_best_truncation_below():
    delta = linear(TASKS)
    a, b = svd_lora(delta, 2)
    assert a.shape == (2, 3) and b.shape == (2, 2)
    assert_close(b @ a, delta)
    a1, b1 = svd_lora(delta, 1)
    s = torch.linalg.svdvals(delta)
    assert_close(torch.linalg.matrix_norm(delta - b1 @ a1), s[1])  # Eckart–Young
    with pytest.raises(H3FusionError, match="rank"):
        svd_lora(delta, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ties(TASKS, density=0.0), "density"),
        (lambda: ties(TASKS, density=1.5), "density"),
        (lambda: ties(TASKS, lam=0.0), "lam"),
        (lambda: dare(TASKS, drop=1.0), "drop"),
        (lambda: dare(TASKS, drop=-0.1), "drop"),
        (lambda: task_arithmetic(TASKS, lam=-1.0), "lam"),
        (lambda: linear(TASKS, weights=[1, 1]), "weights"),
        (lambda: linear(TASKS, weights=[1, -1, 1]), "weights"),
        (lambda: linear(TASKS, weights=[0, 0, 0]), "weights"),
        (lambda: linear([T1, torch.zeros(3, 2)]), "shape"),
        (lambda: linear([]), "at least one"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(call, match):
    with pytest.raises(H3FusionError, match=match):
        call()


# --------------------------------------------------------------------------- whole models

NAMES = ("helpful", "harmless", "honest")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("merge-adapters")
    return {n: str(make_adapter(tiny_llama_dir, root / n, seed=10 + i)) for i, n in enumerate(NAMES)}


def exact_delta(adapter_dir, layer, proj):
    """s·B@A straight from the adapter files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = f"layers.{layer}.mlp.{proj}."
    a = next(v for k, v in weights.items() if prefix + "lora_A" in k)
    b = next(v for k, v in weights.items() if prefix + "lora_B" in k)
    return config["lora_alpha"] / config["r"] * (b.float() @ a.float())


def test_linear_merge_adds_the_mean_exact_delta(adapters, tiny_llama_dir, tmp_path):
    base, _ = load_model(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge_experts(base, adapters, "linear")
    assert merged is base
    after = merged.state_dict()
    for i in range(len(decoder_layers(merged))):
        for proj in PROJECTIONS:
            key = f"model.layers.{i}.mlp.{proj}.weight"
            deltas = [exact_delta(Path(p), i, proj) for p in adapters.values()]
            expected = before[key] + (deltas[0] + deltas[1] + deltas[2]) / 3
            assert torch.equal(after[key], expected), (
                (after[key] - expected).abs().max()
            )  # same ops, same order: bitwise
            assert not torch.equal(after[key], before[key])
    untouched = [k for k in before if ".mlp." not in k]
    assert any("self_attn" in k for k in untouched)
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    merged.save_pretrained(tmp_path / "merged")  # still a plain, savable causal LM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(
        reloaded.state_dict()["model.layers.0.mlp.gate_proj.weight"],
        after["model.layers.0.mlp.gate_proj.weight"],
    )


def test_every_method_merges_and_dare_is_seeded(adapters, tiny_llama_dir):
    base, _ = load_model(str(tiny_llama_dir))
    key = "model.layers.1.mlp.down_proj.weight"
    original = base.state_dict()[key].clone()
    results = {}
    for method, hyper in [
        ("task-arithmetic", {"lam": 0.5}),
        ("ties", {"density": 0.3}),
        ("dare", {"drop": 0.5, "seed": 1}),
        ("dare", {"drop": 0.5, "seed": 1}),
        ("dare", {"drop": 0.5, "seed": 2, "use_ties_sign": True}),
    ]:
        model = merge_experts(str(tiny_llama_dir), adapters, method, **hyper)
        results.setdefault(method, []).append(model.state_dict()[key])
        assert not torch.equal(results[method][-1], original)
    assert torch.equal(results["dare"][0], results["dare"][1])
    assert not torch.equal(results["dare"][0], results["dare"][2])
    # task arithmetic with λ = 0.5 is 1.5x the mean of three
    deltas = [exact_delta(Path(p), 1, "down_proj") for p in adapters.values()]
    assert_close(results["task-arithmetic"][0], original + 0.5 * sum(deltas), rtol=1e-6, atol=1e-7)


def test_weights_by_name(adapters, tiny_llama_dir):
    a, _ = load_model(str(tiny_llama_dir))
    b, _ = load_model(str(tiny_llama_dir))
    merge_experts(a, adapters, "linear", weights={"honest": 1, "helpful": 2, "harmless": 3})
    merge_experts(b, adapters, "linear", weights=[2, 3, 1])
    assert torch.equal(
        a.state_dict()["model.layers.0.mlp.up_proj.weight"],
        b.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


@pytest.mark.parametrize(
    "method, hyper, match",
    [
        ("slerp", {}, "linear, task-arithmetic, ties, dare"),
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.2}, "density"),
        ("dare", {"drop": 1.0}, "drop"),
        ("task-arithmetic", {"lam": 0}, "lam"),
        ("linear", {"density": 0.2}, "weights"),  # names the hyperparameters it does take
        ("linear", {"weights": [1, 1]}, "one weight per expert"),
        ("linear", {"weights": {"helpful": 1}}, "one weight per expert"),
    ],
)
def test_merge_experts_refuses_bad_requests(adapters, tiny_llama_dir, method, hyper, match):
    base, _ = load_model(str(tiny_llama_dir))
    before = base.state_dict()["model.layers.0.mlp.gate_proj.weight"].clone()
    with pytest.raises(H3FusionError, match=match):
        merge_experts(base, adapters, method, **hyper)
    assert torch.equal(base.state_dict()["model.layers.0.mlp.gate_proj.weight"], before)


def test_merge_experts_checks_the_adapters(adapters, tiny_llama_dir):
    base, _ = load_model(str(tiny_llama_dir))
    with pytest.raises(H3FusionError, match="same adapter"):
        merge_experts(base, {"a": adapters["helpful"], "b": adapters["helpful"]}, "linear")


def test_every_configurable_merge_is_implemented():
    """baselines.merges names each method the config accepts (config.MERGE_METHODS), and no other."""
    from h3fusion.config import MERGE_METHODS

    assert tuple(METHODS) == MERGE_METHODS
