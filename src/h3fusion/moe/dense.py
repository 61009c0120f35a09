"""The dense expert store (the paper's layout): N merged copies of the FFN, ~N x the base's memory.

Expert k's ``W_pk = W_p + s_k B_pk A_pk`` is held in full; the forward is Mixtral's per-expert
index-gather loop. A fusion LoRA, while attached, is applied on top from its factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h3fusion.moe.layer import STORAGES, MoEMLP
from h3fusion.moe.lowrank import PROJECTIONS, LowRank, LowRankDelta, rank_acts
from h3fusion.moe.router import expert_groups


class DenseMoEMLP(MoEMLP):
    """``MoEMLP`` with dense storage: ``experts.<proj>`` [N, out, in], each expert's full merged weight."""

    storage = "dense"

    def _init_store(self, base_mlp: nn.Module, deltas: list[dict[str, LowRankDelta]],
                    shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.experts = nn.ParameterDict()
        for p in PROJECTIONS:
            w = getattr(base_mlp, p).weight.detach()
            copies = []
            for d in deltas:
                merged = w.to(self.param_dtype)
                if p in d:
                    dA = d[p].A.to(device=device, dtype=self.param_dtype)
                    dB = d[p].B.to(device=device, dtype=self.param_dtype)
                    merged = merged + float(d[p].scale) * (dB @ dA)
                copies.append(merged.to(w.dtype))
            self.experts[p] = nn.Parameter(torch.stack(copies), requires_grad=False)

    def _store_weight(self, k: int, proj: str) -> tuple[Tensor, torch.dtype]:
        base = self.experts[proj]
        return base[k].to(self.param_dtype), base.dtype

    def _merge_into_store(self, proj: str, a: Tensor, b: Tensor, scale: float) -> None:
        w = self.experts[proj]
        w.copy_((w.to(self.param_dtype) + scale * torch.bmm(b, a)).to(w.dtype))

    def _mix(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """Mixtral-style per-expert index-gather loop over the N merged copies."""
        prep = self._prepared(x.dtype)
        fg, fu, fd = prep.gate, prep.up, prep.down
        y = torch.zeros_like(x)

        def lin(inp: Tensor, p: str, e: int, f: LowRank | None) -> Tensor:
            out = F.linear(inp, self.experts[p][e].to(inp.dtype))
            if f is not None:
                out = out + rank_acts(inp, f.A[e], f.n_fusion, F.linear, self._dropped(inp)) @ f.B[e].t()
            return out

        for e, tok, wt in expert_groups(top_w, top_i, self.num_experts):
            xe = x[tok]
            h = self.act_fn(lin(xe, "gate_proj", e, fg)) * lin(xe, "up_proj", e, fu)
            y.index_add_(0, tok, lin(h, "down_proj", e, fd) * wt.unsqueeze(-1))
        return y


STORAGES["dense"] = DenseMoEMLP
