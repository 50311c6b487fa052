"""Two commits of shardc, measured interleaved in one sitting: is B as fast as A?

Used for refactors that must not cost speed (issue #12: every median
ratio after/before within 5%).  For each round and each benchmark variant it
runs the variant's child (``bench/<script>.py --child VARIANT``) once against
commit A and once against commit B (in alternating order), each in a fresh
interpreter whose ``shardc`` is imported from a worktree of that commit
(built in place), so machine drift hits both alike.

Metrics (lower is better for all, so ratio = B/A):

* ``bench_tiny`` ``shardc_shm_queue`` / ``shardc_rpc1`` / ``shardc_rpc_auto`` /
  ``shardc_default`` / ``shardc_seeded``:
  seconds per task (1 / tasks per second).
* ``bench_colstats`` ``shardc_borrow`` / ``shardc_shared``: median wall seconds.
* ``bench_recovery`` ``rpc_chunked:alone`` / ``shm_queue:alone``: median seconds
  from a worker's SIGKILL to the retry of its shard starting.
* ``bench_tiny`` ``grid`` (only with ``--only grid``: it takes ~20 s a side):
  median seconds per call of each mode at each call size, one line each.

Usage::

    python bench/compare_refs.py A B [--rounds 5] [--quick]

Prints ``name<TAB>median ratio<TAB>B/A`` lines, then a table with every
round's values.  Does not measure: peers (see the benchmarks themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = [  # (script, variant, metric)
    ("bench_tiny.py", "shardc_shm_queue", "per_task"),
    ("bench_tiny.py", "shardc_rpc1", "per_task"),
    ("bench_tiny.py", "shardc_rpc_auto", "per_task"),
    ("bench_tiny.py", "shardc_default", "per_task"),
    ("bench_tiny.py", "shardc_seeded", "per_task"),
    ("bench_colstats.py", "shardc_borrow", "median_s"),
    ("bench_colstats.py", "shardc_shared", "median_s"),
    ("bench_recovery.py", "rpc_chunked:alone", "median_s"),
    ("bench_recovery.py", "shm_queue:alone", "median_s"),
]
EXTRA = [("bench_tiny.py", "grid", "grid")]  # run only when named in --only


def worktree(ref: str, base: str) -> str:
    """A worktree of ``ref`` with shardc built in place; returns its path."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = os.path.join(base, sha)
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", path, sha], check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, check=True,
                   capture_output=True)
    return path


def run_case(tree: str, script: str, variant: str, metric: str, quick: bool) -> dict[str, float]:
    """The case's metric(s) for the package at ``tree``: name -> value (lower is better)."""
    # The benchmark scripts of THIS checkout (identical measurement code for
    # both commits), the package of the commit under test.
    cmd = [sys.executable, os.path.join(HERE, script), "--child", variant, "--repeats", "3" if quick else "5"]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=tree, SHARDC_SKIP_STAMP_CHECK="0")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tree)
    for line in cp.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if "error" in res:
                raise RuntimeError(f"{script} {variant} at {tree}: {res['error']}")
            if metric == "grid":
                return {f"{m}.n{n}": float(v[m]["median_s"]) for n, v in res["grid"].items() for m in v}
            if metric == "per_task":
                return {"": 1.0 / float(res["rate"])}
            return {"": float(res[metric])}
    raise RuntimeError(f"{script} {variant} at {tree} printed no result:\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="comma-separated variant names")
    args = p.parse_args(argv)
    base = os.path.join(tempfile.gettempdir(), "shardc-compare")
    os.makedirs(base, exist_ok=True)
    trees = {"A": worktree(args.a, base), "B": worktree(args.b, base)}
    only = args.only.split(",") if args.only else None
    cases = [c for c in CASES if not only or c[1] in only] + [c for c in EXTRA if only and c[1] in only]
    # (script, variant, metric key) -> side -> values
    vals: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for script, variant, metric in cases:
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for side in order:
                for key, x in run_case(trees[side], script, variant, metric, args.quick).items():
                    vals.setdefault((script, variant, key), {"A": [], "B": []})[side].append(x)
            for (s_, v_, key), v in vals.items():
                if (s_, v_) == (script, variant) and v["A"] and v["B"]:
                    print(f"# round {r + 1}: {variant}{':' + key if key else ''} A={v['A'][-1]:.6g} "
                          f"B={v['B'][-1]:.6g}", file=sys.stderr, flush=True)
    print(f"# A = {args.a} ({os.path.basename(trees['A'])}), B = {args.b} ({os.path.basename(trees['B'])}), "
          f"{args.rounds} rounds, interleaved; ratio = median(B) / median(A), lower is better")
    for (script, variant, key), v in vals.items():
        ma, mb = statistics.median(v["A"]), statistics.median(v["B"])
        name = f"{script.removesuffix('.py')}:{variant}{':' + key if key else ''}"
        print(f"{name}\t{mb / ma:.3f}\tB/A")
        print(f"#   A {', '.join(f'{x:.4g}' for x in v['A'])}\n#   B {', '.join(f'{x:.4g}' for x in v['B'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
