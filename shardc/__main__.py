"""``python -m shardc demo``: the main job, end to end.

A realistic workload: per-column statistics with bootstrap confidence
intervals over a borrowed 256 MiB matrix, written into shared out buffers,
with the progress bar, the summary report, and a saved timeline picture.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np


def column_stats(shard, X, means, variances, ci_lo, ci_hi, boot=64):
    """Mean, variance and a bootstrap 95% CI of the mean for a block of columns."""
    block = X[:, shard.idx]  # a zero-copy view of the borrowed matrix
    means[shard.idx] = block.mean(axis=0)
    variances[shard.idx] = block.var(axis=0, ddof=1)
    n = block.shape[0]
    reps = np.empty((boot, block.shape[1]))
    for b in range(boot):  # resample rows with this shard's own RNG stream
        rows = shard.rng.integers(0, n, n)
        reps[b] = block[rows].mean(axis=0)
    lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
    ci_lo[shard.idx] = lo
    ci_hi[shard.idx] = hi
    return None


def demo(rows: int, cols: int, workers: int | None, png: str, boot: int) -> int:
    import shardc

    print(
        f"shardc {shardc.__version__} demo: column statistics + bootstrap CIs over a "
        f"{rows} x {cols} float64 matrix ({rows * cols * 8 / 2**20:.0f} MiB)"
    )
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, cols)) * rng.uniform(0.5, 2.0, cols) + rng.uniform(-1, 1, cols)
    t0 = time.perf_counter()
    Xs = shardc.share(X)  # one copy into a sealed shared segment; workers map it, never copy it
    print(f"shared the matrix in {time.perf_counter() - t0:.2f} s ({Xs.how}, sealed={Xs.segments[0].sealed})")
    del X
    outs = {name: shardc.buffer("f8", cols) for name in ("means", "variances", "ci_lo", "ci_hi")}
    blocks = shardc.shards(cols, block_size=max(1, cols // 128))
    result = shardc.shard_map(
        blocks,
        functools.partial(column_stats, boot=boot),
        borrow={"X": Xs},
        out=outs,
        workers=workers,
        seed=42,
        progress=True,
        cow="deny",
    )
    print()
    print(shardc.report(result))
    Xa = Xs.array
    ok = np.allclose(outs["means"].array, Xa.mean(axis=0)) and np.allclose(
        outs["variances"].array, Xa.var(axis=0, ddof=1)
    )
    inside = np.mean((outs["ci_lo"].array <= outs["means"].array) & (outs["means"].array <= outs["ci_hi"].array))
    print(
        f"\ncheck against NumPy on the master: means/variances {'match' if ok else 'DIFFER'}; "
        f"{inside:.0%} of CIs contain the column mean"
    )
    try:
        result.plot(path=png)
        print(f"timeline picture: {png}")
    except ImportError as exc:
        print(f"(no timeline picture: {exc})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shardc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the demo workload (about 10-30 s on 2 cores)")
    d.add_argument("--rows", type=int, default=8192)
    d.add_argument("--cols", type=int, default=4096)
    d.add_argument("--boot", type=int, default=32, help="bootstrap resamples per column block")
    d.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per CPU; the master mostly waits)",
    )
    d.add_argument("--png", default=os.path.join(tempfile.gettempdir(), "shardc-demo-timeline.png"))
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.rows, args.cols, args.workers, args.png, args.boot)
    return 2


if __name__ == "__main__":
    sys.exit(main())
