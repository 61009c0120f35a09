"""The H3Fusion MoE MLP: one decoder layer's gated MLP turned into N LoRA experts plus a router.

This module holds what both storage layouts share (the router, the fusion-stage LoRA, the knobs, the
factor cache); ``compact.py`` and ``dense.py`` hold the two expert stores and their compute paths,
behind the few ``_store_*`` / ``_mix`` methods of ``MoEMLP``. ``MoEMLP(..., storage=...)`` builds the
store's class, so callers name the layout, not the class.

Expert k is the base MLP with its projections shifted by a low-rank delta,
``W_k = W + s_k·B_k A_k`` (``s_k = alpha/r``, the factor the authors' code drops), and the layer routes
exactly like Mixtral: ``p = softmax(W_r x + expert_bias)`` over all N experts (fp32), keep the top-k,
renormalise them to sum 1, ``y = Σ_kept p_k · expert_k(x)``.

Two storage layouts hold the same function::

    compact (default): base once + low-rank factors     dense (paper layout): N merged copies

    x ──┬── router ─ softmax ─ top-k ─ renorm ─► p       x ──┬── router ─ softmax ─ top-k ─ renorm ─► p
        │                                                    │
        ├── W_g x ─┐   each computed ONCE for all experts    ├── expert 1: W_d1·(act(W_g1 x) * W_u1 x)
        ├── W_u x ─┤                                         ├── expert 2: W_d2·(act(W_g2 x) * W_u2 x)
        │          ▼   per expert k (rank r, cheap):         ├── ...       (W_pk = W_p + s_k B_pk A_pk,
        │   g_k = W_g x + s B_gk A_gk x                      │              N full copies, ~N x memory)
        │   u_k = W_u x + s B_uk A_uk x                      └── y = Σ_kept p_k · expert_k(x)
        │   h_k = act(g_k) * u_k                                 (Mixtral-style index-gather loop)
        │
        └── y = W_d·(Σ p_k h_k) + Σ p_k s B_dk A_dk h_k      (W_d once, on the routed mixture)

    memory per layer: 3·H·I + N·3·r·(H+I)  ≈ 1x base    memory per layer: N·3·H·I

Compact has three compute paths with identical math (``compact.py``): for few tokens (decode) all
experts on every token, masked by the routing weights; with one expert per token (top-1) a mask in rank
space, at the base's cost plus thin matmuls; otherwise (prefill, training) a Mixtral-style loop over
experts that touches only the tokens routed to each, which never materialises (N, T, I) tensors.
The base gate and up run as two matmuls over all tokens (fusing them would need a concatenated copy of
W_g and W_u, i.e. the base held twice).
At inference (no autograd through the factors) the activation-dtype casts and stacked forms of the
factors are cached, keyed on each source parameter's identity, storage and version counter; a decoding
step that continues a KV cache reuses what its prompt's forward validated without checking the key again
(at one token the check costs as much as a thin matmul).

Fusion-stage LoRA (``add_fusion_lora``) puts a trainable pair ``(A'_k, B'_k)`` on each expert's
gate/up/down, so ``W_pk = W_p + s_k B_pk A_pk + (alpha'/r')·B'_pk A'_pk``; ``drift_norms`` gives the
differentiable drift regulariser R_k, and ``merge_fusion_lora`` folds the pairs into the experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from h3fusion.moe.lowrank import PROJECTIONS, LowRank, LowRankDelta, dropout_mask, dropped
from h3fusion.moe.router import ROUTING_MODES, Routing, RoutingInputs, per_token, route, route_sequences

_DRIFT_EPS = 1e-12
STORAGES: dict[str, type[MoEMLP]] = {}  # storage name -> its MoEMLP subclass (filled by compact.py, dense.py)


class OneExpertFactors(NamedTuple):
    """One expert's factors laid out for the single-expert path: contiguous row blocks of the stacked forms (views,
    no copy), built once per cache. At decode a thin ``addmm`` with a transposed view of B costs about three times
    one with a contiguous matrix, and indexing and transposing per call cost as much again."""

    gate_up_A: Tensor | None  # [Rg + Ru, H]: its gate then up A
    gate_rank: int  # Rg: where its up columns start in x @ gate_up_A.T
    gate_Bt: Tensor | None  # [Rg, I]
    up_Bt: Tensor | None  # [Ru, I]
    down_A: Tensor | None  # [Rd, I]
    down_Bt: Tensor | None  # [Rd, H]


class PreparedFactors(NamedTuple):
    gate: LowRank | None
    up: LowRank | None
    down: LowRank | None
    gate_up_A: Tensor | None  # [N·Rg + N·Ru, H]: every gate then every up A, for one fused matmul
    down_B_flat: Tensor | None  # [N·Rd, H]
    gate_B_flat: Tensor | None  # [N·Rg, I]: every expert's gate B, stacked for one rank-space matmul
    up_B_flat: Tensor | None  # [N·Ru, I]
    gate_up_owner: Tensor | None  # [N·Rg + N·Ru]: the expert each column of x @ gate_up_A.T belongs to
    by_expert: tuple[OneExpertFactors, ...]  # expert k's own factors, for a forward that runs k alone
    down_A_flat: Tensor | None  # [N·Rd, I]
    down_owner: Tensor | None  # [N·Rd]: the expert each column of h @ down_A_flat.T belongs to
    base_t: tuple[Tensor, Tensor, Tensor] | None  # W_g^T, W_u^T, W_d^T (views) when the store may bypass the modules


class MoEMLP(nn.Module):
    """N LoRA experts of one gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) + a router.

    Args:
        base_mlp: the layer's MLP (e.g. ``LlamaMLP``); its three projections must be bias-free
            ``nn.Linear``-like modules. In compact storage its projection modules are reused as-is (the
            very same Parameters, frozen in place), so the base weights are held once.
        expert_deltas: one dict per expert mapping a subset of ``gate_proj``/``up_proj``/``down_proj``
            to its ``LowRankDelta`` (a missing projection is a zero delta). N = len(expert_deltas) >= 1;
            ranks may differ between experts and projections (zero-padded to the largest internally).
        top_k: experts kept per token, 1..N (changeable later through the ``top_k`` attribute).
        storage: ``"compact"`` (base once + low-rank factors) or ``"dense"`` (N merged copies); picks
            the subclass (``CompactMoEMLP`` / ``DenseMoEMLP``) that is built.
        router_weight: initial router weight [N, hidden]; None = ``nn.Linear``'s random init.
        decode_threshold: compact storage uses the masked all-experts path when the call has at most
            this many tokens and the index-gather loop above it.
        routing: ``"token"`` (each token routed on its own: the paper, Mixtral), ``"sequence"`` (one
            decision per sequence from its ``routing_inputs.decision_mask`` tokens, kept while
            ``routing_inputs.continuing``; see ``h3fusion.moe.router``) or ``"sequence-shared"`` (the
            same, decided by the layer whose ``decides`` is set and followed by the others).

    Dtypes: the base weights keep their dtype (e.g. bf16); the low-rank factors and the router are
    held in fp32 (fp64 if the base is fp64) and cast to the activation dtype at use; as in Mixtral the
    router logits are computed in the activation dtype and the softmax in fp32 (or wider).

    ``state_dict`` keys (N experts, H hidden, I intermediate; R_p = largest delta rank on projection p):

    * ``router.weight`` [N, H]; ``expert_bias`` [N] (the runtime alignment dial, added to the logits).
    * compact: ``gate_proj.weight`` [I, H], ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I]: the
      shared base, under the original MLP's names. ``delta_A.<proj>`` [N, R_p, in] and
      ``delta_B.<proj>`` [N, out, R_p]: the experts' factors, frozen, with the scale folded into B
      (``delta_W_k = delta_B[k] @ delta_A[k]``); always present, with R_p = 0 when no expert touches p.
    * dense: ``experts.gate_proj`` [N, I, H], ``experts.up_proj`` [N, I, H], ``experts.down_proj``
      [N, H, I]: each expert's full merged weight.
    * while a fusion LoRA is attached: ``fusion_A.<proj>`` [N, r, in] and ``fusion_B.<proj>`` [N, out, r]
      (trainable, fp32; applied with ``fusion_scale = alpha/r``, which is not in the state dict).

    After ``merge_fusion_lora`` a compact layer's ``delta_*`` ranks grow by the fusion rank; to load
    such a checkpoint, build the layer from the same experts, ``add_fusion_lora(r, alpha)``,
    ``merge_fusion_lora()``, then ``load_state_dict``.

    ``router_probs`` holds the full softmax [tokens, N] (with grad) of the latest forward when
    ``record_router_probs`` is True (the fusion stage's gating loss reads it).
    """

    storage: str

    def __new__(cls, *args, storage: Literal["compact", "dense"] | None = None, **kwargs):
        if cls is MoEMLP:  # the storage names the layout: build that store's class
            storage = storage or "compact"
            if storage not in STORAGES:
                raise ValueError(f"storage must be 'compact' or 'dense', got {storage!r}")
            cls = STORAGES[storage]
        return super().__new__(cls)

    def __init__(
        self,
        base_mlp: nn.Module,
        expert_deltas: Sequence[dict[str, LowRankDelta]],
        top_k: int = 2,
        storage: Literal["compact", "dense"] | None = None,
        router_weight: Tensor | None = None,
        decode_threshold: int = 16,
        routing: Literal["token", "sequence", "sequence-shared"] = "token",
    ) -> None:
        super().__init__()
        if storage is not None and storage != self.storage:
            raise ValueError(f"{type(self).__name__} holds {self.storage!r} storage, not {storage!r}")
        _check_base_mlp(base_mlp)
        n = len(expert_deltas)
        if n < 1:
            raise ValueError("expert_deltas is empty: an MoE needs at least one expert")
        if decode_threshold < 0:
            raise ValueError(f"decode_threshold must be >= 0, got {decode_threshold}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")

        self.num_experts = n
        self.decode_threshold = int(decode_threshold)
        self.top_k = top_k  # validated by the property
        self.record_router_probs: bool = True
        # without autograd, a forward over more tokens than this mixes its experts slice by slice (same result)
        self.inference_chunk_tokens: int = 16384
        self.router_probs: Tensor | None = None
        self.routing = routing
        self.routing_inputs = RoutingInputs()  # the model shares one object among its layers
        self._decision: Routing | None = None  # sequence routing: the current rows' decisions
        self._decision_expert: int | None = None  # the one expert all those rows keep (top-1, all agree), if any
        # sequence-shared routing: whether this layer takes the decision (the model's first layer) or follows
        # the one in routing_inputs.shared_decision; a layer on its own decides
        self.decides: bool = True

        base_w = {p: getattr(base_mlp, p).weight for p in PROJECTIONS}
        self.hidden_size = base_w["gate_proj"].shape[1]
        self.intermediate_size = base_w["gate_proj"].shape[0]
        shapes = {p: tuple(w.shape) for p, w in base_w.items()}  # (out, in)
        device = base_w["gate_proj"].device
        self.param_dtype = torch.promote_types(base_w["gate_proj"].dtype, torch.float32)
        deltas = [_check_expert(k, d, shapes) for k, d in enumerate(expert_deltas)]

        self.act_fn = base_mlp.act_fn
        self.router = nn.Linear(self.hidden_size, n, bias=False, device=device, dtype=self.param_dtype)
        if router_weight is not None:
            if tuple(router_weight.shape) != (n, self.hidden_size):
                raise ValueError(
                    f"router_weight has shape {tuple(router_weight.shape)}, expected {(n, self.hidden_size)}"
                )
            with torch.no_grad():
                self.router.weight.copy_(router_weight)
        self.register_buffer("expert_bias", torch.zeros(n, device=device, dtype=torch.float32))
        self._init_store(base_mlp, deltas, shapes, device)

        self.fusion_A = nn.ParameterDict()
        self.fusion_B = nn.ParameterDict()
        self.fusion_scale: float | None = None
        self.fusion_dropout: float = 0.0  # drop probability of the fusion LoRA's inputs while training
        self._prep_cache: tuple[tuple, PreparedFactors] | None = None
        # what the latest validated no-grad forward prepared: decoding steps that continue its KV cache reuse it
        self._decode_prep: tuple[torch.dtype, PreparedFactors] | None = None

    # ------------------------------------------------------------------ the expert store's interface
    def _init_store(self, base_mlp: nn.Module, deltas: list[dict[str, LowRankDelta]],
                    shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        """Register the experts' weights (the state-dict keys of this layout)."""
        raise NotImplementedError

    def _stored_factors(self, proj: str) -> tuple[Tensor, Tensor] | None:
        """The store's own frozen low-rank factors of ``proj`` (A [N, R, in], B [N, out, R]), if it keeps any."""
        return None

    def _factor_sources(self) -> list[Tensor]:
        """The store's parameters the factor cache depends on."""
        return []

    def _base_transposed(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The shared base projections' weights transposed (views), for a store whose compute paths may call
        ``addmm`` on them instead of the modules; None: call the modules."""
        return None

    def _store_weight(self, k: int, proj: str) -> tuple[Tensor, torch.dtype]:
        """Expert k's stored weight on ``proj`` in ``param_dtype`` (no fusion LoRA), and the base's dtype."""
        raise NotImplementedError

    def _merge_into_store(self, proj: str, a: Tensor, b: Tensor, scale: float) -> None:
        """Fold a fusion LoRA pair (A [N, r, in], B [N, out, r]) into the stored experts."""
        raise NotImplementedError

    def _mix(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """The routed mixture ``Σ_kept p_k · expert_k(x)`` for tokens x [T, H]."""
        raise NotImplementedError

    def stored_ranks(self) -> dict[str, int]:
        """Rank of the stored expert factors per projection ({} when the store keeps full weights)."""
        return {}

    # ------------------------------------------------------------------ public knobs
    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not isinstance(value, int) or not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k must be an int in 1..{self.num_experts}, got {value!r}")
        self._top_k = value

    def set_expert_bias(self, bias: Tensor | Sequence[float]) -> None:
        """Set the per-expert logit bias (the runtime alignment dial); N values."""
        t = torch.as_tensor(bias, dtype=torch.float32).flatten()
        if t.numel() != self.num_experts:
            raise ValueError(f"expert bias needs {self.num_experts} values, got {t.numel()}")
        with torch.no_grad():
            self.expert_bias.copy_(t.to(self.expert_bias.device, self.expert_bias.dtype))

    # ------------------------------------------------------------------ fusion-stage LoRA
    def add_fusion_lora(self, r: int, alpha: float, dropout: float = 0.0) -> None:
        """Attach a trainable LoRA pair (A' kaiming-uniform, B' zeros) to every expert's gate/up/down."""
        if self.fusion_A:
            raise RuntimeError("a fusion LoRA is already attached; merge_fusion_lora() it first")
        if r < 1:
            raise ValueError(f"fusion LoRA rank must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fusion LoRA dropout must be in [0, 1), got {dropout}")
        device = self.router.weight.device
        for p, (out_f, in_f) in self._proj_shapes().items():
            a = torch.empty(self.num_experts, r, in_f, device=device, dtype=self.param_dtype)
            for k in range(self.num_experts):  # per-expert fan_in, exactly like PEFT's lora_A
                nn.init.kaiming_uniform_(a[k], a=math.sqrt(5))
            self.fusion_A[p] = nn.Parameter(a)
            self.fusion_B[p] = nn.Parameter(
                torch.zeros(self.num_experts, out_f, r, device=device, dtype=self.param_dtype)
            )
        self.fusion_scale = float(alpha) / r
        self.fusion_dropout = float(dropout)

    def drift_norms(self) -> Tensor:
        """R_k per expert: Σ_proj ||(alpha/r)·B'_k A'_k||_F, differentiable ([N]; zeros without fusion LoRA).

        Uses ``||BA||_F² = trace((BᵀB)(AAᵀ))`` (r×r matrices only) and ``sqrt(x + eps) - sqrt(eps)``, so it
        is exactly 0 and has a finite (zero) gradient at B' = 0.
        """
        if not self.fusion_A:
            return torch.zeros(self.num_experts, device=self.router.weight.device, dtype=self.param_dtype)
        assert self.fusion_scale is not None
        total = 0
        for p in PROJECTIONS:
            a, b = self.fusion_A[p], self.fusion_B[p]
            btb = torch.bmm(b.transpose(1, 2), b)  # [N, r, r]
            aat = torch.bmm(a, a.transpose(1, 2))  # [N, r, r], symmetric
            sq = (btb * aat).sum(dim=(1, 2)).clamp_min(0) * self.fusion_scale**2
            total = total + torch.sqrt(sq + _DRIFT_EPS) - math.sqrt(_DRIFT_EPS)
        return total

    @torch.no_grad()
    def merge_fusion_lora(self) -> None:
        """Fold the fusion LoRA into the experts (compact: extra frozen delta ranks; dense: into the copies)."""
        if not self.fusion_A:
            return
        assert self.fusion_scale is not None
        for p in PROJECTIONS:
            self._merge_into_store(p, self.fusion_A[p].detach(), self.fusion_B[p].detach(), self.fusion_scale)
        self.fusion_A = nn.ParameterDict()
        self.fusion_B = nn.ParameterDict()
        self.fusion_scale = None
        self.fusion_dropout = 0.0

    # ------------------------------------------------------------------ inspection
    def _proj_shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden_size, self.intermediate_size
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @torch.no_grad()
    def expert_weight(self, k: int, proj: str, dtype: torch.dtype | None = None) -> Tensor:
        """Full merged weight [out, in] of expert k on ``proj`` (base + its delta + fusion LoRA).

        Returned in ``dtype`` (default: the base weights' dtype), detached; used for Mixtral export.
        """
        if proj not in PROJECTIONS:
            raise ValueError(f"proj must be one of {PROJECTIONS}, got {proj!r}")
        if not 0 <= k < self.num_experts:
            raise IndexError(f"expert index {k} out of range 0..{self.num_experts - 1}")
        w, base_dtype = self._store_weight(k, proj)
        if self.fusion_A:
            assert self.fusion_scale is not None
            w = w + self.fusion_scale * (self.fusion_B[proj][k] @ self.fusion_A[proj][k])
        return w.to(dtype or base_dtype)

    def extra_repr(self) -> str:
        ranks = self.stored_ranks()
        ranks_repr = f", delta_ranks={ranks}" if ranks else ""
        fusion = f", fusion_rank={self.fusion_A['gate_proj'].shape[1]}" if self.fusion_A else ""
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, storage={self.storage!r}, "
            f"decode_threshold={self.decode_threshold}, routing={self.routing!r}{ranks_repr}{fusion}"
        )

    # ------------------------------------------------------------------ forward
    def _dropout_p(self) -> float:
        """The fusion LoRA's dropout probability now (0 outside training or without a fusion LoRA)."""
        return self.fusion_dropout if self.training and self.fusion_A else 0.0

    def _dropped(self, x: Tensor) -> Tensor | None:
        """dropout(x) as the fusion ranks' input while training, else None.

        One mask per call: where several low-rank inputs are the same tensor (gate and up both read x)
        they share it, which draws and keeps one mask instead of one per projection (the RNG is a
        sizeable share of a CPU training step); each fusion LoRA still sees standard dropout."""
        p = self._dropout_p()
        return dropped(x, dropout_mask(x, p), p) if p else None

    def _factors(self, proj: str, dtype: torch.dtype) -> LowRank | None:
        """All low-rank factors of ``proj`` (None when R = 0)."""
        a_parts: list[Tensor] = []
        b_parts: list[Tensor] = []
        stored = self._stored_factors(proj)
        if stored is not None:
            a_parts.append(stored[0])
            b_parts.append(stored[1])
        n_fusion = 0
        if self.fusion_A:
            a_parts.append(self.fusion_A[proj])
            b_parts.append(self.fusion_B[proj] * self.fusion_scale)
            n_fusion = self.fusion_A[proj].shape[1]
        if not a_parts:
            return None
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
        b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=2)
        return LowRank(a.to(dtype), b.to(dtype), n_fusion)

    def _prepared(self, dtype: torch.dtype) -> PreparedFactors:
        """The factors in the activation dtype, plus the stacked forms the compute paths use.

        Cached while nothing needs autograd through them (inference), keyed on the identity, storage
        and version counter of every source parameter, so in-place updates and reloads invalidate it.
        """
        kept = self._decode_prep
        if kept is not None and kept[0] is dtype and self.routing_inputs.continuing and not torch.is_grad_enabled():
            return kept[1]  # nothing changes the factors between the steps of one generation
        sources = [*held(self.fusion_A), *held(self.fusion_B), *self._factor_sources()]
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in sources))
        key = (dtype, self.fusion_scale, tuple((id(p), p.data_ptr(), p._version) for p in sources))
        if cacheable and self._prep_cache is not None and self._prep_cache[0] == key:
            # the base's projections may have gained hooks since (offloading set up after a first forward)
            prep = self._prep_cache[1]._replace(base_t=self._base_transposed())
            self._prep_cache = (key, prep)
            self._decode_prep = (dtype, prep) if not torch.is_grad_enabled() else None
            return prep
        g, u, d = (self._factors(p, dtype) for p in PROJECTIONS)
        gu = [f.A.reshape(-1, f.A.shape[-1]) for f in (g, u) if f is not None]
        owners = [_owner(f) for f in (g, u) if f is not None]
        gate_B_flat, up_B_flat, down_B_flat = _flat_b(g), _flat_b(u), _flat_b(d)
        gate_up_A_by_expert = None if not gu else torch.cat([f.A for f in (g, u) if f is not None], dim=1)

        def rows(flat: Tensor | None, f: LowRank | None, k: int) -> Tensor | None:  # expert k's block of a flat B
            return None if flat is None else flat[k * f.A.shape[1]:(k + 1) * f.A.shape[1]]

        prep = PreparedFactors(
            gate=g,
            up=u,
            down=d,
            gate_up_A=None if not gu else gu[0] if len(gu) == 1 else torch.cat(gu),
            down_B_flat=down_B_flat,
            gate_B_flat=gate_B_flat,
            up_B_flat=up_B_flat,
            gate_up_owner=torch.cat(owners) if owners else None,
            by_expert=tuple(
                OneExpertFactors(
                    gate_up_A=None if gate_up_A_by_expert is None else gate_up_A_by_expert[k],
                    gate_rank=0 if g is None else g.A.shape[1],
                    gate_Bt=rows(gate_B_flat, g, k),
                    up_Bt=rows(up_B_flat, u, k),
                    down_A=None if d is None else d.A[k],
                    down_Bt=rows(down_B_flat, d, k),
                )
                for k in range(self.num_experts)
            ),
            down_A_flat=None if d is None else d.A.reshape(-1, d.A.shape[-1]),
            down_owner=_owner(d),
            base_t=self._base_transposed(),
        )
        self._prep_cache = (key, prep) if cacheable else None
        self._decode_prep = (dtype, prep) if cacheable and not torch.is_grad_enabled() else None
        return prep

    def _route(self, hidden_states: Tensor) -> Routing:
        """The routing of every token of ``hidden_states`` ([B, T, H] or [T, H]), flattened to B·T tokens."""
        if self.routing == "token":
            routing = route(hidden_states.reshape(-1, hidden_states.shape[-1]), self.router.weight,
                            self.expert_bias, self.top_k)
        else:
            rows = hidden_states if hidden_states.dim() == 3 else hidden_states.unsqueeze(0)
            routing = per_token(self._sequence_decision(rows), rows.shape[1])
        self.router_probs = routing.probs if self.record_router_probs else None
        return routing

    def _sequence_decision(self, rows: Tensor) -> Routing:
        """Each row's decision: taken from its decision-mask tokens, or the one kept while decoding continues."""
        inputs = self.routing_inputs
        if inputs.continuing and self._decision is not None:
            if self._decision.indices.shape[0] != rows.shape[0]:
                raise RuntimeError(
                    f"sequence routing holds decisions for {self._decision.indices.shape[0]} rows but this decoding "
                    f"step has {rows.shape[0]}; call select_rows() when rows leave the batch"
                )
            return self._decision
        if self.routing == "sequence-shared" and not self.decides:
            decision = inputs.shared_decision
            if decision is None or decision.indices.shape[0] != rows.shape[0]:
                raise RuntimeError("sequence-shared routing: the deciding layer has not routed these rows in this "
                                   "forward; run the model (which clears the shared decision first), not one layer")
        else:
            mask = inputs.decision_mask
            if mask is not None and tuple(mask.shape) != tuple(rows.shape[:2]):
                mask = None  # set for another input (a caller that skipped set_routing_inputs): pool every token
            decision = route_sequences(rows, mask, self.router.weight, self.expert_bias, self.top_k)
            if self.routing == "sequence-shared":
                inputs.shared_decision = decision
        self._keep_decision(Routing(*(t.detach() for t in decision)))
        return decision

    def _keep_decision(self, decision: Routing) -> None:
        """Keep the rows' decision for the decoding steps, noting the one expert they all run, if any (top-1:
        the store can then read that expert's factors alone; one host sync per prompt, not per token)."""
        self._decision = decision
        self._decision_expert = None
        if decision.indices.shape[-1] == 1 and decision.indices.numel():
            first = int(decision.indices[0, 0])
            if bool((decision.indices == first).all()):
                self._decision_expert = first

    @property
    def single_expert(self) -> int | None:
        """The one expert every token of the current forward runs (sequence routing, top-1, rows that agree);
        None: each token's routing says."""
        return None if self.routing == "token" else self._decision_expert

    @property
    def sequence_decision(self) -> Routing | None:
        """Sequence routing: the decision (experts and weights per row) the current batch decodes with."""
        return self._decision

    def select_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows' sequence-routing decisions (as the KV cache's ``batch_select_indices``)."""
        if self._decision is not None:
            self._keep_decision(Routing(*(t[rows.to(t.device)] for t in self._decision)))

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        kept = self._decision
        if kept is not None and shape[-2] == 1 and self.routing_inputs.continuing and not torch.is_grad_enabled() \
                and self.routing != "token" and kept.indices.shape[0] == x.shape[0]:
            # a decoding step under sequence routing: every row keeps its decision (no routing work per token)
            probs = kept.probs if self.record_router_probs else None
            if self.router_probs is not probs:  # nn.Module's __setattr__ costs ~1 us a layer a token
                self.router_probs = probs
            return self._mix(x, kept.weights, kept.indices).reshape(shape)
        routing = self._route(hidden_states)
        chunk = self.inference_chunk_tokens
        if torch.is_grad_enabled() or x.shape[0] <= chunk:
            return self._mix(x, routing.weights, routing.indices).reshape(shape)
        # inference over very many tokens at once (router init forwards every init prompt in one batch): the same
        # per-token math in slices, so the [T, I] intermediates stay bounded (400 prompts per axis ran out of 24 GiB)
        parts = [self._mix(x[s:s + chunk], routing.weights[s:s + chunk], routing.indices[s:s + chunk])
                 for s in range(0, x.shape[0], chunk)]
        return torch.cat(parts).reshape(shape)


def _flat_b(f: LowRank | None) -> Tensor | None:
    """B [N, out, R] as one [N·R, out] matrix, rows in the order of the stacked rank activations."""
    return None if f is None else f.B.transpose(1, 2).reshape(-1, f.B.shape[1])


def held(params: nn.ParameterDict) -> list[Tensor]:
    """The parameters a ParameterDict holds now, read from its own table: ``.values()`` goes through
    ``Module.__getattr__`` per entry, which at decode (every layer, every token) costs more than the thin
    matmuls it guards; the table is what assignment and loading update, so nothing stale is read."""
    return list(params._parameters.values())


def _owner(f: LowRank | None) -> Tensor | None:
    """[N·R]: expert k owns the k-th block of R rank columns of the stacked factors."""
    if f is None:
        return None
    n, r = f.A.shape[:2]
    return torch.arange(n, device=f.A.device).repeat_interleave(r)


def _check_base_mlp(base_mlp: nn.Module) -> None:
    for name in (*PROJECTIONS, "act_fn"):
        if not hasattr(base_mlp, name):
            raise ValueError(f"base_mlp has no {name!r}: only gated MLPs (gate/up/down + act_fn) are supported")
    for p in PROJECTIONS:
        if getattr(getattr(base_mlp, p), "bias", None) is not None:
            raise ValueError(f"base_mlp.{p} has a bias: Mixtral-style experts must be bias-free")


def _check_expert(k: int, d: dict[str, LowRankDelta], shapes: dict[str, tuple[int, ...]]) -> dict[str, LowRankDelta]:
    unknown = set(d) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"expert {k}: unknown projection(s) {sorted(unknown)}; allowed: {PROJECTIONS}")
    for p, delta in d.items():
        out_f, in_f = shapes[p]
        if delta.A.dim() != 2 or delta.B.dim() != 2:
            raise ValueError(f"expert {k} {p}: A and B must be 2-D")
        r = delta.A.shape[0]
        if tuple(delta.A.shape) != (r, in_f) or tuple(delta.B.shape) != (out_f, r):
            raise ValueError(
                f"expert {k} {p}: expected A [r, {in_f}] and B [{out_f}, r], "
                f"got A {tuple(delta.A.shape)} and B {tuple(delta.B.shape)}"
            )
    return d
