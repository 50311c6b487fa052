"""Shared harness of the Python benchmarks in ``bench/`` (not a benchmark itself).

* :class:`MemSampler` -- peak memory of a process tree (the calling process and
  all its descendants), sampled by a background thread every ~20 ms.
* :func:`run_variant_children` / :func:`child_main` -- each variant runs in a
  fresh interpreter, so one peer's leftover processes, threads and caches never
  pollute another's memory or timing (and no pool is forked from a process
  that runs another library's threads).
* :func:`emit` / :func:`table` -- the stable output: ``name<TAB>value<TAB>unit``
  lines, then a markdown table.

How memory is counted (``total``): for every process of the tree,
``Pss - Pss_Shmem`` from ``/proc/PID/smaps_rollup`` (private and file pages,
shared ones split between the processes that map them, so they count once),
plus, once per shmem object (memfd, ``/dev/shm`` file, shared anonymous
mapping) reachable from the tree through an open fd or a mapping, its
allocated size (``st_blocks``).  Plain "sum of PSS" misses shared-memory
pages that no process maps at the moment (a sealed memfd between its copy
and the workers' first touch) and counts a segment only as far as it is
mapped; counting shmem objects by inode fixes both.  The raw sum of PSS is
reported too (``pss``).  Not counted: kernel memory (page tables, socket
buffers, pipe buffers in flight), and pages of a shmem object that the tree
neither maps nor holds open (e.g. a joblib memmap file between its write by
the master and its mapping by a worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import psutil

SHMEM_PREFIXES = ("/memfd:", "/dev/shm/", "/dev/zero", "/SYSV", "/anon_hugepage")


def _rollup(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in data.split(b"\n")[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(b":"):
            try:
                out[parts[0][:-1].decode()] = int(parts[1]) * 1024
            except ValueError:
                pass
    return out


def _shmem_objects(pid: int, seen: dict[tuple[int, int], int]) -> None:
    """Add (dev, ino) -> allocated bytes of the shmem objects ``pid`` holds or maps."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        p = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(p)
        except OSError:
            continue
        if target.startswith(SHMEM_PREFIXES):
            try:
                st = os.stat(p)
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read().split(b"\n")
    except OSError:
        return
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].decode(errors="replace")
        if not path.startswith(SHMEM_PREFIXES):
            continue
        ino = int(parts[4])
        key_guess = [k for k in seen if k[1] == ino]
        if key_guess:
            continue
        try:
            st = os.stat(f"/proc/{pid}/map_files/{parts[0].decode()}")
        except OSError:
            continue
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from ``/proc/PID/task/TID/children``
    (cheap: no scan of every process), else psutil."""
    pids, todo = [], [root]
    try:
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo.extend(int(x) for x in f.read().split())
                except OSError:
                    pass
        return pids
    except FileNotFoundError:
        if pid != root:
            return pids
    try:
        proc = psutil.Process(root)
        return [root] + [c.pid for c in proc.children(recursive=True)]
    except psutil.Error:
        return [root]


def tree_memory(root: int | None = None) -> dict[str, Any]:
    """One sample: ``total`` (see module docstring), ``pss`` (raw sum), per-pid rollups."""
    root = os.getpid() if root is None else root
    pids = tree_pids(root)
    total = pss = 0
    per: dict[int, dict[str, int]] = {}
    shm: dict[tuple[int, int], int] = {}
    for pid in pids:
        r = _rollup(pid)
        if r is None:
            continue
        per[pid] = r
        pss += r.get("Pss", 0)
        total += r.get("Pss", 0) - r.get("Pss_Shmem", 0)
        _shmem_objects(pid, shm)
    total += sum(shm.values())
    # The rollups are read one process after another: if a process started
    # or ended meanwhile, the pages they share were split among a different
    # number of processes in different reads, and the sum can over-count by
    # up to the shared size (e.g. a pool re-forking its workers while they
    # share a 1 GiB input).  Such a sample is marked unstable.
    stable = set(tree_pids(root)) == set(pids)
    return {"total": total, "pss": pss, "per": per, "nproc": len(per), "shm": sum(shm.values()),
            "stable": stable}


class MemSampler:
    """Peak of :func:`tree_memory` while running, sampled by a daemon thread.

    ``with MemSampler() as s: ...`` then ``s.peak_total``, ``s.peak_pss``,
    ``s.baseline_total`` (a sample taken at start), ``s.peak_nproc``.
    """

    def __init__(self, interval: float = 0.02, root: int | None = None) -> None:
        self.interval = interval
        self.root = os.getpid() if root is None else root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.baseline_total = self.baseline_pss = 0
        self.peak_total = self.peak_pss = self.peak_nproc = 0
        self.peak_shm = 0
        self.unstable = 0  # samples taken while processes came or went (not in the peaks)

    def _take(self) -> dict[str, Any]:
        # Two passes back to back, and the smaller total: a pass that read one
        # process before and another after shared pages changed hands (a worker
        # unmapping an input others still share, at the end of a call) can
        # count those pages more than once, and the next pass does not.
        m = tree_memory(self.root)
        again = tree_memory(self.root)
        if again["stable"] and (not m["stable"] or again["total"] < m["total"]):
            m = again
        self.samples += 1
        if not m["stable"]:
            self.unstable += 1
            return m  # not counted in the peaks (see tree_memory)
        self.peak_total = max(self.peak_total, m["total"])
        self.peak_pss = max(self.peak_pss, m["pss"])
        self.peak_nproc = max(self.peak_nproc, m["nproc"])
        self.peak_shm = max(self.peak_shm, m["shm"])
        return m

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> "MemSampler":
        # The baseline needs a settled tree: workers of the previous call may
        # still be unmapping a shared input, and a pass taken meanwhile counts
        # its pages short (an "extra" as big as the input).  Up to 10 pairs of
        # passes, until two agree within 1%.
        m = tree_memory(self.root)
        for _ in range(10):
            again = tree_memory(self.root)
            if m["stable"] and again["stable"] and abs(again["total"] - m["total"]) <= 0.01 * max(m["total"], 1):
                break
            time.sleep(0.01)
            m = again
        self.baseline_total, self.baseline_pss = m["total"], m["pss"]
        self._take()
        self._thread = threading.Thread(target=self._loop, name="bench-mem-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._take()

    def __enter__(self) -> "MemSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def extra_total(self) -> int:
        return self.peak_total - self.baseline_total


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------

def emit(name: str, value: Any, unit: str) -> None:
    """One stable, parsable line: ``name<TAB>value<TAB>unit``."""
    if isinstance(value, float):
        value = f"{value:.6g}"
    print(f"{name}\t{value}\t{unit}", flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)


def print_targets(bench: str, lines: list[tuple[str, str, str, bool]]) -> None:
    """Targets as ``bench.target.ID<TAB>1|0<TAB>met`` lines and a table."""
    print()
    print(table(["target", "measured", "met"], [[t, m, "yes" if ok else "**NO**"] for _, t, m, ok in lines]))
    for ident, _, _, ok in lines:
        emit(f"{bench}.target.{ident}", int(ok), "met")


def mib(n: float) -> float:
    return n / 2**20


def loadavg() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------
# variants in fresh interpreters
# ----------------------------------------------------------------------------------------

def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant before it is killed")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times, interleaved (spreads a shared box's load "
                        "over all variants); times are pooled, memory peaks are the max")
    return p


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Pool two rounds of one variant: all times, the worst memory, the mean load."""
    if "error" in a:
        return a
    if "error" in b:
        return b
    out = dict(b)
    if "times" in a and "times" in b:
        out["times"] = a["times"] + b["times"]
        out["median_s"] = median(out["times"])
        out["min_s"] = min(out["times"])
    if "cpu" in a and "cpu" in b:
        out["cpu"] = a["cpu"] + b["cpu"]
        out["cpu_s"] = median(out["cpu"])
    for k in ("peak", "extra", "peak_pss", "peak_nproc", "peak_shm", "worker_peak_uss", "worker_peak_anon"):
        if k in a and k in b:
            out[k] = max(a[k], b[k])
    out["loadavg"] = (a.get("loadavg", 0) * a.get("rounds", 1) + b.get("loadavg", 0)) / (a.get("rounds", 1) + 1)
    out["rounds"] = a.get("rounds", 1) + 1
    return out


