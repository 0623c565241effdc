"""Re-measure the quick-start numbers README.md prints, by running its quick start as written.

Takes the first bash block under "## Quick start" in README.md, drops its `pip install` and
`tensorboard` steps, runs the rest in a scratch directory (with `configs/` linked in), and prints
the wall time of each step and the losses the README quotes: the first and last logged training
loss and the validation loss at every evaluation. CPU runs are deterministic: the losses repeat
to the last digit; the times are this machine's.

    python benchmarks/readme_numbers.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_steps(readme: Path) -> list[str]:
    text = readme.read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    steps = [s.strip() for s in block.replace("\\\n", " ").replace("\n", " && ").split("&&")]
    return [s for s in steps if s and not s.startswith(("pip ", "tensorboard"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="readme_numbers-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "configs").symlink_to(ROOT / "configs")
    for step in quick_start_steps(ROOT / "README.md"):
        start = time.perf_counter()
        subprocess.run(step, shell=True, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{time.perf_counter() - start:6.1f} s  {step}")
    rows = [json.loads(line) for line in (work / "runs/tiny_cpu/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    print(f"train loss: step {train[0]['step']} {train[0]['loss/total']:.2f}, "
          f"step {train[-1]['step']} {train[-1]['loss/total']:.2f}")  # fmt: skip
    for r in rows:
        if "val/loss" in r:
            print(f"val loss at step {r['step']}: {r['val/loss']:.2f}")


if __name__ == "__main__":
    main()
