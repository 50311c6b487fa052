"""auto_table under faults: a worker SIGKILLed mid-part, pyarrow threads in the
master before fork (also the re-fork for inherited inputs), the janitor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from _frames import expected, frame

import shardc

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("mode", ["row_groups", "partitioned"])
def test_a_worker_killed_mid_part_leaves_exactly_one_copy_of_every_row(pool2, tmp_path, mode):
    """SIGKILL after 3 shards went into the open part: those rerun, the part never shows, each row once."""
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "ds"
    seen = tmp_path / "seen.txt"

    def f(shard):
        (runs / f"{shard.id}.{os.getpid()}.{len(os.listdir(runs))}").touch()
        if shard.id == 9:
            try:
                os.close(os.open(runs / "killed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return frame(shard)
            d = shardc.config.get_str("SHARDC_TMPDIR") if mode == "row_groups" else str(out)
            tmps = [e for root, _, fs in os.walk(d) for e in fs if e.startswith(".tmp-") and f"-{os.getpid()}-" in e]
            seen.write_text("\n".join(tmps))
            os.kill(os.getpid(), signal.SIGKILL)
        return frame(shard)

    opts = {"auto_table": True, "auto_table_mode": mode, "auto_table_materialize": "never"}
    if mode == "partitioned":
        opts["auto_table_path"] = str(out)
    r = shardc.shard_map(24, f, seed=3, pool=pool2, chunk_size=6, progress=False, dispatch_opts=opts)
    assert r.succeeded
    assert seen.read_text()  # the killed worker had an uncommitted part open
    count = {}
    for e in os.listdir(runs):
        if e != "killed":
            sid = int(e.split(".")[0])
            count[sid] = count.get(sid, 0) + 1
    assert count[6] == count[7] == count[8] == count[9] == 2  # the part's shards and the killed one rerun
    h = r.table
    pd.testing.assert_frame_equal(h.to_pandas(), expected(24, 3), check_dtype=False)
    assert sorted(s[0] for p in h.manifest["parts"] for s in p["shards"]) == list(range(24))
    assert not [e for e in os.listdir(h.path) if e.startswith(".tmp-")]
    if mode == "partitioned":
        import pyarrow.dataset as ds

        assert ds.dataset(str(out), format="parquet").count_rows() == 24 * 50  # the directory as readers see it
    h.close()


_THREADS = r"""
import os, sys, threading, numpy as np, pyarrow as pa, pyarrow.compute as pc, pandas as pd
import shardc
os.environ["SHARDC_INHERIT_MIN_BYTES"] = str(1 << 20)
# The master uses pyarrow's thread pool first: its threads are alive at fork.
big = pa.array(np.random.default_rng(0).random(4_000_000))
assert pc.sum(big).as_py() > 0
t = pa.table({"a": big, "b": big})
t.group_by([]).aggregate([("a", "sum")])
tasks = len(os.listdir("/proc/self/task"))
assert tasks > 1, tasks

def probe(shard, X=None):
    return pd.DataFrame({"cpu": [pa.cpu_count()], "io": [pa.io_thread_count()],
                         "pool": [pa.default_memory_pool().backend_name], "x": [float(X[shard.id].sum()) if X is not None else 0.0]})

pool = shardc.Pool(2)
r = shardc.shard_map(4, probe, pool=pool, progress=False, dispatch_opts={"auto_table": True, "auto_table_materialize": "always"})
df = r.table.to_pandas()
assert (df.cpu == 1).all() and (df.io == 1).all() and (df.pool == "system").all(), df
X = np.random.default_rng(1).random((4, 100_000))  # 3 MB, private: inherited by re-forked workers
r = shardc.shard_map(4, probe, borrow={"X": X}, pool=pool, progress=False,
                     dispatch_opts={"auto_table": True, "auto_table_materialize": "always"})
assert r.diagnostics.borrow["X"]["how"] == "inherited" and r.diagnostics.reforked == 2, r.diagnostics.borrow
df = r.table.to_pandas()
assert (df.cpu == 1).all() and (df.io == 1).all() and (df.pool == "system").all(), df
assert np.allclose(df.x.values, X.sum(axis=1))
pool.close()
print("OK", tasks, pa.cpu_count())
"""


def test_workers_forked_after_the_master_used_pyarrow_threads_cap_pyarrow():
    """pyarrow threads alive in the master at fork (and at the re-fork for inherited inputs): workers run, with
    one CPU thread, one IO thread and the system allocator; the master's own settings are untouched."""
    p = subprocess.run([sys.executable, "-c", _THREADS], capture_output=True, text=True, timeout=80)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.split()
    assert out[0] == "OK" and int(out[2]) > 1 or os.cpu_count() == 1


