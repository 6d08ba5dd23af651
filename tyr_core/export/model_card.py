"""The model card (``README.md`` with Hugging Face's metadata header) every export folder carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

# format -> (what the folder holds, how an engine loads it, the library tag of the metadata header)
FORMATS: dict[str, tuple[str, str, str]] = {
    "compact": (
        "a physically smaller transformers checkpoint with per-layer shapes (`TyrForCausalLM`, code in the folder)",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)  # or import tyr_core.export\n'
        'tokenizer = AutoTokenizer.from_pretrained("DIR")\n```',
        "transformers",
    ),
    "masked": (
        "the source architecture at full size with the pruned weights zeroed (no speed-up; exact reference)",
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        'model = AutoModelForCausalLM.from_pretrained("DIR")\n```',
        "transformers",
    ),
    "nemotron-nas": (
        "a DeciLM / Nemotron-NAS checkpoint (`block_configs`: per-layer KV heads, FFN widths, `no_op` sublayers)",
        "```bash\nvllm serve DIR --trust-remote-code   # the folder's configuration_decilm.py defines the config\n```",
        "vllm",
    ),
    "gguf": (
        "one `model.gguf` (llama.cpp's `deci` architecture: per-layer query heads, KV heads and FFN widths)",
        "```bash\nllama-cli -m DIR/model.gguf -p 'Once upon a time'          # llama.cpp\n"
        "llama-perplexity -m DIR/model.gguf -f text.txt\n"
        "python -c \"from llama_cpp import Llama; print(Llama('DIR/model.gguf')('Hello', max_tokens=16))\"\n"
        "# Ollama: a Modelfile with `FROM ./model.gguf`, then `ollama create pruned -f Modelfile`\n```",
        "gguf",
    ),
}


@dataclass
class CardFacts:
    """What the card states about one exported run; figures missing from a run are left out, never invented."""

    fmt: str
    base_model: str
    revision: str | None
    run_id: str
    config_hash: str
    target_sparsity: float
    dense_total: int
    pruned_total: int
    decoder_removed_fraction: float
    iterations: int
    generations: int
    offspring: int
    heldout: dict[str, float] = field(default_factory=dict)  # model name -> held-out perplexity
    heldout_source: str = ""
    plot: str | None = None
    notes: list[str] = field(default_factory=list)


def _header(facts: CardFacts) -> str:
    meta = {
        "base_model": facts.base_model,
        "library_name": FORMATS[facts.fmt][2],
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "structured-pruning", "tyr", f"tyr-{facts.fmt}"],
    }
    if facts.fmt == "gguf":
        meta["tags"].append("llama.cpp")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def model_card(facts: CardFacts) -> str:
    """The card's Markdown, with the metadata header Hugging Face reads (``base_model``, ``library_name``, tags)."""
    holds, how, _ = FORMATS[facts.fmt]
    revision = f" (revision `{facts.revision}`)" if facts.revision else ""
    removed_total = 1 - facts.pruned_total / facts.dense_total if facts.dense_total else 0.0
    lines = [
        _header(facts),
        f"# {facts.base_model}, pruned by tyr ({facts.fmt})",
        "",
        f"`{facts.base_model}`{revision} with attention heads and MLP neurons physically removed by tyr's "
        "implementation of Týr-the-Pruner (local pruning of every sublayer at several sparsities, then an "
        "evolutionary search of the per-sublayer sparsities under a global budget, coarse to fine).",
        "",
        f"This folder holds {holds}.",
        "",
        "## Size",
        "",
        "| | parameters |",
        "|---|---|",
        f"| dense | {_millions(facts.dense_total)} |",
        f"| pruned | {_millions(facts.pruned_total)} ({removed_total:.1%} fewer in all) |",
        f"| decoder layers removed | {facts.decoder_removed_fraction:.1%} (target {facts.target_sparsity:.1%}) |",
        "",
        "Counts are the weights that physically remain (embeddings and the output head are not pruned).",
    ]
    if facts.plot:
        lines += ["", f"Per-layer sparsity: ![per-layer sparsity]({facts.plot}) (`sparsity_distribution.json`)."]
    if facts.heldout:
        lines += ["", "## Held-out perplexity (lower is better)", "", "| model | perplexity |", "|---|---|"]
        lines += [f"| {name} | {ppl:.2f} |" for name, ppl in facts.heldout.items()]
        if facts.heldout_source:
            lines += ["", facts.heldout_source]
    lines += [
        "",
        "## How to run it",
        "",
        how.replace("DIR", "PATH_TO_THIS_FOLDER"),
    ]
    if facts.notes:
        lines += [""] + [f"- {note}" for note in facts.notes]
    lines += [
        "",
        "## How it was made",
        "",
        f"- run id `{facts.run_id}`, config hash `{facts.config_hash}` (`tyr runs show {facts.run_id}` in its store)",
        f"- {facts.iterations} coarse-to-fine iterations of {facts.generations} generations x {facts.offspring} "
        "offspring",
        "- no further training after pruning: expect a quality loss against the dense model, and evaluate it on "
        "your own tasks before serving it",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out_dir: Path, facts: CardFacts) -> Path:
    """Write ``out_dir/README.md`` (the card) and return its path."""
    path = Path(out_dir) / "README.md"
    path.write_text(model_card(facts), encoding="utf-8")
    return path
