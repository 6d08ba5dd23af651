"""The sparsity report of a layout: ``sparsity_distribution.json`` and a PNG bar plot per layer (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..families import geometry
from ..param_count import dense_params, layout_params
from ..sublayer_layout import PrunedLayout

if TYPE_CHECKING:
    from transformers import PretrainedConfig

JSON_NAME = "sparsity_distribution.json"
PNG_NAME = "sparsity_distribution.png"


def sparsity_distribution(config: PretrainedConfig, layout: PrunedLayout) -> dict:
    """Per-layer attention and MLP sparsity, kept groups and parameters, with model totals.

    Sparsity is the fraction of groups removed (docs/algorithm.md): query heads for attention, neurons for the MLP.

    Args:
        config: the dense model's config.
        layout: the kept groups of every sublayer.

    Returns:
        A JSON-serialisable dict: ``layers`` (one entry per layer: ``attn_sparsity``, ``mlp_sparsity`` in [0, 1],
        ``attn_heads_kept``, ``attn_kv_heads_kept``, ``mlp_neurons_kept``, ``attn_params``, ``mlp_params``,
        ``attn_params_dense``, ``mlp_params_dense``), the mean sparsities, ``params_total``, ``params_dense``,
        ``params_removed`` and ``removed_fraction`` (of the decoder layers' parameters).

    Raises:
        UnsupportedModelError: the config is not a supported family.
    """
    geo = geometry(config)
    params, dense = layout_params(config, layout), dense_params(config)
    layers = []
    for layer in range(geo.num_layers):
        heads = layout[(layer, "attn")].kept
        neurons = int(layout[(layer, "mlp")].kept.numel())
        layers.append(
            {
                "layer": layer,
                "attn_sparsity": 1 - heads.numel() / geo.heads,
                "mlp_sparsity": 1 - neurons / geo.intermediate,
                "attn_heads_kept": int(heads.numel()),
                "attn_kv_heads_kept": geo.kv_kept(heads),
                "mlp_neurons_kept": neurons,
                "attn_params": params["per_layer"][layer]["attn"],
                "mlp_params": params["per_layer"][layer]["mlp"],
                "attn_params_dense": dense["per_layer"][layer]["attn"],
                "mlp_params_dense": dense["per_layer"][layer]["mlp"],
            }
        )
    return {
        "layers": layers,
        "mean_attn_sparsity": sum(r["attn_sparsity"] for r in layers) / len(layers),
        "mean_mlp_sparsity": sum(r["mlp_sparsity"] for r in layers) / len(layers),
        "params_total": params["total"],
        "params_dense": params["dense_total"],
        "params_removed": params["removed"],
        "removed_fraction": params["removed_fraction"],
    }


def _plot(dist: dict, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot global state, safe in worker threads and without a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = dist["layers"]
    xs = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(6.0, len(xs) * 0.3), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([x - 0.2 for x in xs], [r["attn_sparsity"] for r in rows], 0.4, label="attention (heads)")
    ax.bar([x + 0.2 for x in xs], [r["mlp_sparsity"] for r in rows], 0.4, label="MLP (neurons)")
    ax.set(
        xlabel="layer",
        ylabel="sparsity",
        ylim=(0, 1.05),
        title=f"per-layer sparsity ({dist['removed_fraction']:.1%} of decoder parameters removed)",
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_sparsity_report(config: PretrainedConfig, layout: PrunedLayout, out_dir: Path) -> tuple[Path, Path]:
    """Write ``sparsity_distribution.json`` and ``sparsity_distribution.png`` into ``out_dir`` (created if needed).

    Args:
        config: the dense model's config.
        layout: the kept groups of every sublayer.
        out_dir: destination folder.

    Returns:
        The JSON path and the PNG path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = sparsity_distribution(config, layout)
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    json_path.write_text(json.dumps(dist, indent=1))
    _plot(dist, png_path)
    return json_path, png_path