_LEAVE = r"""
import os, pandas as pd, shardc
r = shardc.shard_map(4, lambda s: pd.DataFrame({"a": [s.id]}), progress=False,
                     dispatch_opts={"auto_table": True, "auto_table_materialize": "never"})
print(r.table.path, flush=True)
os.kill(os.getpid(), 9)
"""


def test_the_janitor_removes_temporary_parts_of_a_killed_master(tmp_path, monkeypatch):
    """A master SIGKILLed while holding a row_groups handle leaves its directory; the next janitor removes it."""
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))
    p = subprocess.run([sys.executable, "-c", _LEAVE], capture_output=True, text=True, timeout=60, env=os.environ)
    path = p.stdout.strip()
    assert p.returncode == -9 and path.startswith(str(tmp_path)) and os.path.isdir(path), p.stderr[-2000:]
    mine = shardc.tmpdirs.owned_tempdir("table")  # a live owner's directory is kept
    removed = shardc.segment.janitor()
    assert path in removed and not os.path.exists(path)
    assert os.path.isdir(mine)
    os.rmdir(mine)


def test_import_removes_the_directories_of_dead_masters_only(tmp_path):
    """A fresh ``import shardc`` removes what a SIGKILLed master (and a pid that exited) left; a live
    process's directory and the user's own directories stay."""
    env = {**os.environ, "SHARDC_TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", _LEAVE], capture_output=True, text=True, timeout=60, env=env)
    dead = p.stdout.strip()
    folder = os.path.dirname(dead)
    assert (
        p.returncode == -9 and os.path.isdir(dead) and folder == os.path.join(tmp_path, f"shardc-owned-{os.getuid()}")
    )
    exited = os.path.join(folder, f"shardc-table.{_pid_of_exited()}.12345.abcd")  # a pid that exited: stale too
    os.makedirs(os.path.join(exited, "sub"))
    me = shardc.tmpdirs.start_time(os.getpid())
    live = os.path.join(folder, f"shardc-table.{os.getpid()}.{me}.beef")  # this test process: alive
    os.makedirs(live)
    user = tmp_path / "shardc-table-dataset"  # a persistent auto_table_path is never touched
    user.mkdir()
    q = subprocess.run([sys.executable, "-c", "import shardc"], capture_output=True, text=True, timeout=60, env=env)
    assert q.returncode == 0, q.stderr[-2000:]
    assert not os.path.exists(dead) and not os.path.exists(exited)
    assert os.path.isdir(live) and user.is_dir()
    os.rmdir(live)


def _pid_of_exited() -> int:
    """The pid of a child that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_start_time_tells_a_reused_pid_apart():
    """A directory whose pid lives but started at another time is stale."""
    me = shardc.tmpdirs.start_time(os.getpid())
    assert me > 0
    name = f"shardc-table.{os.getpid()}.{me + 1}.abcd"
    d = os.path.join(shardc.config.get_str("SHARDC_TMPDIR"), name)
    os.makedirs(d)
    assert d in shardc.tmpdirs.sweep() and not os.path.exists(d)
    assert np.isfinite(me)


def test_a_failed_commit_fails_the_shards_it_covered():
    """ShardExecutor.commit_sink: when the sink cannot commit, every succeeded outcome of the batch becomes a failure."""
    from types import SimpleNamespace

    from shardc.protocol import ERR, OK
    from shardc.worker.executor import ShardExecutor

    class Broken:
        def commit(self):
            raise OSError(28, "No space left on device")

    ex = SimpleNamespace(call=SimpleNamespace(value_sink=Broken()))
    results = [(1, OK, 50, 0, 1, None, None), (2, ERR, {"message": "own"}, 1, 2, None, None)]
    assert ShardExecutor.commit_sink(ex, results) is None
    assert results[0][1] == ERR and "could not be committed" in results[0][2]["message"]
    assert "No space left" in results[0][2]["message"] and results[1][2] == {"message": "own"}
    ex.call.value_sink = None
    assert ShardExecutor.commit_sink(ex, results) is None


_KILLED_MASTER = r"""
import sys, time, pandas as pd, shardc

