"""``dmp_filing.py`` on two source trees, alternately, in one run: documents/s and CPU ms/document of each.

A machine shared with others swings by ±20% and more between minutes: alternating the two trees round by
round and comparing medians (and CPU per document, which load moves less than wall clock) is the fair way
to tell a change from noise. Run from either tree:

    .venv/bin/python bench/dmp_filing_ab.py --base /work/wt/filing-base --rounds 3 [--count 640] [--extract-processes 0,1]

Each round runs ``dmp_filing.py`` of the base tree, then of this tree (each in its own process, with its own
tree first on the path); with ``--extract-processes``, this tree once per value given (its
``filing.extract_processes``), the base tree with its own configuration.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"([\d.]+) documents/s, ([\d.]+) ms CPU/document")


def run(tree: Path, count: int, *options: str) -> tuple[float, float]:
    environment = dict(os.environ, PYTHONPATH=str(tree))
    output = subprocess.run([sys.executable, str(tree / "bench" / "dmp_filing.py"), "--count", str(count), *options],
                            cwd=tree, env=environment, capture_output=True, text=True, check=True).stdout
    found = RESULT.search(output)
    if found is None:
        raise SystemExit(f"no result in the output of {tree}:\n{output}")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the tree to compare with (e.g. a worktree of main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=640)
    parser.add_argument("--extract-processes", metavar="N[,N...]",
                        help="run this tree once per value of filing.extract_processes (default: its configuration)")
    arguments = parser.parse_args()
    trees: dict[str, tuple[Path, tuple[str, ...]]] = {"base": (arguments.base.resolve(), ())}
    if arguments.extract_processes:
        for value in arguments.extract_processes.split(","):
            trees[f"this p={int(value)}"] = (HERE, ("--extract-processes", str(int(value))))
    else:
        trees["this"] = (HERE, ())
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for round_number in range(1, arguments.rounds + 1):
        for name, (tree, options) in trees.items():
            rate, cpu = run(tree, arguments.count, *options)
            results[name].append((rate, cpu))
            print(f"round {round_number} {name:8s}: {rate:6.1f} documents/s, {cpu:4.1f} ms CPU/document", flush=True)
    for name, rows in results.items():
        print(f"{name:8s} median: {statistics.median(r for r, _ in rows):6.1f} documents/s, "
              f"{statistics.median(c for _, c in rows):4.1f} ms CPU/document ({trees[name][0]})")


if __name__ == "__main__":
    main()
