"""Run every Python benchmark and write ``bench/out/latest.md`` (and ``latest.tsv``).

``python bench/run_py.py [--quick] [--only colstats,tiny] [--rounds N]``

The benchmark list is :data:`BENCHES` (run in that order).  Each one is a
standalone script printing ``name<TAB>value<TAB>unit`` lines and markdown
tables; this runner streams their output, then collects it with a header
(time, commit, machine, library versions, load) into ``bench/out/``, which
is git-ignored.  Measures nothing itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

# The benchmark list: bench/bench_<name>.py, run in this order.
BENCHES = ["colstats", "tiny", "large_out", "startup", "recovery", "status", "pershard", "tables"]


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for mod in ("numpy", "shardc", "joblib", "mpire", "ray", "dask", "distributed"):
        cp = subprocess.run([sys.executable, "-c", f"import importlib.metadata as m; print(m.version({mod!r}))"],
                            capture_output=True, text=True, cwd=REPO)
        out.append(f"{mod} {cp.stdout.strip() if cp.returncode == 0 else 'not installed'}")
    return ", ".join(out)


def header(argv: list[str]) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return "\n".join([
        "# shardc Python benchmarks",
        "",
        "- run: `" + " ".join(["python bench/run_py.py", *argv]) + "`",
        f"- started: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
        f"- commit: {git('rev-parse', '--short', 'HEAD')}" + (" (+ uncommitted changes)" if dirty else ""),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Linux {platform.release()}",
        f"- versions: {versions()}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the box is shared with other jobs: see each variant's load)",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="passed to every benchmark")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHES
    native = C.ensure_native(REPO)
    if native.startswith("import"):
        print(native, file=sys.stderr)
        return 1
    pass_on = (["--quick"] if args.quick else []) + (["--rounds", str(args.rounds)] if args.rounds else [])
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    md = [header(argv), ""]
    tsv: list[str] = []
    status = 0
    for name in names:
        script = os.path.join(HERE, f"bench_{name}.py")
        t0 = time.perf_counter()
        print(f"== bench_{name}.py {' '.join(pass_on)}", flush=True)
        proc = subprocess.Popen([sys.executable, script, *pass_on], stdout=subprocess.PIPE, text=True, cwd=REPO)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
        dt = time.perf_counter() - t0
        status = status or rc
        tsv.extend(ln for ln in lines if ln.count("\t") == 2)
        prose = [ln for ln in lines if ln.count("\t") != 2]
        md += [f"## bench_{name}.py ({dt:.0f} s{', exit ' + str(rc) if rc else ''})", ""]
        md += prose
        md += ["", "<details><summary>raw lines</summary>", "", "```"]
        md += [ln for ln in lines if ln.count("\t") == 2]
        md += ["```", "", "</details>", ""]
    with open(os.path.join(HERE, "out", "latest.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(HERE, "out", "latest.tsv"), "w") as f:
        f.write("\n".join(tsv) + "\n")
    print(f"wrote {os.path.join(HERE, 'out', 'latest.md')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
