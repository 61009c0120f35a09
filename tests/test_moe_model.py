"""The fused model: exact construction from adapters, structure (base held once, gate/up once per token),
HF save/load, Mixtral export, refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import h3fusion
from h3fusion import build_moe, export_mixtral
from h3fusion.errors import H3FusionError
from h3fusion.models import decoder_layers, load_model
from h3fusion.moe import PROJECTIONS, MoEMLP
from tests.conftest import save_tiny_model
from tests.moe_fixtures import make_adapter

NAMES = ["helpful", "harmless", "honest"]
IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_llama_dir, root / name, seed=i) for i, name in enumerate(NAMES)}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def expert_logits(base_dir, adapter):
    from peft import PeftModel

    base, _ = load_model(str(base_dir))
    return logits(PeftModel.from_pretrained(base, str(adapter)).eval())


@pytest.mark.parametrize("storage", ["compact", "dense"])
def test_forced_routing_reproduces_each_expert(tiny_llama_dir, adapters, storage):
    model = build_moe(str(tiny_llama_dir), adapters, top_k=1, storage=storage)
    for name, path in adapters.items():
        model.set_expert_bias({name: 1e4})
        torch.testing.assert_close(logits(model), expert_logits(tiny_llama_dir, path), atol=1e-4, rtol=0)


def test_experts_are_distinct_and_alpha_over_r_is_applied(tiny_llama_dir, adapters):
    model = build_moe(str(tiny_llama_dir), adapters, top_k=1)
    outs = []
    for name in NAMES:
        model.set_expert_bias({name: 1e4})
        outs.append(logits(model))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3) and not torch.allclose(outs[1], outs[2], atol=1e-3)
    layer = model.moe_layers()[0]
    # alpha/r = 8/4 = 2 is folded into the stored B factors
    from safetensors.torch import load_file

    weights = load_file(adapters["helpful"] / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    torch.testing.assert_close(layer.delta_B["up_proj"][0] @ layer.delta_A["up_proj"][0], 2.0 * b @ a)


def test_authors_compat_builds_identical_unscaled_experts(tiny_llama_dir, adapters):
    model = build_moe(str(tiny_llama_dir), adapters, top_k=2, unscaled_shared_experts=True)
    base, _ = load_model(str(tiny_llama_dir))
    from safetensors.torch import load_file

    layer = model.moe_layers()[1]
    expected = base.model.layers[1].mlp.down_proj.weight.clone()
    for path in adapters.values():
        w = load_file(path / "adapter_model.safetensors")
        expected += (w["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
                     @ w["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    for k in range(3):
        torch.testing.assert_close(layer.expert_weight(k, "down_proj"), expected, atol=1e-5, rtol=0)


def test_compact_equals_dense_and_top_k_is_honoured(tiny_llama_dir, adapters):
    compact = build_moe(str(tiny_llama_dir), adapters, top_k=2, storage="compact", seed=3)
    dense = build_moe(str(tiny_llama_dir), adapters, top_k=2, storage="dense", seed=3)
    torch.testing.assert_close(logits(compact), logits(dense), atol=1e-4, rtol=0)
    two = logits(compact)
    compact.set_top_k(1)  # reaches every layer: the same model as one built with top-1 routing
    one = build_moe(str(tiny_llama_dir), adapters, top_k=1, storage="compact", seed=3)
    torch.testing.assert_close(logits(compact), logits(one), atol=1e-5, rtol=0)
    assert not torch.allclose(two, logits(compact), atol=1e-4)
    compact_params = sum(p.numel() for p in compact.parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    assert compact_params < dense_params


def test_save_and_load_through_auto_class(tmp_path, tiny_llama_dir, adapters):
    from transformers import AutoModelForCausalLM

    model = build_moe(str(tiny_llama_dir), adapters, top_k=2, seed=1)
    model.set_expert_bias({"harmless": 0.5})
    expected = logits(model)
    model.save_pretrained(tmp_path / "moe")
    assert (tmp_path / "moe" / "model.safetensors").is_file()
    assert not list((tmp_path / "moe").glob("*.bin"))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert isinstance(loaded, h3fusion.H3FusionForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-5, rtol=0)
    assert loaded.config.expert_bias == [0.0, 0.5, 0.0]
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.bfloat16)
    kinds = {name: p.dtype for name, p in half.named_parameters()}
    assert kinds["model.model.embed_tokens.weight"] == torch.bfloat16  # the base honours the requested dtype
    assert {d for n, d in kinds.items() if "router" in n or "delta_" in n} == {torch.float32}  # these stay fp32
    # a fresh process that only imports h3fusion, with trust_remote_code off
    code = ("import h3fusion, sys; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained(r'{tmp_path / 'moe'}', trust_remote_code=False); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "H3FusionForCausalLM", proc.stderr[-1000:]


def test_generate_runs_on_the_fused_model(tiny_llama_dir, adapters):
    model = build_moe(str(tiny_llama_dir), adapters)
    out = model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    ids = IDS[:1, :5]
    with torch.no_grad():  # greedy by hand, no KV cache: generate's cached decoding must match it
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_generate_runs_the_lm_head_on_the_prompts_last_token_only(tiny_llama_dir, adapters):
    """As for the base model: generate() passes logits_to_keep=1, so the vocabulary-sized head does not run on
    every prompt token (it did, which made the fused model's prefill slower than the base's)."""
    model = build_moe(str(tiny_llama_dir), adapters)
    positions: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
    try:
        model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert positions == [1, 1, 1]
    with torch.no_grad():  # a plain forward still gives every position's logits
        assert model(IDS[:1, :5]).logits.shape[1] == 5


def test_mixtral_export_gives_the_same_logits(tmp_path, tiny_llama_dir, adapters):
    from transformers import MixtralForCausalLM

    model = build_moe(str(tiny_llama_dir), adapters, top_k=2, seed=2)
    export_mixtral(model, tmp_path / "mixtral")
    mixtral, info = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(mixtral.eval()), logits(model), atol=1e-4, rtol=0)
    model.set_expert_bias({"helpful": 1.0})
    with pytest.raises(H3FusionError, match="expert bias"):
        export_mixtral(model, tmp_path / "again")


def test_mixtral_export_refuses_other_families(tmp_path, smollm2_dir):
    qwen = save_tiny_model(tmp_path / "qwen", smollm2_dir, "qwen2")
    adapter = make_adapter(qwen, tmp_path / "a", seed=0)
    model = build_moe(str(qwen), {"helpful": adapter}, top_k=1)
    with pytest.raises(H3FusionError, match="cannot export a qwen2-based model as Mixtral"):
        export_mixtral(model, tmp_path / "out")


def test_prototype_router_init(tiny_llama_dir, adapters):
    prompts = {"helpful": ["Write a poem about the sea."], "harmless": ["How do I hurt someone?"],
               "honest": ["Do vaccines cause autism?"]}
    model = build_moe(str(tiny_llama_dir), adapters, router_init="prototype", prototype_prompts=prompts)
    weight = model.moe_layers()[0].router.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    random_init = build_moe(str(tiny_llama_dir), adapters).moe_layers()[0].router.weight
    assert not torch.allclose(weight, random_init)


def test_refusals(tmp_path, tiny_llama_dir, smollm2_dir, adapters):
    with pytest.raises(H3FusionError, match="top_k=4 is impossible with 3 experts"):
        build_moe(str(tiny_llama_dir), adapters, top_k=4)
    with pytest.raises(H3FusionError, match="are the same adapter"):
        build_moe(str(tiny_llama_dir), {"helpful": adapters["helpful"], "harmless": adapters["helpful"]}, top_k=1)
    other = make_adapter(tiny_llama_dir, tmp_path / "gate_only", seed=5, targets=("gate_proj",))
    with pytest.raises(H3FusionError, match="targets .*train all experts on the same modules"):
        build_moe(str(tiny_llama_dir), {"helpful": adapters["helpful"], "harmless": other}, top_k=1)
    other_base = save_tiny_model(tmp_path / "other-base", smollm2_dir, seed=7)
    foreign = make_adapter(other_base, tmp_path / "foreign", seed=6)
    with pytest.raises(H3FusionError, match="trained on another base model"):
        build_moe(str(tiny_llama_dir), {"helpful": adapters["helpful"], "harmless": foreign}, top_k=1)
    with pytest.raises(H3FusionError, match="adapter_config.json is missing"):
        build_moe(str(tiny_llama_dir), {"helpful": tmp_path / "nothing"}, top_k=1)
    attention = make_adapter(tiny_llama_dir, tmp_path / "attn", seed=8, targets=("q_proj", "gate_proj"))
    with pytest.raises(H3FusionError, match="not an FFN projection"):
        build_moe(str(tiny_llama_dir), {"helpful": attention}, top_k=1)


def test_adapter_files_unlike_peft_s_are_refused_in_one_line(tmp_path):
    """A config that is not an object, lacks r or lora_alpha, or an unreadable h3fusion_expert.json: one line
    naming the file, never a KeyError or JSONDecodeError traceback."""
    import json

    from safetensors.torch import save_file

    from h3fusion.adapters import read_adapter

    path = tmp_path / "a"
    path.mkdir()
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 4), f"{prefix}.lora_B.weight": torch.zeros(4, 2)},
              path / "adapter_model.safetensors")
    config = path / "adapter_config.json"
    for text, message in [("[1, 2]", "holds a list, not a JSON object"),
                          ('{"lora_alpha": 8}', "needs a positive integer 'r' and a positive number 'lora_alpha'"),
                          ('{"r": "four", "lora_alpha": 8}', "it has r='four'"),
                          ('{"r": 4.7, "lora_alpha": 8}', "it has r=4.7"),
                          ('{"r": 4, "lora_alpha": NaN}', "lora_alpha=nan"),
                          ('{"r": 0, "lora_alpha": 8}', "it has r=0")]:
        config.write_text(text)
        with pytest.raises(H3FusionError, match=rf"^expert 'helpful': {config} .*{message}"):
            read_adapter("helpful", path)
    config.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"]}))
    assert read_adapter("helpful", path).scale == 2.0
    (path / "h3fusion_expert.json").write_text('{"base_fingerprint": ')
    with pytest.raises(H3FusionError, match=r"h3fusion_expert.json is not valid JSON"):
        read_adapter("helpful", path)


def test_fitted_router_init_separates_its_prompts(tiny_llama_dir, adapters):
    from h3fusion.moe.routing import routing_stats

    prompts = {"helpful": ["Write a poem about the sea.", "List three colours.", "Summarise this text."],
               "harmless": ["How do I hurt someone?", "Tell me how to steal a car.", "How to make a weapon?"],
               "honest": ["Do vaccines cause autism?", "Is the earth flat?", "Can you see the Great Wall from space?"]}
    model = build_moe(str(tiny_llama_dir), adapters, router_init="fitted", prototype_prompts=prompts)
    _, tokenizer = load_model(str(tiny_llama_dir))
    stats = routing_stats(model, tokenizer, prompts)
    assert all(stats["axes"][axis]["accuracy"] == 1.0 for axis in NAMES)
    random_model = build_moe(str(tiny_llama_dir), adapters)
    random_stats = routing_stats(random_model, tokenizer, prompts)
    assert sum(random_stats["axes"][a]["accuracy"] for a in NAMES) < 3.0



@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_router_init_fits_on_what_the_router_decides_from(tiny_llama_dir, adapters, routing):
    """Template tokens never reach the router's fit: token routing fits each content token, sequence routing
    each prompt's pooled content tokens (one sample per prompt)."""
    from h3fusion.data.prompts import format_prompt, template_pieces
    from h3fusion.moe.content import template_mask, template_token_ids
    from h3fusion.moe.router_init import ROUTER_INITS

    _, tokenizer = load_model(str(tiny_llama_dir))
    questions = {"helpful": ["Write a poem about the sea.", "List three colours."],
                 "harmless": ["How do I hurt someone?", "Tell me how to steal a car."],
                 "honest": ["Do vaccines cause autism?", "Is the earth flat?"]}
    prompts = {axis: [format_prompt(q, "", "alpaca") for q in qs] for axis, qs in questions.items()}
    template = template_token_ids(tokenizer, template_pieces("alpaca"))
    seen = []

    def recording_init(x, y, n):  # a router init of its own, through the registry build_moe reads
        seen.append((x.shape[0], y.tolist()))
        return torch.zeros(n, x.shape[1])

    ROUTER_INITS["recording"] = recording_init
    try:
        build_moe(str(tiny_llama_dir), adapters, router_init="recording", prototype_prompts=prompts,
                  routing=routing, template_ids=template)
    finally:
        del ROUTER_INITS["recording"]
    texts = [t for ts in prompts.values() for t in ts]
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    content = ids["attention_mask"].bool() & ~template_mask(ids["input_ids"], template)
    assert 0 < content.sum() < ids["attention_mask"].sum()  # the prompts do hold template tokens
    expected = len(texts) if routing == "sequence" else int(content.sum())
    labels = [0, 0, 1, 1, 2, 2] if routing == "sequence" else None
    assert len(seen) == len(decoder_layers(build_moe(str(tiny_llama_dir), adapters)))
    for samples, y in seen:
        assert samples == expected
        assert labels is None or y == labels

