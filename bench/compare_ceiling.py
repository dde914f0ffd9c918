"""Interleaved ceiling passes of two source trees (e.g. main's and a branch's): on a shared
machine the load drifts, so the trees take turns and the medians are compared."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def ceiling_pass(src: Path, output: Path) -> dict[str, float]:
    """`bench/run.py --ceiling-only` with `src` first on the path; the pass's figures."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    subprocess.run(
        [sys.executable, str(RUN), "--ceiling-only", "--output", str(output)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    result = json.loads(output.read_text())
    ceiling = result["ceiling"]
    return {
        "chunks_per_s": ceiling["chunks_per_s"],
        "cpu_seconds": ceiling["cpu_seconds"],
        "seconds": ceiling["seconds"],
        "load_1min": float(result["load_start"].split()[0]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="+", type=Path, help="src folders, e.g. ../main/src src")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="write every pass and the medians as JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {str(tree): [] for tree in args.trees}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for tree in args.trees:
                figures = ceiling_pass(tree, Path(tmp) / "ceiling.json")
                runs[str(tree)].append(figures)
                print(
                    f"round {round_ + 1} {tree}: {figures['chunks_per_s']:.0f} chunks/s, "
                    f"{figures['cpu_seconds']:.2f} CPU s (load {figures['load_1min']:.1f})",
                    flush=True,
                )
    medians = {
        tree: {key: statistics.median(r[key] for r in passes) for key in passes[0]}
        for tree, passes in runs.items()
    }
    for tree, median in medians.items():
        print(
            f"median {tree}: {median['chunks_per_s']:.0f} chunks/s, "
            f"{median['cpu_seconds']:.2f} CPU s, {median['seconds']:.2f} s wall"
        )
    if args.output:
        args.output.write_text(json.dumps({"runs": runs, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