def run_variant_children(script: str, variants: list[str], argv: list[str], timeout: float,
                         extra_env: dict[str, str] | None = None, rounds: int = 1) -> dict[str, dict[str, Any]]:
    """Run ``script --child V`` for each variant (``rounds`` times, interleaved);
    collect each one's JSON result line (pooled over rounds with :func:`merge`)."""
    out: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, rounds)):
        for v, res in _one_round(script, variants, argv, timeout, extra_env).items():
            out[v] = merge(out[v], res) if v in out else res
    return out


def _one_round(script: str, variants: list[str], argv: list[str], timeout: float,
               extra_env: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    env = dict(os.environ, **(extra_env or {}))
    for v in variants:
        cmd = [sys.executable, script, "--child", v] + argv
        t0 = time.perf_counter()
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            out[v] = {"error": f"timed out after {timeout:.0f} s"}
            print(f"# {v}: timed out after {timeout:.0f} s", file=sys.stderr, flush=True)
            continue
        if "stale shardc native module" in cp.stderr:
            print(f"# {v}: stale native module, rebuilding and retrying", file=sys.stderr, flush=True)
            ensure_native()
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        res = None
        for line in cp.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
        if res is None:
            tail = (cp.stderr or cp.stdout).strip().splitlines()[-5:]
            res = {"error": f"exit {cp.returncode}: " + " | ".join(tail)}
        out[v] = res
        print(f"# {v}: {time.perf_counter() - t0:.1f} s" + (f" ERROR {res['error']}" if "error" in res else ""),
              file=sys.stderr, flush=True)
    return out


def child_main(variant: str, fn: Callable[[], dict[str, Any]]) -> int:
    """Run one variant in this (fresh) interpreter and print its JSON result."""
    try:
        res = fn()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        import traceback
        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res["loadavg"] = loadavg()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """pid -> user+system CPU seconds of every live process of the tree."""
    out: dict[int, float] = {}
    for pid in tree_pids(os.getpid() if root is None else root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            pass
    return out


class CpuMeter:
    """CPU seconds used by the whole tree between start() and stop(): live
    processes from /proc (delta), plus children reaped meanwhile (os.times).
    Unlike wall time, this hardly depends on what else runs on the box."""

    def start(self) -> None:
        self._t0 = os.times()
        self._c0 = tree_cpu()

    def stop(self) -> float:
        c1 = tree_cpu()
        t1 = os.times()
        live = sum(v - self._c0.get(pid, 0.0) for pid, v in c1.items())
        reaped = (t1.children_user - self._t0.children_user) + (t1.children_system - self._t0.children_system)
        # A child reaped meanwhile brings its whole lifetime's CPU into
        # os.times(): take off what it had used before start() (e.g. pool
        # workers of the previous repeat, replaced by this one).
        before = sum(v for pid, v in self._c0.items() if pid not in c1)
        return live + max(0.0, reaped - before)


def timed_repeats(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None,
                  cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of ``fn()`` per repeat (``before()`` runs untimed before
    each); the tree's CPU seconds per repeat are appended to ``cpu``."""
    times = []
    meter = CpuMeter()
    for _ in range(repeats):
        if before is not None:
            before()
        meter.start()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        c = meter.stop()
        if cpu is not None:
            cpu.append(c)
    return times


def measure(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None,
            interval: float = 0.02, mem_first: bool = False) -> dict[str, Any]:
    """Timed repeats without the sampler, then one more run under :class:`MemSampler`.

    Reading ``smaps_rollup`` walks page tables (~5-25 ms per process mapping
    GiBs, on a loaded 2-core box), so a sampler running during the timed
    repeats would steal CPU from the workers; the memory run is separate (first,
    with ``mem_first``, so no state left by earlier repeats sits in its baseline).
    """
    cpu: list[float] = []
    times = [] if mem_first else timed_repeats(fn, repeats, before, cpu)
    if before is not None:
        before()
    s = MemSampler(interval=interval)
    with s:
        t0 = time.perf_counter()
        fn()
        t_mem = time.perf_counter() - t0
    if mem_first:
        times = timed_repeats(fn, repeats, before, cpu)
    return {"times": times, "median_s": median(times), "min_s": min(times), "mem_run_s": t_mem,
            "cpu": cpu, "cpu_s": median(cpu),
            "baseline": s.baseline_total, "peak": s.peak_total, "extra": s.extra_total,
            "peak_pss": s.peak_pss, "baseline_pss": s.baseline_pss, "peak_nproc": s.peak_nproc,
            "peak_shm": s.peak_shm, "mem_samples": s.samples}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ensure_native(repo: str | None = None) -> str:
    """Make sure ``import shardc`` works in a fresh interpreter; if the native
    module is stale (other people change csrc/ concurrently), rebuild it once
    under the shared build lock.  Returns "ok", "rebuilt" or an error text."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = [sys.executable, "-c", "import shardc"]
    cp = subprocess.run(probe, capture_output=True, text=True, cwd=repo)
    if cp.returncode == 0:
        return "ok"
    if "stale shardc native module" not in cp.stderr:
        return "import shardc failed: " + cp.stderr.strip().splitlines()[-1]
    subprocess.run(["flock", "/tmp/shardc-build.lock", sys.executable, "setup.py", "build_ext", "--inplace",
                    "-q"], capture_output=True, text=True, cwd=repo)
    cp = subprocess.run(probe, capture_output=True, text=True, cwd=repo)
    return "rebuilt" if cp.returncode == 0 else "import shardc failed after rebuild: " + (
        cp.stderr.strip().splitlines() or ["?"])[-1]


def variant_main(doc: str, script: str, variants: list[str], run_child: Any, report: Any,
                 argv: list[str] | None = None) -> int:
    """The main() of a benchmark whose variants each run in a fresh child
    interpreter: parse the common flags, run as a child (``--child NAME``) or
    run every variant's child and report."""
    argv = sys.argv[1:] if argv is None else argv
    args = base_parser(doc).parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.child:
        return child_main(args.child, lambda: run_child(args.child, args.quick, repeats))
    chosen = args.only.split(",") if args.only else variants
    pass_on = (["--quick"] if args.quick else []) + ["--repeats", str(repeats)]
    results = run_variant_children(os.path.abspath(script), chosen, pass_on, args.timeout, rounds=args.rounds)
    report(results, args.quick)
    return 0