def f(shard):
    time.sleep(0.005)
    return pd.DataFrame({"sid": [shard.id] * 40, "x": range(40)})

shardc.shard_map(800, f, chunk_size=4, workers=2, progress=False,
                 dispatch_opts={"auto_table": True, "auto_table_mode": "partitioned", "auto_table_path": sys.argv[1]})
print("DONE", flush=True)
"""


@pytest.mark.parametrize("wait_parts, delay", [(1, 0.0), (3, 0.011), (6, 0.037)])
def test_a_master_killed_mid_run_leaves_a_manifest_that_lists_exactly_the_parts(tmp_path, wait_parts, delay):
    """partitioned: SIGKILL the master while it runs; the manifest lists exactly the part files present, no
    partial part is visible and pyarrow.dataset reads every listed shard's rows once."""
    import json
    import time

    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from shardc.tables import open_table

    out = tmp_path / "ds"
    man = out / "_manifest.json"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_MASTER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if len(json.loads(man.read_text())["parts"]) >= wait_parts:
                    break
            except (OSError, ValueError):
                pass  # not there yet (a reader may see the rename only: the file is whole when it has a name)
            time.sleep(0.002)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        stdout = p.communicate(timeout=30)[0]
    assert p.returncode == -9 and "DONE" not in stdout, "the run ended before the kill: make it longer"
    time.sleep(0.2)  # the workers die with their master (PDEATHSIG)
    manifest = json.loads(man.read_text())
    visible = sorted(e for e in os.listdir(out) if not e.startswith((".", "_")))
    assert visible == sorted(part["file"] for part in manifest["parts"]) and len(visible) >= wait_parts
    assert manifest["complete"] is False and manifest["num_shards"] == 800
    listed = [s[0] for part in manifest["parts"] for s in part["shards"]]
    assert len(listed) == len(set(listed)) and manifest["done_shards"] >= len(listed)
    for part in manifest["parts"]:  # every listed part is whole: its footer reads, its rows are those recorded
        assert pq.read_metadata(out / part["file"]).num_rows == part["rows"] == 40 * len(part["shards"])
    t = ds.dataset(str(out), format="parquet").to_table()  # the directory as any reader sees it
    assert t.num_rows == manifest["rows"] == 40 * len(listed)
    per = t.group_by("sid").aggregate([("x", "count")]).to_pydict()
    assert sorted(per["sid"]) == sorted(listed) and set(per["x_count"]) == {40}  # each shard's rows once
    h = open_table(out)
    assert h.num_rows == t.num_rows and h.to_pandas().sid.is_monotonic_increasing


def test_manifest_flushes_are_batched_and_a_failed_call_keeps_what_was_committed(tmp_path):
    """The master's side alone: a commit inside the flush interval stays hidden (temporary name, not in the
    manifest) until the next flush; a call that fails (discard) publishes it in an incomplete manifest."""
    import json
    from types import SimpleNamespace

    from shardc.tables.auto import AutoTable
    from shardc.tables.options import check_auto_table
    from shardc.tables.parts import PartWriter

    out = tmp_path / "ds"
    opts = check_auto_table({"auto_table": True, "auto_table_mode": "partitioned", "auto_table_path": str(out)})
    at = AutoTable(opts, 4, SimpleNamespace())
    w = PartWriter(at.directory, "parquet", "w0-1-c1", fsync=True)

    def commit(sid):
        w.put(sid, pa.table({"sid": [sid] * 3}))
        return w.commit()

    def state():
        listed = [p["file"] for p in json.loads((out / "_manifest.json").read_text())["parts"]]
        return listed, sorted(e for e in os.listdir(out) if e.startswith("part-"))

    at.committed(0, commit(0))  # the first commit flushes at once
    assert state() == (["part-000000.parquet"], ["part-000000.parquet"])
    at.next_flush = float("inf")  # inside the interval: batched
    at.committed(0, commit(1))
    assert state() == (["part-000000.parquet"], ["part-000000.parquet"])
    assert at.counters["table_parts"] == 2
    at.discard()
    man = json.loads((out / "_manifest.json").read_text())
    assert state() == (["part-000000.parquet", "part-000001.parquet"],) * 2
    assert man["complete"] is False and man["done_shards"] == 2 and man["rows"] == 6
    assert not [e for e in os.listdir(out) if e.startswith(".tmp-")]
