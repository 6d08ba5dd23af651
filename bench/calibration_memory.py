"""Peak memory of calibration as the corpus grows: for each size, a generated ``.txt`` file of that many MB (one
document, the hardest case) and a fresh process that builds the tiny-test recipe's calibration, validation and
held-out windows from it. Prints JSON: per size, the process's peak RSS before and after, the seconds taken and the
window shapes. Memory should stay flat: tokens stream into a fixed buffer and reading stops once it is full.

    python bench/calibration_memory.py [--sizes-mb 8 256] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from transformers import AutoTokenizer
from flows.recipes import resolve_config
from tyr_core.calibration import heldout_windows, iter_pieces
from tyr_core.families import resolve_model
from tyr_core.pipeline import calibration_split

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

tok = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))
cfg = resolve_config("tiny-test", overrides=[f"calibration.files=[{sys.argv[1]}]"])
before = rss_mb()
started = time.perf_counter()
windows, validation = calibration_split(cfg.calibration, tok)
held = heldout_windows(tok, iter_pieces([sys.argv[1]]), cfg.eval.seq_len, cfg.eval.max_windows)
print(json.dumps({
    "seconds": round(time.perf_counter() - started, 1), "rss_before_mb": before, "peak_rss_mb": rss_mb(),
    "windows": list(windows.shape), "validation": list(validation.shape), "heldout": list(held.shape),
}))
"""

WORDS = (
    "the king queen crown sword castle night ghost speak father mother heaven earth lord lady honour death love "
    "time friend enemy battle peace letter poison madness player stage question answer soldier watch morning"
).split()


def make_text(path: Path, mb: int) -> None:
    """``mb`` MB of random words in 2,000-word lines (one document), written once."""
    if path.exists() and path.stat().st_size >= mb << 20:
        return
    rng = random.Random(0)
    block = "\n".join(" ".join(rng.choices(WORDS, k=2000)) for _ in range(64)) + "\n"  # about 1 MB
    with open(path, "w") as f:
        while f.tell() < mb << 20:
            f.write(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 256], help="corpus sizes in MB")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the generated texts (a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.scratch or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        results = []
        for mb in args.sizes_mb:
            path = scratch / f"corpus-{mb}mb.txt"
            make_text(path, mb)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(REPO)], capture_output=True, text=True, env=env
            )
            if done.returncode:
                sys.exit(f"calibration of {mb} MB failed:\n{done.stderr[-2000:]}")
            results.append({"text_mb": mb, **json.loads(done.stdout.strip().splitlines()[-1])})
            if not args.scratch:
                path.unlink()
    peaks = [r["peak_rss_mb"] for r in results]
    print(
        json.dumps(
            {
                "bench": "calibration_memory",
                "recipe": "tiny-test",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "sizes": results,
                "peak_rss_growth_mb": max(peaks) - min(peaks),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
