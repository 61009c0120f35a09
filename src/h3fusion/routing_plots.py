"""Routing plots: the paper's heat-map (layers x experts per axis) and its activation-intensity
histograms, drawn from the statistics ``h3fusion.moe.routing.routing_stats`` writes (``routing.json``).

Self-contained (matplotlib and the statistics dict only), for the report and the `routing` verb.
"""

from __future__ import annotations

from pathlib import Path

import torch


def plot_routing(stats: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """Heat-map (layers x experts, one panel per axis) and per-axis histograms of sample means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, axes = stats["experts"], stats["axes"]
    paths = []

    fig, panels = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 4.5), squeeze=False, sharey=True)
    for panel, (axis, s) in zip(panels[0], axes.items(), strict=True):
        image = panel.imshow(s["layer_expert_mean"], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        panel.set_title(f"{axis} prompts (n={s['n']})")
        panel.set_xticks(range(len(names)), names, rotation=30)
        panel.set_xlabel("expert")
    panels[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=panels[0].tolist(), label="mean router probability")
    fig.suptitle(title or "Routing per layer and expert")
    paths.append(out_dir / "routing_heatmap.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, panels = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3.2), squeeze=False, sharey=True)
    for panel, (axis, s) in zip(panels[0], axes.items(), strict=True):
        values = torch.tensor(s["sample_means"])
        for k, name in enumerate(names):
            panel.hist(values[:, k].numpy(), bins=20, range=(0, 1), alpha=0.55, label=name)
        panel.set_title(f"{axis} prompts")
        panel.set_xlabel("mean routing weight per sample")
    panels[0][0].set_ylabel("samples")
    panels[0][-1].legend(fontsize=8)
    fig.suptitle(title or "Activation intensity per expert")
    paths.append(out_dir / "routing_intensity.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
