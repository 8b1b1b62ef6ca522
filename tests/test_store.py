"""The run store: run ids, private folders and files, the sqlite index, lost runs, parallel writers."""

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import ROOT, UTC, RunsHome


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


class StoreTestCase(RunsHome):
    """The store of a home that does not exist yet; what it notes on its own is kept in self.notes."""

    def setUp(self):
        super().setUp()
        self.notes: list[str] = []
        self.store = runpilot.RunStore.default(note=self.notes.append)

    def full_record(self, when: dt.datetime) -> runpilot.RunRecord:
        return self.add_run("resnet · ü", "failed", started=when, duration=60.5, exit_code=3, engine="podman",
                            image="pytorch:2.4", samples=[{"loss": 0.25, "acc": 1, "opt": "adam"}],
                            tags={"try": "3", "owner": "ana"})

    def running(self, run_id: str, name: str = "n") -> runpilot.RunMeta:
        return runpilot.RunMeta(run_id=run_id, name=name, status=runpilot.RUNNING, started_at=runpilot.utc_now())


class RunIdTest(StoreTestCase):
    def test_format(self):
        run_id = runpilot.new_run_id(dt.datetime(2026, 11, 28, 22, 47, 5, 999999, tzinfo=UTC))
        self.assertRegex(run_id, r"\A20261128-224705-[0-9a-f]{6}\Z")
        self.assertRegex(runpilot.new_run_id(), r"\A\d{8}-\d{6}-[0-9a-f]{6}\Z")
        self.assertTrue(runpilot.RUN_ID_RE.match(run_id))

    def test_sorts_by_time(self):
        start = dt.datetime(2025, 12, 31, 23, 59, 58, tzinfo=UTC)
        times = [start + dt.timedelta(seconds=s) for s in (0, 1, 2, 61, 3600, 86400 * 40, 86400 * 400)]
        ids = [runpilot.new_run_id(t) for t in times]
        self.assertEqual(sorted(ids), ids)
        self.assertEqual(len(set(ids)), len(ids))

    def test_distinct_under_rapid_calls(self):
        made = [self.store.create_run_dir() for _ in range(200)]
        ids = [folder.run_id for folder in made]
        self.assertEqual(len(set(ids)), 200)
        for folder in made:
            self.assertEqual(folder.path, self.store.runs_dir / folder.run_id)
            self.assertTrue(folder.path.is_dir())
        self.assertEqual(sorted(p.name for p in self.store.runs_dir.iterdir()), sorted(ids))


class PermissionTest(StoreTestCase):
    def test_private_modes_even_with_umask_0(self):
        old = os.umask(0)  # modes must not rely on the user's umask
        self.addCleanup(os.umask, old)
        folder = self.store.create_run_dir()
        path = folder.path
        self.store.save(self.running(folder.run_id))
        runpilot.write_private(folder.logs, b"secret")
        runpilot.write_atomic(folder.meta_file, b"{}")
        runpilot.write_atomic(folder.meta_file, b'{"a": 1}')
        runpilot.MetricLog(folder.metrics).close()
        self.assertEqual(mode(self.home), 0o700)
        self.assertEqual(mode(self.store.runs_dir), 0o700)
        self.assertEqual(mode(path), 0o700)
        self.assertEqual(mode(self.store.db_path), 0o600)
        for name in ("logs.txt", "meta.json", "metrics.json"):
            with self.subTest(name):
                self.assertEqual(mode(path / name), 0o600)
        self.assertEqual((path / "meta.json").read_bytes(), b'{"a": 1}')
        self.assertEqual(sorted(p.name for p in path.iterdir()), ["logs.txt", "meta.json", "metrics.json"])
        with self.store.db() as conn:  # sqlite's own -wal and -shm files exist while a connection is open
            conn.execute("SELECT count(*) FROM runs").fetchone()
            for suffix in ("-wal", "-shm"):
                side = Path(f"{self.store.db_path}{suffix}")
                if side.exists():
                    self.assertEqual(mode(side), 0o600, side.name)