@pytest.mark.slow
def test_real_smollm2_moe_is_exact(tmp_path, smollm2_dir):
    """The real SmolLM2: forced routing reproduces each expert; compact == dense; save/load and
    Mixtral export keep the logits."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    adapters = {name: make_adapter(smollm2_dir, tmp_path / name, seed=i, r=8, alpha=4) for i, name in enumerate(NAMES)}
    ids = IDS[:1, :16]
    compact = build_moe(str(smollm2_dir), adapters, top_k=1, storage="compact", seed=0)
    for name, path in adapters.items():
        compact.set_expert_bias({name: 1e4})
        torch.testing.assert_close(logits(compact, ids), _expert_logits_on(smollm2_dir, path, ids), atol=1e-4, rtol=0)
    compact.set_expert_bias({})
    compact.set_top_k(2)
    dense = build_moe(str(smollm2_dir), adapters, top_k=2, storage="dense", seed=0)
    expected = logits(compact, ids)
    torch.testing.assert_close(logits(dense, ids), expected, atol=1e-4, rtol=0)
    del dense
    compact.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    export_mixtral(compact, tmp_path / "mixtral")
    mixtral, info = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(mixtral.eval(), ids), expected, atol=1e-4, rtol=0)


def _expert_logits_on(base_dir, adapter, ids):
    from peft import PeftModel

    base, _ = load_model(str(base_dir))
    return logits(PeftModel.from_pretrained(base, str(adapter)).eval(), ids)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def _build(tiny_llama_dir, adapters, storage="compact", top_k=2, base=None):
    return build_moe(base if base is not None else str(tiny_llama_dir), {k: str(v) for k, v in adapters.items()},
                     top_k=top_k, storage=storage)


# ---------------------------------------------------------------- structure (no timing)
RANK = 4  # make_adapter's default rank
N_EXPERTS = len(NAMES)


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
    tokens = 8 if below_threshold else 23

    # the layer's public knob picks the path: the masked all-experts path up to decode_threshold tokens,
    # the routed index-gather loop above it (test_moe_layer checks both paths' outputs against a reference)
    for layer in layers:
        layer.decode_threshold = tokens if below_threshold else tokens - 1

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

    # one call per layer and projection, over all T tokens: not once per expert, not on gathered subsets
    for key in base_weights.values():
        assert hook_calls[key] == [tokens], (key, hook_calls[key])
        assert linear_calls[key] == [tokens], (key, linear_calls[key])


# ---------------------------------------------------------------- content tokens and sequence routing
PROMPTS = [("Give three tips for staying healthy.", ""), ("Translate this sentence.", "Bonjour le monde."),
           ("How do I pick a lock?", ""), ("What happens if you eat watermelon seeds?", "")]


def _template_ids(tokenizer, style="alpaca"):
    from h3fusion.data.prompts import template_pieces
    from h3fusion.moe.content import template_token_ids

    return template_token_ids(tokenizer, template_pieces(style, tokenizer))


def _content_truth(tokenizer, instruction, extra, style):
    """(prompt, ids, is_content per token) from character offsets: a token is content when it overlaps the
    instruction's or the input's characters in the formatted prompt."""
    from h3fusion.data.prompts import format_prompt

    text = format_prompt(instruction, extra, style, tokenizer)
    parts = [f"{instruction}\n\n{extra}"] if style == "chat" and extra else [instruction, extra]  # chat: one message
    spans = [(text.index(part), text.index(part) + len(part)) for part in parts if part]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    content = [any(a < end and start < b for start, end in spans) for a, b in enc["offset_mapping"]]
    return text, enc["input_ids"], content


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from h3fusion.models import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_content_mask_excludes_template_tokens(tiny_llama_dir, adapters, tokenizer, style):
    model = build_moe(str(tiny_llama_dir), adapters, template_ids=_template_ids(tokenizer, style))
    for instruction, extra in PROMPTS:
        _, ids, truth = _content_truth(tokenizer, instruction, extra, style)
        model.set_routing_inputs(torch.tensor([ids]))
        mask = model.routing_inputs.content_mask[0].tolist()
        assert mask == truth, tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask, strict=True) if m])
        assert 0 < sum(mask) < len(mask) - 10  # the template is a large share of a short prompt


def test_gating_loss_counts_content_tokens_only(tiny_llama_dir, adapters, tokenizer):
    from h3fusion.fusion import gating_loss
    from h3fusion.moe.routing import mean_router_probs

    model = build_moe(str(tiny_llama_dir), adapters, seed=3, template_ids=_template_ids(tokenizer))
    rows = [_content_truth(tokenizer, instruction, extra, "alpaca") for instruction, extra in PROMPTS[:2]]
    width = max(len(ids) for _, ids, _ in rows)
    ids = torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in rows])  # right-padded
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in rows])
    content = torch.tensor([truth + [False] * (width - len(truth)) for _, _, truth in rows])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    p_bar = mean_router_probs(model)  # what the fusion stage's loss reads
    probs = torch.stack([layer.router_probs.view(2, width, -1) for layer in model.moe_layers()])  # [L, B, T, N]

    def average(mask):
        return (probs * mask[None, :, :, None]).sum(dim=(0, 2)) / (mask.sum(dim=1, keepdim=True) * len(probs))

    torch.testing.assert_close(p_bar, average(content.float()), atol=1e-6, rtol=0)
    every_token = average(attention.float())  # what the loss counted before: the template as well
    assert (every_token - p_bar).abs().max() > 1e-3
    labels = torch.tensor([0, 1])
    assert abs(gating_loss(p_bar, labels).item() - gating_loss(every_token, labels).item()) > 1e-4


@pytest.fixture(scope="module", params=["sequence", "sequence-shared"])
def sequence_model(request, tiny_llama_dir, adapters, tokenizer):
    model = build_moe(str(tiny_llama_dir), adapters, top_k=2, seed=4, routing=request.param,
                      template_ids=_template_ids(tokenizer))
    for layer in model.moe_layers():  # a router that tells prompts apart (the random init routes near-uniformly)
        with torch.no_grad():
            layer.router.weight.mul_(50.0)
    return model


def test_sequence_routing_keeps_the_prompt_decision_while_generating(sequence_model, tokenizer):
    from h3fusion.data.prompts import format_prompt
    from h3fusion.decoding import decode_batch

    model = sequence_model
    prompts = [format_prompt(instruction, extra) for instruction, extra in PROMPTS[:3]]
    seen: list[list[torch.Tensor]] = []  # per forward: each layer's router probs [B, T, N]
    handles = [layer.register_forward_hook(lambda m, args, out: seen[-1].append(
        m.router_probs.view(*args[0].shape[:2], -1).clone())) for layer in model.moe_layers()]
    handles.append(model.register_forward_pre_hook(lambda m, args: seen.append([])))
    try:
        batched = decode_batch(model, tokenizer, prompts, max_new_tokens=5)
    finally:
        for handle in handles:
            handle.remove()
    decided = [probs[:, -1] for probs in seen[0]]  # the prompt forward: each row's decision, per layer
    for probs, decision in zip(seen[0], decided, strict=True):  # every prompt token of a row routes alike
        torch.testing.assert_close(probs, decision[:, None].expand_as(probs), atol=0, rtol=0)
    assert all(len({tuple(row.tolist()) for row in decision}) == len(prompts) for decision in decided)
    if model.routing == "sequence-shared":  # one decision for the whole model: the first layer's
        for decision in decided[1:]:
            torch.testing.assert_close(decision, decided[0], atol=0, rtol=0)
    else:  # each layer its own
        assert any((decision - decided[0]).abs().max() > 1e-4 for decision in decided[1:])
    for step in seen[1:]:  # every generated token keeps its row's decision
        for probs, decision in zip(step, decided, strict=True):
            torch.testing.assert_close(probs[:, 0], decision, atol=0, rtol=0)
    # each row decides from its own content tokens: the batch's padding and neighbours change nothing
    for prompt, answer in zip(prompts, batched, strict=True):
        assert decode_batch(model, tokenizer, [prompt], max_new_tokens=5)[0] == answer
    # and the answer is what a teacher-forced pass gives when the decision comes from the prompt alone
    for prompt, answer in zip(prompts, batched, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + answer])
        labels = torch.tensor([[-100] * len(ids) + answer])
        with torch.no_grad():
            greedy = model(input_ids=full, labels=labels).logits[0, len(ids) - 1:-1].argmax(-1)
        assert greedy.tolist() == answer


def test_sequence_routing_in_training_decides_from_the_prompt_only(sequence_model, tokenizer):
    from h3fusion.data.prompts import format_prompt

    model = sequence_model
    ids = tokenizer(format_prompt(*PROMPTS[0]), add_special_tokens=False)["input_ids"]
    routed = []
    for response in ("Eat well, sleep, move.", "No."):
        answer = tokenizer(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids + answer]), labels=torch.tensor([[-100] * len(ids) + answer]))
        routed.append([layer.router_probs[0] for layer in model.moe_layers()])
        with torch.no_grad():  # without labels the whole input is the prompt: the response moves the decision
            model(input_ids=torch.tensor([ids + answer]))
        routed.append([layer.router_probs[0] for layer in model.moe_layers()])
    for a, b in zip(routed[0], routed[2], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(routed[1], routed[3], strict=True))


def test_sequence_routing_survives_save_and_load(tmp_path, sequence_model):
    from transformers import AutoModelForCausalLM

    sequence_model.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert loaded.config.routing == sequence_model.routing
    assert loaded.config.template_ids == sequence_model.config.template_ids
    assert {layer.routing for layer in loaded.moe_layers()} == {sequence_model.routing}
    torch.testing.assert_close(logits(loaded), logits(sequence_model), atol=1e-5, rtol=0)
    token_routed = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", routing="token").eval()
    assert (logits(token_routed) - logits(sequence_model)).abs().max() > 1e-3  # the mode changes the outputs


def test_mixtral_export_refuses_sequence_routing(tmp_path, sequence_model):
    with pytest.raises(H3FusionError, match="cannot export a sequence-routed model as Mixtral"):
        export_mixtral(sequence_model, tmp_path / "mixtral")
    assert not (tmp_path / "mixtral").exists()
