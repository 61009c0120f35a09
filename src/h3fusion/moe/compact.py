"""The compact expert store: the base FFN once + every expert's low-rank factors (~1x base memory).

Three compute paths with identical math:

* ``T <= decode_threshold`` (decode): all experts on every token, masked by dense routing weights (0
  outside the top-k), A factors of all experts stacked into one matmul and B applied with ``bmm`` (without
  autograd: ``baddbmm`` onto the base outputs and the SwiGLU in place, fewer ops for the same sums).
* one expert per token (top-1, e.g. sequence routing's one expert per prompt), on few tokens or without
  autograd (prefill included): the mask acts in rank space instead, so the call costs the base's three
  matmuls plus thin rank-space ones and holds no per-expert [T, I] tensor; when every token runs the same
  expert (sequence routing, rows that agree) only that expert's factors are read.
* otherwise (prefill, training): a Mixtral-style loop over experts that touches only the tokens routed to
  each; it never materialises (N, T, I) tensors, and under autograd each expert's SwiGLU and down-rank
  activations go through ``routed_swiglu``, which keeps only g, u and the routing weights for backward;
  without autograd the same loop runs in place (``_mix_routed_inference``).

The base gate and up run as two matmuls over all tokens, once for all experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h3fusion.moe.layer import STORAGES, MoEMLP, PreparedFactors, held
from h3fusion.moe.lowrank import PROJECTIONS, LowRankDelta, dropout_mask, dropped, rank_acts
from h3fusion.moe.routed_swiglu import is_silu, routed_swiglu
from h3fusion.moe.router import expert_groups


class CompactMoEMLP(MoEMLP):
    """``MoEMLP`` with compact storage: ``gate_proj``/``up_proj``/``down_proj`` (the base MLP's own modules,
    frozen in place) plus ``delta_A.<proj>`` [N, R, in] and ``delta_B.<proj>`` [N, out, R] (scale in B)."""

    storage = "compact"

    def _init_store(self, base_mlp: nn.Module, deltas: list[dict[str, LowRankDelta]],
                    shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        n = len(deltas)
        for p in PROJECTIONS:
            getattr(base_mlp, p).weight.requires_grad_(False)
            setattr(self, p, getattr(base_mlp, p))  # same module, same Parameter: held once
        self.delta_A = nn.ParameterDict()
        self.delta_B = nn.ParameterDict()
        self._rank_mask_cache: tuple | None = None  # (indices, factors, gate/up mask, down mask): see _rank_masks
        self._act_is_silu = is_silu(self.act_fn)
        for p in PROJECTIONS:
            out_f, in_f = shapes[p]
            rank = max((d[p].A.shape[0] for d in deltas if p in d), default=0)
            a = torch.zeros(n, rank, in_f, device=device, dtype=self.param_dtype)
            b = torch.zeros(n, out_f, rank, device=device, dtype=self.param_dtype)
            for k, d in enumerate(deltas):
                if p in d:
                    r = d[p].A.shape[0]
                    a[k, :r] = d[p].A.to(device=device, dtype=self.param_dtype)
                    b[k, :, :r] = d[p].B.to(device=device, dtype=self.param_dtype) * float(d[p].scale)
            self.delta_A[p] = nn.Parameter(a, requires_grad=False)
            self.delta_B[p] = nn.Parameter(b, requires_grad=False)

    def _stored_factors(self, proj: str) -> tuple[Tensor, Tensor] | None:
        if self.delta_A[proj].shape[1] == 0:
            return None
        return self.delta_A[proj], self.delta_B[proj]

    def _factor_sources(self) -> list[Tensor]:
        return [*held(self.delta_A), *held(self.delta_B), *(getattr(self, p).weight for p in PROJECTIONS)]

    def _base_transposed(self) -> tuple[Tensor, Tensor, Tensor] | None:
        projs = [getattr(self, p) for p in PROJECTIONS]
        # a module with hooks (offloading, ZeRO-3 gathering) or of another type must run as itself
        if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in projs):
            return None
        return tuple(m.weight.t() for m in projs)

    def _store_weight(self, k: int, proj: str) -> tuple[Tensor, torch.dtype]:
        base = getattr(self, proj).weight
        return base.to(self.param_dtype) + self.delta_B[proj][k] @ self.delta_A[proj][k], base.dtype

    def _merge_into_store(self, proj: str, a: Tensor, b: Tensor, scale: float) -> None:
        self.delta_A[proj] = nn.Parameter(torch.cat([self.delta_A[proj], a], dim=1), requires_grad=False)
        self.delta_B[proj] = nn.Parameter(torch.cat([self.delta_B[proj], b * scale], dim=2), requires_grad=False)

    def stored_ranks(self) -> dict[str, int]:
        return {p: int(self.delta_A[p].shape[1]) for p in PROJECTIONS}

    # ------------------------------------------------------------------ compute
    def _mix(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        small = x.shape[0] <= self.decode_threshold
        # top-1 without autograd (inference, prefill included) or on few tokens: rank-space masking holds no
        # per-expert [T, I] tensor; training keeps the routed loop, whose backward stores less
        if top_i.shape[-1] == 1 and not self._dropout_p() and (small or not torch.is_grad_enabled()):
            if self.single_expert is not None:  # every token runs the same expert (sequence routing's rows agree)
                return self._mix_single_expert(x, top_w, self.single_expert)
            return self._mix_one_expert(x, top_w, top_i)
        if small:
            if torch.is_grad_enabled() or self._dropout_p():
                return self._mix_all_experts(x, top_w, top_i)
            return self._mix_all_experts_inference(x, top_w, top_i)
        if not torch.is_grad_enabled() and not self._dropout_p():
            return self._mix_routed_inference(x, top_w, top_i)
        return self._mix_routed_tokens(x, top_w, top_i)

    def _gate_up_acts(self, x: Tensor, f: PreparedFactors) -> tuple[Tensor | None, Tensor | None]:
        """Rank-space activations [T, N, R] of gate and up for all experts (one matmul when possible)."""
        n = self.num_experts

        def flat(inp: Tensor, a: Tensor) -> Tensor:
            return F.linear(inp, a.reshape(-1, a.shape[-1])).unflatten(-1, (n, -1))

        if self._dropout_p():
            xd = self._dropped(x)  # one mask for the gate and the up fusion ranks
            ag = None if f.gate is None else rank_acts(x, f.gate.A, f.gate.n_fusion, flat, xd)
            au = None if f.up is None else rank_acts(x, f.up.A, f.up.n_fusion, flat, xd)
            return ag, au
        if f.gate_up_A is None:
            return None, None
        acts = F.linear(x, f.gate_up_A)  # [T, N·Rg + N·Ru]
        split = 0 if f.gate is None else n * f.gate.A.shape[1]
        ag = None if f.gate is None else acts[:, :split].unflatten(-1, (n, -1))
        au = None if f.up is None else acts[:, split:].unflatten(-1, (n, -1))
        return ag, au

    def _mix_one_expert(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """One expert per token (top-1): every expert's rank activations, zeroed outside the token's expert,
        then one thin matmul with all experts' stacked B factors.

        Exact because with a single expert e per token ``g = W_g x + B_ge (A_ge x)`` and zeroing the other
        experts' rank activations removes their products; the SwiGLU then runs once on [T, I] as in the
        base. Few ops on purpose: at decode each costs about as much as the thin matmuls themselves.
        """
        f = self._prepared(x.dtype)
        wt = f.base_t or (None, None, None)
        gate_up_off, down_off = self._rank_masks(f, top_i)
        if f.gate_up_A is None:
            g, u = project(self.gate_proj, wt[0], x), project(self.up_proj, wt[1], x)
        else:  # [T, N·Rg + N·Ru], zero outside each token's expert
            acts = F.linear(x, f.gate_up_A).masked_fill_(gate_up_off, 0.0)
            split = 0 if f.gate is None else f.gate_B_flat.shape[0]
            g = project(self.gate_proj, wt[0], x, acts[:, :split], f.gate_B_flat)
            u = project(self.up_proj, wt[1], x, acts[:, split:], f.up_B_flat)
        h = self._swiglu(g, u)
        if torch.is_grad_enabled():  # top_w [T, 1] is exactly 1 after renormalisation: kept for the router's graph
            h = h * top_w
        if f.down is None:
            return project(self.down_proj, wt[2], h)
        return project(self.down_proj, wt[2], h, F.linear(h, f.down_A_flat).masked_fill_(down_off, 0.0), f.down_B_flat)

    def _swiglu(self, g: Tensor, u: Tensor) -> Tensor:
        """``act_fn(g) * u``; without autograd and for SiLU, in place in ``g`` (a fresh [T, I] product here): at
        one decoding token the two allocations and the activation module's call cost as much as a thin matmul."""
        if torch.is_grad_enabled() or not self._act_is_silu:
            return self.act_fn(g) * u
        return F.silu(g, inplace=True).mul_(u)

    def _rank_masks(self, f: PreparedFactors, top_i: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Which rank columns each token must zero (not its expert's), for gate/up and for down. Sequence
        routing's decoding steps pass the same kept indices every step: the masks are built once per decision."""
        kept = self._rank_mask_cache
        if kept is not None and kept[0] is top_i and kept[1] is f:
            return kept[2], kept[3]
        masks = (None if f.gate_up_owner is None else f.gate_up_owner != top_i,
                 None if f.down_owner is None else f.down_owner != top_i)
        self._rank_mask_cache = (top_i, f, *masks)
        return masks

    def _mix_single_expert(self, x: Tensor, top_w: Tensor, e: int) -> Tensor:
        """Every token runs expert ``e`` alone (top-1): the base plus e's low-rank products, reading e's factors
        only (decoding is memory-bound: the other experts' factors would be read for nothing)."""
        f = self._prepared(x.dtype)
        ef, wt = f.by_expert[e], f.base_t or (None, None, None)
        if ef.gate_up_A is None:
            g, u = project(self.gate_proj, wt[0], x), project(self.up_proj, wt[1], x)
        else:
            acts = F.linear(x, ef.gate_up_A)  # [T, Rg + Ru]
            g = project(self.gate_proj, wt[0], x, acts[:, :ef.gate_rank], ef.gate_Bt)
            u = project(self.up_proj, wt[1], x, acts[:, ef.gate_rank:], ef.up_Bt)
        h = self._swiglu(g, u)
        if torch.is_grad_enabled():  # top_w [T, 1] is exactly 1 after renormalisation: kept for the router's graph
            h = h * top_w
        if ef.down_A is None:
            return project(self.down_proj, wt[2], h)
        return project(self.down_proj, wt[2], h, F.linear(h, ef.down_A), ef.down_Bt)

    def _mix_all_experts(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """All experts on every token, masked by dense routing weights (the decode path under autograd or fusion
        dropout; ``_mix_all_experts_inference`` otherwise)."""
        t, n = x.shape[0], self.num_experts
        w = torch.zeros(t, n, dtype=x.dtype, device=x.device).scatter(1, top_i, top_w)  # [T, N]
        f = self._prepared(x.dtype)
        wt = f.base_t or (None, None, None)
        g = project(self.gate_proj, wt[0], x).unsqueeze(0)  # [1, T, I], once for all experts
        u = project(self.up_proj, wt[1], x).unsqueeze(0)
        ag, au = self._gate_up_acts(x, f)
        # B^T as [N, R, I] views of the contiguous flat forms: bmm with a transposed view of B costs ~2.5x at decode
        if ag is not None:
            g = g + torch.bmm(ag.transpose(0, 1), f.gate_B_flat.view(n, -1, f.gate_B_flat.shape[-1]))  # [N, T, I]
        if au is not None:
            u = u + torch.bmm(au.transpose(0, 1), f.up_B_flat.view(n, -1, f.up_B_flat.shape[-1]))
        hp = self.act_fn(g) * u * w.t().unsqueeze(-1)  # [N, T, I], p_k h_k (0 outside top-k)
        y = project(self.down_proj, wt[2], hp.sum(dim=0))
        if f.down is not None:
            ad = rank_acts(hp, f.down.A, f.down.n_fusion, lambda h, a: torch.bmm(h, a.transpose(1, 2)),
                           self._dropped(hp))
            y = y + ad.transpose(0, 1).reshape(t, -1) @ f.down_B_flat  # [T, N·Rd] @ [N·Rd, H]
        return y

    def _mix_all_experts_inference(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """``_mix_all_experts`` without autograd (token routing's decoding steps): the same sums in fewer ops.

        At a decoding step every op costs microseconds whatever its size, as much as the thin matmuls: the base
        gate and up outputs enter the experts' low-rank products as ``baddbmm``'s input (no separate add), the
        SwiGLU and the routing weights are applied in place on that [N, T, I] product, and the base down projection
        is added in place into its low-rank part (``project``)."""
        f = self._prepared(x.dtype)
        if f.gate is None or f.up is None:  # an expert set without gate or up factors: the general form
            return self._mix_all_experts(x, top_w, top_i)
        ag, au = self._gate_up_acts(x, f)
        t, n = x.shape[0], self.num_experts
        wt = f.base_t or (None, None, None)
        w = x.new_zeros(n, t).scatter_(0, top_i.t(), top_w.t())  # [N, T]: p_k, 0 outside the top-k
        g, u = project(self.gate_proj, wt[0], x), project(self.up_proj, wt[1], x)  # [T, I], once for all experts
        i = g.shape[-1]
        g = torch.baddbmm(g.expand(n, t, i), ag.transpose(0, 1), f.gate_B_flat.view(n, -1, i))  # [N, T, I]
        u = torch.baddbmm(u.expand(n, t, i), au.transpose(0, 1), f.up_B_flat.view(n, -1, i))
        h = self._swiglu(g, u).mul_(w.unsqueeze(-1))  # p_k h_k
        if f.down is None:
            return project(self.down_proj, wt[2], h.sum(dim=0))
        z = torch.bmm(h, f.down.A.transpose(1, 2))  # [N, T, Rd]
        return project(self.down_proj, wt[2], h.sum(dim=0), z.transpose(0, 1).reshape(t, -1), f.down_B_flat)

    def _mix_routed_inference(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """The routed loop without autograd (prefill, evaluation): the same sums, in place.

        Each expert's gate and up rows are copied out once and its low-rank products added into them (``addmm_``),
        the SwiGLU and routing weight are applied in place, and the rows and their down-rank activations are added
        into [T, I] and [T, N, Rd] accumulators (``index_add_``); the training loop's out-of-place ops allocate and
        pass over [T_e, I] tensors four more times per expert. A batch-8 prefill of 32-token prompts with top-2 of
        3 experts runs at 0.87-0.91 of the base's speed instead of 0.78-0.82 (bench_moe.py's prefill rows)."""
        t = x.shape[0]
        f = self._prepared(x.dtype)
        wt = f.base_t or (None, None, None)
        g0 = project(self.gate_proj, wt[0], x)  # [T, I], once for all experts
        u0 = project(self.up_proj, wt[1], x)
        ag, au = self._gate_up_acts(x, f)
        mix = torch.zeros_like(g0)
        z = None if f.down is None else x.new_zeros(t, self.num_experts, f.down.A.shape[1])  # [T, N, Rd]
        for e, tok, w in expert_groups(top_w, top_i, self.num_experts):
            ef = f.by_expert[e]
            g, u = g0.index_select(0, tok), u0.index_select(0, tok)
            if ag is not None:
                g.addmm_(ag[tok, e], ef.gate_Bt)
            if au is not None:
                u.addmm_(au[tok, e], ef.up_Bt)
            h = self._swiglu(g, u).mul_(w.unsqueeze(-1))
            mix.index_add_(0, tok, h)
            if z is not None:
                z[:, e].index_add_(0, tok, F.linear(h, ef.down_A))
        if z is None:
            return project(self.down_proj, wt[2], mix)
        return project(self.down_proj, wt[2], mix, z.reshape(t, -1), f.down_B_flat)

    def _mix_routed_tokens(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """Loop over experts, each on its routed tokens only (training; ``_mix_routed_inference`` without autograd)."""
        t = x.shape[0]
        f = self._prepared(x.dtype)
        g0 = self.gate_proj(x)  # [T, I], once for all experts
        u0 = self.up_proj(x)
        ag, au = self._gate_up_acts(x, f)
        mix = torch.zeros_like(g0)
        groups = expert_groups(top_w, top_i, self.num_experts)
        lean = torch.is_grad_enabled() and is_silu(self.act_fn)
        drop = self._dropout_p() if f.down is not None and f.down.n_fusion else 0.0
        # one [T, I] mask, each expert reading its tokens' rows: a token's routed experts share its
        # dropout pattern, and the RNG draws T·I values instead of top_k·T·I
        down_mask = dropout_mask(g0, drop)
        z_parts: list[Tensor] = []
        for e, tok, wt in groups:
            g, u = g0[tok], u0[tok]
            if ag is not None:
                g = g + ag[tok, e] @ f.gate.B[e].t()
            if au is not None:
                u = u + au[tok, e] @ f.up.B[e].t()
            mask = None if down_mask is None else down_mask[tok]
            if f.down is not None and lean:  # same math, a fraction of the activations kept for backward
                h, z = routed_swiglu(g, u, wt, f.down.A[e], f.down.n_fusion, drop, keep_mask=mask)
            else:
                h = self.act_fn(g) * u * wt.unsqueeze(-1)
                z = None if f.down is None else rank_acts(h, f.down.A[e], f.down.n_fusion, F.linear,
                                                          None if mask is None else dropped(h, mask, drop))
            # index_put_(accumulate) keeps only the indices for backward; index_add_ would also keep h
            mix.index_put_((tok,), h, accumulate=True)
            if z is not None:  # [T_e, Rd]
                z_parts.append(x.new_zeros(t, z.shape[-1]).index_put_((tok,), z, accumulate=True))
        y = self.down_proj(mix)
        if z_parts:
            if len(groups) == self.num_experts:
                b_flat = f.down_B_flat
            else:
                b_flat = torch.cat([f.down.B[e] for e, _, _ in groups], dim=1).t()
            y = y + torch.cat(z_parts, dim=1) @ b_flat
        return y


STORAGES["compact"] = CompactMoEMLP


def project(proj: nn.Module, weight_t: Tensor | None, x: Tensor, acts: Tensor | None = None,
            b_t: Tensor | None = None) -> Tensor:
    """``proj(x) [+ acts @ b_t]``: a base projection, plus a low-rank product already in rank space if given.

    With the weight's transpose at hand (a plain ``nn.Linear``, see ``_base_transposed``) this is one ``mm`` or
    one in-place ``addmm`` into the thin product: at one token on CPU, calling the module (``linear`` then
    ``matmul``, a transpose, ``mm``) and adding costs ~10 us more per projection, as much as the low-rank work."""
    if b_t is None:
        return proj(x) if weight_t is None else torch.mm(x, weight_t)
    delta = torch.mm(acts, b_t)
    return proj(x).add_(delta) if weight_t is None else delta.addmm_(x, weight_t)  # in place: no copy of delta
