"""``python -m bench [--quick] [--plot FILE] [--json FILE] [-k EXPR]``: run the benchmark suites, print the report.

Runs pytest on bench/ with ``--benchmark-enable --benchmark-json`` (the suites are the only definition
of what is measured), reads the JSON back and prints a markdown table (bench/_report.py): per group the
median of every implementation, numba's speed against the best peer, its GB/s or GFLOP/s and the
fraction of the roof measured in the same run, with the machine it ran on. ``--quick`` takes 3
rounds (at least 0.25 s) per benchmark and leaves out the 2048^3 and float64 products, most of the small and fused
matmul shapes, the 784-1024-1024-10 model and torch.compile (a few minutes on a quiet machine).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from . import _report

QUICK_SKIP = "not 2048 and not f64 and not 1024-1024"  # torch.compile: bench_training leaves it out
# The suites that time every implementation of a kernel or model in one group (the report's rows);
# bench_fused, bench_interleave and bench_distributed measure other things and print their own tables.
SUITES = ("activations", "dropout", "losses", "matmul", "optim", "training")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (0.25 s) each; big products and models left out")
    parser.add_argument("--plot", metavar="FILE", help="write the chart (PNG) here")
    parser.add_argument("--json", metavar="FILE", help="keep pytest-benchmark's JSON here")
    parser.add_argument("-k", metavar="EXPR", help="only the benchmarks matching this pytest -k expression")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.json or os.path.join(tmp, "bench.json")
        select = " and ".join(f"({e})" for e in (args.k, QUICK_SKIP if args.quick else None) if e)
        here = os.path.dirname(os.path.abspath(__file__))
        command = [sys.executable, "-m", "pytest", *(os.path.join(here, f"bench_{s}.py") for s in SUITES), "-q", "-p",
                   "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={path}"] + (["-k", select] if select
                                                                                            else [])
        env = dict(os.environ, BENCH_QUICK="1" if args.quick else "0")
        print("running:", " ".join(command), file=sys.stderr, flush=True)
        code = subprocess.run(command, env=env, stdout=sys.stderr).returncode
        if not os.path.exists(path):
            sys.exit(f"python -m bench: pytest exited with {code} and wrote no results")
        with open(path) as f:
            records, info = _report.records_from_json(json.load(f))
    print(_report.table(records, info))
    if args.plot:
        _report.plot(records, args.plot)
        print(f"\nchart written to {args.plot}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
