"""Weight-merge baselines: the expert adapters folded into ONE dense model instead of an MoE.

Every merge works on the exact per-expert weight deltas of one projection,
``ΔW_k = s_k · B_k @ A_k`` (``s_k`` = alpha/r, or alpha/√r with rsLoRA), never on the LoRA factors:
PEFT's non-SVD ``add_weighted_adapter`` modes combine the A's and the B's separately, which adds
cross-terms ``B_j A_k`` (j ≠ k) that no expert contains.

The pure functions take a list of same-shaped delta tensors (one per expert), compute in fp32 and
return the merged delta. Sparsification (TIES trimming, DARE dropping) is per tensor, i.e. per
(layer, projection) matrix, as in mergekit; the TIES paper trims the whole flattened task vector.

======================  =====================================================================
``linear``              Σ_k w_k ΔW_k / Σ_k w_k                       (default w_k = 1: the mean)
``task_arithmetic``     λ · Σ_k ΔW_k                                  (Ilharco et al. 2023)
``ties``                λ · disjoint_mean(trim_density(ΔW_k))        (Yadav et al. 2023)
``dare``                λ · Σ_k m_k ⊙ ΔW_k / (1-p),  m_k ~ Bernoulli(1-p)   (Yu et al. 2023)
``dare`` + ties sign    λ · disjoint_mean(m_k ⊙ ΔW_k / (1-p))        (DARE-TIES)
======================  =====================================================================

``merge_experts`` reads the PEFT adapters, merges every adapted (layer, projection) with one of these
(``METHODS``) and adds the result into the base weights in place: the model stays a plain HF causal LM.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from h3fusion.errors import H3FusionError

__all__ = ["METHODS", "dare", "linear", "merge_experts", "svd_lora", "task_arithmetic", "ties"]


# --------------------------------------------------------------------------- validation


def _stack(deltas: Sequence[Tensor]) -> Tensor:
    """[N, *shape] fp32 stack of N same-shaped deltas."""
    deltas = list(deltas)
    if not deltas:
        raise H3FusionError("no deltas to merge; give at least one expert")
    shape = deltas[0].shape
    for k, delta in enumerate(deltas):
        if not isinstance(delta, Tensor):
            raise H3FusionError(f"delta {k} is a {type(delta).__name__}, not a tensor")
        if delta.shape != shape:
            raise H3FusionError(
                f"delta {k} has shape {tuple(delta.shape)} but delta 0 has {tuple(shape)}; "
                "merged deltas must all have one shape"
            )
    return torch.stack([d.to(device=deltas[0].device, dtype=torch.float32) for d in deltas])


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
        raise H3FusionError(f"lam={lam!r} is invalid; the scaling λ must be a finite number > 0")
    return float(lam)


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise H3FusionError(f"density={density!r} is invalid; the kept fraction must lie in (0, 1]")
    return float(density)


def _check_drop(drop: float) -> float:
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise H3FusionError(f"drop={drop!r} is invalid; the drop probability must lie in [0, 1)")
    return float(drop)


def _check_weights(weights: Sequence[float], n: int) -> Tensor:
    values = list(weights)
    if len(values) != n:
        raise H3FusionError(f"{len(values)} weights for {n} experts; give one weight per expert")
    if (
        any(
            isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0
            for w in values
        )
        or sum(values) <= 0
    ):
        raise H3FusionError(f"weights {values} are invalid; use finite numbers >= 0 with a positive sum")
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- building blocks


def _trim(stacked: Tensor, density: float) -> Tensor:
    """TIES "trim": per task, keep the k = max(1, round(density·n)) entries of largest |value| of its
    n entries and zero the rest. Entries tied with the k-th largest magnitude are all kept (as in the
    reference implementation's ``>=`` threshold), so ties can keep slightly more than k."""
    if density >= 1:
        return stacked
    flat = stacked.reshape(stacked.shape[0], -1)
    n = flat.shape[1]
    k = max(1, math.floor(density * n + 0.5))
    threshold = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest |value|
    return (flat * (flat.abs() >= threshold)).reshape(stacked.shape)


def _disjoint_mean(stacked: Tensor) -> Tensor:
    """TIES "elect sign" + "disjoint merge": per entry, the elected sign is sign(Σ_k x_k) (the sign of
    the larger total mass); the result is the mean of the x_k that are non-zero and have that sign,
    0 where no task qualifies (including entries whose sum is exactly 0)."""
    elected = stacked.sum(dim=0).sign()
    agree = (stacked.sign() == elected) & (stacked != 0)
    count = agree.sum(dim=0)
    return (stacked * agree).sum(dim=0) / count.clamp_min(1)


# --------------------------------------------------------------------------- merges


def linear(deltas: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted average: ``ΔW = Σ_k w_k ΔW_k / Σ_k w_k``; ``weights`` None is uniform (the plain mean).

    Weights must be >= 0 with a positive sum (they are normalised, so only their ratios matter)."""
    stacked = _stack(deltas)
    w = _check_weights(weights, len(stacked)) if weights is not None else torch.ones(len(stacked))
    w = w.to(stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
    return (w * stacked).sum(dim=0) / w.sum()


def task_arithmetic(deltas: Sequence[Tensor], lam: float = 0.4) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``ΔW = λ · Σ_k ΔW_k``.

    Default λ = 0.4: the paper tunes λ in [0, 1] on held-out data; 0.4 is the value the TIES paper
    (Yadav et al. 2023) uses for task arithmetic when no validation set is available. λ = 1/N is the
    plain mean and λ = 1 applies every expert in full (N-fold on directions they share)."""
    return _check_lam(lam) * _stack(deltas).sum(dim=0)


def ties(deltas: Sequence[Tensor], density: float = 0.2, lam: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): ``ΔW = λ · disjoint_mean(trim(ΔW_k, density))``.

    1. trim: per task keep the top ``density`` fraction of entries by |value| (k = max(1, round(density·n)),
       ties at the threshold kept), zero the rest;
    2. elect: per entry, γ = sign(Σ_k trimmed_k);
    3. disjoint merge: mean over the tasks whose trimmed value is non-zero with sign γ (0 if none);
    then scale by λ. Defaults (density 0.2, λ = 1) are the paper's no-validation recommendation.
    Trimming is per tensor (per (layer, projection) matrix)."""
    density, lam = _check_density(density), _check_lam(lam)
    return lam * _disjoint_mean(_trim(_stack(deltas), density))


def dare(
    deltas: Sequence[Tensor],
    drop: float = 0.9,
    rescale: bool = True,
    seed: int = 0,
    use_ties_sign: bool = False,
    lam: float = 1.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE (Yu et al. 2023), "drop and rescale", then combine.

    Each entry of each ΔW_k is dropped independently with probability p = ``drop``:
    ``D_k = m_k ⊙ ΔW_k / (1-p)`` with ``m_k ~ Bernoulli(1-p)`` (without ``rescale``: no ``/(1-p)``), so
    E[D_k] = ΔW_k. Combined by task arithmetic, ``ΔW = λ · Σ_k D_k``, or with ``use_ties_sign`` by TIES
    sign election + disjoint mean, ``ΔW = λ · disjoint_mean(D_k)`` (DARE-TIES).

    The masks come from a CPU ``torch.Generator`` seeded with ``seed`` (or the given ``generator``,
    which then advances), so a seed gives the same result on every device. Defaults: p = 0.9 (the
    paper's headline rate) and λ = 1."""
    drop, lam = _check_drop(drop), _check_lam(lam)
    stacked = _stack(deltas)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    keep = torch.rand(stacked.shape, generator=generator) >= drop  # P(keep) = 1 - p
    survivors = stacked * keep.to(stacked.device)
    if rescale:
        survivors = survivors / (1 - drop)
    return lam * (_disjoint_mean(survivors) if use_ties_sign else survivors.sum(dim=0))


METHODS: dict[str, Callable[..., Tensor]] = {
    "linear": linear,
    "task-arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
}


def svd_lora(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factor a merged delta back into LoRA form, ``delta ≈ B @ A`` with A [rank, in], B [out, rank].

    This is an APPROXIMATION whenever ``rank`` is below the rank of ``delta`` (a merge of N rank-r
    deltas generally has rank up to N·r, and TIES/DARE sparsification makes it full rank): the
    truncated SVD, the best rank-``rank`` approximation in Frobenius norm (Eckart–Young). The singular
    values are split evenly, B = U·√S, A = √S·Vᵀ; use the pair with scale 1 (alpha = r)."""
    if delta.dim() != 2:
        raise H3FusionError(f"svd_lora needs a 2-D delta, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(delta.shape):
        raise H3FusionError(
            f"rank={rank!r} is invalid for a {tuple(delta.shape)} delta; choose 1..{min(delta.shape)}"
        )
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


# --------------------------------------------------------------------------- whole models


def _check_hyper(method: str, hyper: dict) -> Callable[..., Tensor]:
    if method not in METHODS:
        raise H3FusionError(f"merge method '{method}' is unknown; choose one of {', '.join(METHODS)}")
    fn = METHODS[method]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("deltas", "generator")]
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise H3FusionError(
            f"merge method '{method}' takes no {', '.join(unknown)}; "
            f"its hyperparameters are {', '.join(accepted)}"
        )
    for name, check in (("lam", _check_lam), ("density", _check_density), ("drop", _check_drop)):
        if name in hyper:
            check(hyper[name])
    return fn


@torch.no_grad()
def merge_experts(base_model, adapters: Mapping[str, str | Path], method: str, *, tokenizer=None, **hyper):
    """Merge the named expert adapters into the base model's FFN weights, in place, and return it.

    ``base_model`` is a loaded HF causal LM (modified in place; pass its ``tokenizer`` to check the experts were
    trained on prompts encoded as it encodes them) or any spec ``load_model`` takes.
    For every (layer, projection) that some adapter adapts, ``W ← W + merge([ΔW_1 … ΔW_N])`` with
    ``ΔW_k = s_k·B_k@A_k`` exact (fp32, an adapter lacking that projection contributes 0), cast back
    to the weight's dtype. ``hyper`` goes to ``METHODS[method]``; for ``linear``, ``weights`` may be a
    mapping from expert name to weight. For ``dare`` one generator seeded with ``seed`` draws the masks
    of all tensors in (layer, projection) order. The result is a plain model: save it with save_pretrained.
    """
    from h3fusion.adapters import check_adapters, read_adapter
    from h3fusion.models import decoder_layers, load_model
    from h3fusion.moe.lowrank import PROJECTIONS

    fn = _check_hyper(method, hyper)
    names = list(adapters)
    if isinstance(hyper.get("weights"), Mapping):
        given = hyper["weights"]
        if set(given) != set(names):
            raise H3FusionError(
                f"weights name {sorted(given)} but the experts are {sorted(names)}; "
                "give one weight per expert"
            )
        hyper["weights"] = [given[n] for n in names]
    if hyper.get("weights") is not None:
        _check_weights(hyper["weights"], len(names))
    if method == "dare":
        hyper["generator"] = torch.Generator().manual_seed(int(hyper.pop("seed", 0)))

    if isinstance(base_model, str | Path):
        base_model, loaded = load_model(str(base_model))
        tokenizer = tokenizer or loaded
    experts = [read_adapter(name, path) for name, path in adapters.items()]
    check_adapters(experts, base_model, tokenizer)

    layers = decoder_layers(base_model)
    keys = sorted(
        {key for expert in experts for key in expert.factors},
        key=lambda key: (key[0], PROJECTIONS.index(key[1])),
    )
    for layer, proj in keys:
        weight = getattr(layers[layer].mlp, proj).weight
        deltas = []
        for expert in experts:
            delta = expert.delta(layer, proj)
            if delta is None:
                deltas.append(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            else:
                a, b = delta.A.to(weight.device), delta.B.to(weight.device)
                deltas.append(delta.scale * (b @ a))
        merged = fn(deltas, **hyper)
        weight.copy_((weight.to(torch.float32) + merged).to(weight.dtype))
    return base_model