class RoundTripTest(StoreTestCase):
    def test_save_get_query(self):
        when = dt.datetime(2026, 1, 1, tzinfo=UTC)
        full = self.full_record(when)
        running = self.add_run("b", "running", started=when + dt.timedelta(minutes=5))
        self.assertEqual(self.store.get(full.id), full)
        self.assertEqual(self.store.get(full.id).last_metrics, {"loss": 0.25, "acc": 1, "opt": "adam"})
        self.assertEqual(self.store.get(full.id).tags, {"try": "3", "owner": "ana"})
        self.assertEqual((full.finished_at, full.exit_code, full.duration), ("2026-01-01T00:01:00.500Z", 3, 60.5))
        self.assertIsNone(self.store.get("20990101-000000-000000"))
        self.assertEqual(self.store.query(), [running, full])  # newest first
        self.assertEqual(self.store.query(runpilot.RunFilter(status="failed")), [full])
        self.assertEqual(self.store.query(runpilot.RunFilter(limit=1)), [running])
        self.assertEqual(self.store.query(runpilot.RunFilter(ascending=True)), [full, running])

    def test_save_replaces(self):
        record = self.add_run(status="running", started=dt.datetime(2026, 1, 1, tzinfo=UTC))
        record.status, record.exit_code, record.last_metrics = "succeeded", 0, {"loss": 0.1}
        self.store.save_record(record)
        self.assertEqual(self.store.query(), [record])
        meta = self.store.folder(record.id).read_meta()  # still running there
        meta.status, meta.exit_code = "failed", 2
        self.store.save(meta)
        self.assertEqual(self.store.query(), [runpilot.RunRecord.of(meta, Path(record.path))])
        self.assertEqual((self.store.get(record.id).status, self.store.get(record.id).exit_code), ("failed", 2))

    def test_rows_in_sqlite(self):
        record = self.full_record(dt.datetime(2026, 1, 1, tzinfo=UTC))
        conn = sqlite3.connect(self.store.db_path)
        self.addCleanup(conn.close)
        row = conn.execute("SELECT id, name, status, exit_code, duration, last_metrics, tags FROM runs").fetchall()
        self.assertEqual(row, [(record.id, "resnet · ü", "failed", 3, 60.5,
                                '{"acc": 1, "loss": 0.25, "opt": "adam"}', '{"owner": "ana", "try": "3"}')])


class ResolveTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        t0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
        self.a = self.add_run(started=t0, run_id="20260101-000000-aaaa11")
        self.b = self.add_run(started=t0 + dt.timedelta(seconds=1), run_id="20260101-000001-aaaa22")
        self.c = self.add_run(started=t0 + dt.timedelta(days=1), run_id="20260102-000000-cccccc")

    def test_find(self):
        cases = [(self.a.id, self.a), (self.b.id, self.b), ("20260102", self.c), ("20260101-000000", self.a),
                 ("20260101-000001-a", self.b), ("latest", self.c), ("-1", self.c), ("-2", self.b), ("-3", self.a),
                 ("aaaa11", self.a), ("aaaa22", self.b), ("cccccc", self.c)]  # the short id: the last six hex digits
        for ref, expected in cases:
            with self.subTest(ref=ref):
                self.assertEqual(self.store.find(ref), expected)

    def test_ambiguous(self):
        with self.assertRaises(runpilot.UsageError) as caught:
            self.store.find("20260101")
        self.assertIn(self.a.id, str(caught.exception))
        self.assertIn(self.b.id, str(caught.exception))
        self.assertNotIn(self.c.id, str(caught.exception))

    def test_unknown(self):
        for ref in ("2025", "20260103", "-4", "ffffff", "aaaa1"):
            with self.subTest(ref=ref), self.assertRaises(runpilot.UsageError):
                self.store.find(ref)

    def test_not_a_run_id(self):
        for ref in ("../../etc", "abc/def", "/etc/passwd", "..", "20260101-000000-AAAA11", "x" * 5, "",
                    "20260101-000000-aaaa11-extra", "a b"):
            with self.subTest(ref=ref):
                with self.assertRaises(runpilot.UsageError) as caught:
                    self.store.find(ref)
                self.assertNotIsInstance(caught.exception, runpilot.StoreError)
                self.assertEqual(caught.exception.exit_code, 2)

    def test_latest_when_empty(self):
        empty = runpilot.RunStore(self.tmp / "empty")
        for ref in ("latest", "-1"):
            with self.subTest(ref=ref), self.assertRaises(runpilot.UsageError):
                empty.find(ref)


class ReindexTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        t0 = dt.datetime(2026, 3, 1, 12, tzinfo=UTC)
        self.records = [self.full_record(t0),
                        self.add_run("two", "running", started=t0 + dt.timedelta(hours=1), tags={"k": "v"}),
                        self.add_run("three", started=t0 + dt.timedelta(hours=2), samples=[{"x": -1.5}],
                                     metric_names=["x"])]
        self.expected = sorted(self.records, key=lambda r: r.started_at, reverse=True)
        # folders that are not runs are skipped
        (self.store.runs_dir / "not-a-run").mkdir()
        (self.store.runs_dir / "not-a-run" / "meta.json").write_text("{}")
        broken = self.store.runs_dir / runpilot.new_run_id(t0 - dt.timedelta(days=1))
        broken.mkdir()
        (broken / "meta.json").write_bytes(b"\x00garbage{")

    def test_deleted_db_is_rebuilt(self):
        self.store.db_path.unlink()
        self.assertEqual(self.store.query(), self.expected)
        self.assertTrue(self.store.db_path.exists())

    def test_garbage_db_is_set_aside_and_rebuilt(self):
        for garbage in (b"garbage", os.urandom(8192), b"\xff" * 100_000):
            with self.subTest(size=len(garbage)):
                self.store.db_path.write_bytes(garbage)
                self.notes.clear()
                self.assertEqual(self.store.query(), self.expected)
                self.assertEqual(len(self.notes), 1, self.notes)
                self.assertIn("damaged", self.notes[0])
                aside = sorted(self.home.glob("runs.db.damaged-*"))
                self.assertTrue(aside, list(self.home.iterdir()))
                self.assertIn(garbage, [p.read_bytes() for p in aside])
                for p in aside:
                    p.unlink()

    def test_damage_inside_the_file(self):
        """A header that reads fine over damaged pages: rebuilt, or one clear StoreError; never a traceback."""
        with self.store.db() as conn:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
        data = self.store.db_path.read_bytes()
        self.assertGreater(len(data), 2 * page)
        self.store.db_path.write_bytes(data[:page] + b"\xff" * (len(data) - page))
        try:
            rows = self.store.query()
        except runpilot.StoreError as exc:
            self.assertIn("reindex", str(exc))
        else:
            self.assertEqual(rows, self.expected)
        self.assertEqual(self.store.reindex(), 3)
        self.assertEqual(self.store.query(), self.expected)

    def test_reindex_command(self):
        self.assertEqual(self.cli("reindex"), (0, "indexed 3 run(s)\n", ""))
        self.assertEqual(self.store.query(), self.expected)

    def test_reindex_picks_up_folder_without_row(self):
        t = dt.datetime(2026, 3, 2, tzinfo=UTC)
        orphan = self.add_run("orphan", started=t)
        with self.store.db() as conn:
            conn.execute("DELETE FROM runs WHERE id = ?", (orphan.id,))
        self.assertEqual(len(self.store.query()), 3)
        self.assertEqual(self.store.reindex(), 4)
        self.assertEqual(self.store.get(orphan.id), orphan)


class LockTest(StoreTestCase):
    def test_locked_db_is_not_damage(self):
        record = self.add_run(started=dt.datetime(2026, 1, 1, tzinfo=UTC))
        other = sqlite3.connect(self.store.db_path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # a writer that does not let go
        self.addCleanup(other.execute, "ROLLBACK")
        with mock.patch.dict(os.environ, {"RUNPILOT_DB_TIMEOUT": "0.3"}):
            store = runpilot.RunStore.default(note=self.notes.append)
        self.assertEqual(store.db_timeout, 0.3)
        started = time.monotonic()
        self.assertEqual(store.query(), [record])  # WAL: readers are not blocked
        record.status = "lost"
        with self.assertRaises(runpilot.StoreError) as caught:
            store.save_record(record)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("locked", str(caught.exception))
        self.assertEqual(list(self.home.glob("runs.db.damaged-*")), [])
        self.assertEqual(self.notes, [])
        other.execute("ROLLBACK")
        other.execute("BEGIN")  # for the cleanup's ROLLBACK
        self.assertEqual(self.store.get(record.id).status, "succeeded")

    # Was a bug: switching a fresh database to WAL failed at once under a parallel lock (now retried).
    def test_first_open_waits_for_a_parallel_writer(self):
        self.store.ensure()
        other = sqlite3.connect(self.store.db_path, isolation_level=None, check_same_thread=False)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.5, other.execute, ("COMMIT",))
        timer.start()
        self.addCleanup(timer.join)
        started = time.monotonic()
        store = runpilot.RunStore(self.home, db_timeout=10, note=self.notes.append)
        folder = store.create_run_dir()
        meta = self.running(folder.run_id)
        try:
            store.save(meta)
        finally:
            waited = time.monotonic() - started
        self.assertGreater(waited, 0.4)
        self.assertEqual(store.get(folder.run_id), runpilot.RunRecord.of(meta, folder.path))


