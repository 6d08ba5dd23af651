"""``sparsity_distribution.json`` and a PNG of per-layer attention/MLP sparsity."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import geometry
from ..params import layout_params
from ..pruned import PrunedLayout


def sparsity_distribution(config, layout: PrunedLayout) -> dict:
    geo = geometry(config)
    params = layout_params(config, layout)
    layers = []
    for layer in range(geo.num_layers):
        heads = int(layout[(layer, "attn")].kept.numel())
        neurons = int(layout[(layer, "mlp")].kept.numel())
        layers.append(
            {
                "layer": layer,
                "attn_sparsity": 1 - heads / geo.heads,
                "mlp_sparsity": 1 - neurons / geo.intermediate,
                "attn_heads_kept": heads,
                "attn_kv_heads_kept": geo.kv_kept(layout[(layer, "attn")].kept),
                "mlp_neurons_kept": neurons,
                **{f"{k}_params": v for k, v in params["per_layer"][layer].items()},
            }
        )
    return {
        "layers": layers,
        "params_total": params["total"],
        "params_removed": params["removed"],
        "removed_fraction": params["removed_fraction"],
    }


def write_sparsity_report(config, layout: PrunedLayout, out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = sparsity_distribution(config, layout)
    js = out_dir / "sparsity_distribution.json"
    js.write_text(json.dumps(dist, indent=1))
    xs = [row["layer"] for row in dist["layers"]]
    fig, ax = plt.subplots(figsize=(max(6, len(xs) * 0.3), 3.5))
    ax.bar([x - 0.2 for x in xs], [r["attn_sparsity"] for r in dist["layers"]], 0.4, label="attention")
    ax.bar([x + 0.2 for x in xs], [r["mlp_sparsity"] for r in dist["layers"]], 0.4, label="MLP")
    ax.set(
        xlabel="layer",
        ylabel="sparsity",
        ylim=(0, 1),
        title=f"per-layer sparsity ({dist['removed_fraction']:.1%} of block parameters removed)",
    )
    ax.legend()
    fig.tight_layout()
    png = out_dir / "sparsity_distribution.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return js, png
