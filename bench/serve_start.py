"""How long ``gateway serve`` takes to start on a data directory, and its CPU until ready, per code tree.

Issue 12 (Speed): on the 100,000-message mailbox a start walked every blob to check file modes. Each
``DATA_DIR[=REPO]`` is started --starts times from its tree (default: this one), one after the other:
seconds until ``run/ready.json`` appears and the server's CPU seconds by then (from /proc). The first
start of a tree on a directory may migrate its database or walk it whole once (run/modes-checked).

    .venv/bin/python bench/serve_start.py --gateway /work/bench-data/base-100k=/work/wt/base \\
        --gateway /work/bench-data/new-100k [--starts 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import compare_imap
from imap_mix import tree_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", required=True, metavar="DATA_DIR[=REPO]")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    results = []
    for spec in args.gateway:
        data_dir, _, repo = spec.partition("=")
        tree = Path(repo) if repo else REPO
        runs = []
        for _ in range(args.starts):
            with tree_of(tree):
                started = time.monotonic()
                gateway = compare_imap.start_gateway(Path(data_dir), 10)
                seconds = time.monotonic() - started
                cpu = compare_imap.tree_cpu(gateway.process.pid)
                gateway.stop()
            runs.append({"seconds_to_ready": round(seconds, 2), "server_cpu_s": round(cpu, 2)})
        results.append({"data_dir": data_dir, "tree": str(tree), "starts": runs})
    print(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
