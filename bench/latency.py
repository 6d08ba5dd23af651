"""CPU (or GPU) latency of the dense model vs a compact export: prefill and decode tokens/s, parameters, file size.

    python bench/latency.py --compact out/RUN/compact [--prompt 128 --gen 32]
Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tyr_core.export  # noqa: E402,F401  (registers tyr_llama)
from tyr_core.evaluate import latency  # noqa: E402
from tyr_core.param_count import count_module_params  # noqa: E402
from tyr_runtime.real_assets import smollm2_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", default=None, help="dense model folder (default: SmolLM2-135M)")
    ap.add_argument("--compact", required=True, help="a compact export folder")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, folder in (("dense", Path(args.dense or smollm2_folder())), ("tyr_compact", Path(args.compact))):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(
            json.dumps(
                {
                    "model": name,
                    "params": count_module_params(model),
                    "bytes": size,
                    **latency(model, args.prompt, args.gen),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