class RefreshTest(StoreTestCase):
    """refresh(): a queued or running run whose runner died becomes lost (cancelled if it never started)."""

    def dead_pid(self) -> int:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        return proc.pid

    def active_run(self, runner: dict, minutes: int, status: str = "running") -> runpilot.RunRecord:
        when = dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(minutes=minutes)
        return self.add_run(status=status, started=when, runner=runner)

    def test_lost_and_cancelled(self):
        me = runpilot.runner_identity()
        dead_runner = {"pid": self.dead_pid(), "host": runpilot.hostname(), "boot_id": runpilot._boot_id(),
                       "start": "1"}
        dead = self.active_run(dead_runner, 0)
        alive = self.active_run(me, 1)
        elsewhere = self.active_run({**me, "host": "not-" + runpilot.hostname()}, 2)
        rebooted = self.active_run({**me, "boot_id": "00000000-0000-0000-0000-000000000000"}, 3)
        never_started = self.active_run(dead_runner, 4, status="queued")
        waiting = self.active_run(me, 5, status="queued")
        finished = self.add_run(started=dt.datetime(2026, 1, 1, 1, tzinfo=UTC),
                                runner={**me, "pid": self.dead_pid()})
        untouched = (alive, elsewhere, waiting, finished)
        before = {r.id: (Path(r.path) / "meta.json").read_bytes() for r in untouched}
        out = runpilot.refresh(self.store, self.store.query(), self.notes.append)
        statuses = {r.id: r.status for r in out}
        expected = {dead.id: "lost", alive.id: "running", elsewhere.id: "running", finished.id: "succeeded",
                    rebooted.id: "lost", never_started.id: "cancelled", waiting.id: "queued"}
        self.assertEqual(statuses, expected)
        self.assertEqual({r.id: r.status for r in self.store.query()}, expected)
        for record in (dead, alive, elsewhere, rebooted, never_started, waiting, finished):
            with self.subTest(record.id):
                meta = json.loads((Path(record.path) / "meta.json").read_text())
                self.assertEqual(meta["status"], expected[record.id])
                if record in untouched:
                    self.assertEqual((Path(record.path) / "meta.json").read_bytes(), before[record.id])
                    self.assertIsNone(meta["lost_at"])
                elif meta["status"] == "lost":
                    self.assertIsNotNone(meta["lost_at"])
                    self.assertIn(f"pid {meta['runner']['pid']}", meta["reason"])
                else:  # cancelled: the job never started, so it has no exit code
                    self.assertIsNone(meta["exit_code"])
                    self.assertIn("before it started", meta["reason"])
        self.assertEqual(self.notes, [])  # no job of theirs is left running

    def test_meta_without_runner_is_untouched(self):
        record = self.add_run(status="running", started=dt.datetime(2026, 1, 1, tzinfo=UTC), write_meta=False,
                              runner={})
        runpilot.refresh(self.store, [record], self.notes.append)
        self.assertEqual(self.store.get(record.id).status, "running")


WRITER = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import runpilot
go = float(sys.argv[2])
while time.time() < go:
    time.sleep(0.001)
store = runpilot.RunStore.default(note=lambda text: print(text, file=sys.stderr))
folder = store.create_run_dir()
meta = runpilot.RunMeta(run_id=folder.run_id, name=f"writer-{sys.argv[3]}", status="running",
                        started_at=runpilot.utc_now(), tags={"n": sys.argv[3]})
folder.write_meta(meta)
store.save(meta)
print(folder.run_id)
"""


class ParallelTest(StoreTestCase):
    def test_parallel_writers_and_a_reader(self):
        # The index exists before the writers start: on a fresh home one of them now and then fails
        # (see LockTest.test_first_open_waits_for_a_parallel_writer).
        self.assertEqual(self.store.query(), [])
        go = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(go), str(n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(16)]
        reads = 0
        while time.time() < go:
            time.sleep(0.001)
        while any(p.poll() is None for p in procs):
            rows = self.store.query()  # must never fail
            self.assertLessEqual(len(rows), 16)
            reads += 1
        outputs = [p.communicate(timeout=60) for p in procs]
        for proc, (out, stderr) in zip(procs, outputs):
            self.assertEqual((proc.returncode, stderr), (0, ""))
        ids = [out.strip() for out, _ in outputs]
        self.assertEqual(len(set(ids)), 16)
        rows = self.store.query()
        self.assertEqual(sorted(r.id for r in rows), sorted(ids))
        self.assertEqual(sorted(r.tags["n"] for r in rows), sorted(str(n) for n in range(16)))
        self.assertEqual(sorted(p.name for p in self.store.runs_dir.iterdir()), sorted(ids))
        self.assertGreater(reads, 0)
        self.assertEqual(self.notes, [])
        self.assertEqual(list(self.home.glob("runs.db.damaged-*")), [])


if __name__ == "__main__":
    unittest.main()
