"""One life of a run (issue 22, items 2 and 3): every path that ends a run keeps the first final status;
the index names each run's backend and its folder (the seed's `path` column); run folders and indexes
written by RunPilot 0.5 still read, and 0.5's index migrates with its rows."""

import contextlib
import io
import json
import sqlite3
import tarfile
import unittest
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import BASE, RunsHome

# runs.db as RunPilot 0.5 created it (schema version 3), written out here so that the test does not
# depend on what today's code calls its schema.
SCHEMA_0_5 = """
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    exit_code    INTEGER,
    duration     REAL,
    engine       TEXT,
    image        TEXT,
    last_metrics TEXT NOT NULL DEFAULT '{}',
    tags         TEXT NOT NULL DEFAULT '{}',
    metric_names TEXT NOT NULL DEFAULT '[]',
    sweep_id     TEXT,
    reason       TEXT,
    runner       TEXT NOT NULL DEFAULT '{}',
    slurm_job    TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_duration ON runs(duration);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs(started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status, started_at);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs(name, started_at);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id, started_at);
"""
# The seed's schema, as people query runs.db directly.
SEED_QUERY = "SELECT id, name, status, started_at, finished_at, exit_code, path FROM runs ORDER BY id"

# meta.json of a Slurm run as 0.5 wrote it: the Slurm state in a `slurm` block.
SLURM_META_0_5 = {
    "run_id": "20261120-100000-0000a1", "name": "train", "status": "running",
    "started_at": "2026-11-20T10:00:00.000Z", "engine": "docker", "image": "busybox",
    "runner": {}, "sweep": {}, "tags": {}, "config": {"name": "train"},
    "slurm": {"job_id": "4711", "partition": "debug", "state": "RUNNING", "node": "vm", "submitted_from": "login",
              "options": {"stop_timeout": 10.0, "pull": "missing", "keep_engine_logs": False}},
}


class LifeCase(RunsHome):
    def folder_meta(self, run_id: str) -> dict:
        return json.loads((self.home / "runs" / run_id / "meta.json").read_text())

    def ended_run(self, status: str = "failed", reason: str = "the first ending") -> runpilot.RunRecord:
        return self.add_run("job", status, reason=reason)

    def assertUnchanged(self, run_id: str, before: bytes) -> None:
        self.assertEqual((self.home / "runs" / run_id / "meta.json").read_bytes(), before)
        self.assertEqual(self.store.get(run_id).status, json.loads(before)["status"])


class EndingTwice(LifeCase):
    """Whatever ends a run a second time, meta.json and the index keep the first ending."""

    def test_the_record_refuses_a_second_ending(self):
        meta = runpilot.RunMeta("20261120-100000-0000aa", status=runpilot.RUNNING, started_at=runpilot.utc_now())
        self.assertTrue(meta.end(runpilot.SUCCEEDED, exit_code=0))
        first = meta.to_json()
        self.assertFalse(meta.end(runpilot.LOST, "found lost", lost_at="now"))
        self.assertEqual(meta.to_json(), first)
        with self.assertRaises(ValueError):
            runpilot.RunMeta("20261120-100000-0000ab", status=runpilot.RUNNING).end(runpilot.RUNNING)

    def test_queue_and_start_mark_the_run_active(self):
        meta = runpilot.RunMeta("20261120-100000-0000ac", status=runpilot.RUNNING, started_at="2026-11-20T10:00:00.000Z")
        meta.queue()
        self.assertEqual(meta.status, runpilot.QUEUED)
        meta.start("2026-11-20T10:05:00.000Z")
        self.assertEqual((meta.status, meta.started_at), (runpilot.RUNNING, "2026-11-20T10:05:00.000Z"))

    def test_finish(self):
        record = self.ended_run("interrupted")
        before = (Path(record.path) / "meta.json").read_bytes()
        folder = self.store.folder(record.id)
        events = []
        run = runpilot.RunContext(self.store, runpilot.JobConfig("job", None, ("true",)), folder, folder.read_meta(),
                                  runpilot.RunOptions(), events.append)
        outcome = runpilot.finish(run, runpilot.TeeResult(0))
        self.assertEqual((outcome.record.status, outcome.exit_code), ("interrupted", 128 + 15))
        self.assertEqual([e.kind for e in events], ["finished"])
        self.assertUnchanged(record.id, before)

    def test_fail_before_start(self):
        record = self.ended_run("succeeded")
        before = (Path(record.path) / "meta.json").read_bytes()
        folder = self.store.folder(record.id)
        runpilot.fail_before_start(self.store, folder, folder.read_meta(), runpilot.RunPilotError("no image"))
        self.assertUnchanged(record.id, before)

    def test_a_sweeps_failure_to_start(self):
        record = self.ended_run("cancelled")
        before = (Path(record.path) / "meta.json").read_bytes()
        sweep_runner = object.__new__(runpilot.SweepRunner)
        sweep_runner.store, events = self.store, []
        sweep_runner.report = events.append
        sweep_runner._record_failure(record.id, runpilot.RunPilotError("no image"))
        self.assertEqual(events, [])
        self.assertUnchanged(record.id, before)

    def test_cancel_queued(self):
        record = self.ended_run("timeout")
        before = (Path(record.path) / "meta.json").read_bytes()
        runpilot.cancel_queued(self.store, record.id, 15, "stopped")
        self.assertUnchanged(record.id, before)

    def test_slurms_ending(self):
        meta = self.store.folder(self.ended_run("succeeded").id).read_meta()
        first = meta.to_json()
        runpilot._record_slurm_ending(meta, "FAILED", {"ExitCode": "3:0", "NodeList": "vm"}, self.home,
                                      seen_running=True)
        self.assertEqual(meta.to_json(), first)

    def test_refresh_of_a_run_whose_runner_died(self):
        run_id = "20261120-100000-0000ad"
        record = self.add_run("job", "succeeded", run_id=run_id)
        before = (Path(record.path) / "meta.json").read_bytes()
        stale = runpilot.RunRecord.of(self.store.folder(run_id).read_meta(), Path(record.path))
        stale.status, stale.runner = runpilot.RUNNING, {"pid": 1, "host": runpilot.hostname(), "boot_id": "gone"}
        self.store.save_record(stale)  # the index behind: it still says running
        [now] = runpilot.refresh(self.store, [stale], lambda text: None)
        self.assertEqual(now.status, "succeeded")
        self.assertUnchanged(run_id, before)

    def test_the_node_side_of_a_slurm_run(self):
        record = self.ended_run("interrupted")
        before = (Path(record.path) / "meta.json").read_bytes()
        with self.assertRaises(runpilot.StoreError) as caught:
            runpilot.run_on_node(self.store.folder(record.id), {}, lambda event: None)
        self.assertIn("is interrupted, not queued", str(caught.exception))
        self.assertUnchanged(record.id, before)

    def test_a_box_that_stops_answering_mid_sweep(self):
        record = self.ended_run("succeeded")
        before = (Path(record.path) / "meta.json").read_bytes()
        said = []
        sweep = runpilot.BoxSweep(self.store, None, ["box1"], runpilot.RunOptions(), 1, False, said.append)
        sweep.running, sweep.silent = {record.id: "box1"}, {"box1": 0.0}
        lost = sweep.box_answered("box1", ["cannot reach box1"], [record])
        self.assertEqual(lost[record.id].status, "succeeded")
        self.assertUnchanged(record.id, before)

    def test_a_box_report_after_the_run_was_recorded_lost_here(self):
        record = self.ended_run("lost", reason="box box1 stopped answering")
        before = (Path(record.path) / "meta.json").read_bytes()
        box_meta = json.loads(before)
        box_meta.update(status="succeeded", reason=None)
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for name, body in (("meta.json", json.dumps(box_meta).encode()), ("logs.txt", b"done\n")):
                info = tarfile.TarInfo(f"{record.id}/{name}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        runner = {"backend": "ssh", "box": "box1", "home": "/h", "python": "python3"}
        metas = runpilot.ssh_unpack(self.store, data.getvalue(), {record.id: runner})
        self.assertEqual(metas[record.id].status, "lost")
        self.assertEqual((Path(record.path) / "logs.txt").read_bytes(), b"done\n")  # its files still come home
        self.assertEqual(self.folder_meta(record.id)["status"], "lost")
        self.assertEqual(self.store.get(record.id).status, "lost")


class ThePathColumn(LifeCase):
    def test_a_new_run_has_its_folder_in_the_seeds_columns(self):
        config = self.local_config("print('METRIC loss=0.5')\n")
        code, out, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        [run] = self.runs()
        with contextlib.closing(sqlite3.connect(self.home / "runs.db")) as conn:
            rows = conn.execute(SEED_QUERY).fetchall()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        self.assertEqual(len(rows), 1)
        run_id, name, status, started_at, finished_at, exit_code, path = rows[0]
        self.assertEqual((run_id, name, status, exit_code, path), (run.name, "job", "succeeded", 0, str(run)))
        self.assertTrue(started_at <= finished_at)
        self.assertEqual(version, runpilot.DB_SCHEMA_VERSION)
        [row] = self.db_rows()
        self.assertEqual((row["backend"], row["backend_ref"]), ("here", None))
        self.assertEqual(list(row)[:7], ["id", "name", "status", "started_at", "finished_at", "exit_code", "path"])

    def test_reindex_fills_it(self):
        records = [self.add_run("a", index=False), self.add_run("b", "failed", index=False)]
        self.assertEqual(self.store.reindex(), 2)
        self.assertEqual([r["path"] for r in self.db_rows()], [r.path for r in records])


class OldFolders(LifeCase):
    def write_old_slurm_run(self) -> Path:
        folder = self.home / "runs" / SLURM_META_0_5["run_id"]
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps(SLURM_META_0_5, indent=2))
        return folder

    def test_a_slurm_run_written_by_0_5_names_its_backend_and_job(self):
        folder = self.write_old_slurm_run()
        meta = runpilot.RunFolder(folder).read_meta()
        self.assertEqual(meta.problems, [])
        self.assertEqual((meta.backend, meta.backend_ref), ("slurm", "4711"))
        self.assertEqual((meta.slurm.node, meta.slurm.state, meta.slurm.options["pull"]), ("vm", "RUNNING", "missing"))
        self.assertEqual(json.loads(meta.to_json())["slurm"], SLURM_META_0_5["slurm"])  # written back as read
        self.assertEqual(self.store.reindex(), 1)
        [row] = self.db_rows()
        self.assertEqual((row["backend"], row["backend_ref"], row["path"]), ("slurm", "4711", str(folder)))
        self.assertEqual([r.id for r in self.store.active_runs("slurm")], [SLURM_META_0_5["run_id"]])

    def test_the_slurm_block_keeps_its_keys(self):
        state = runpilot.SlurmState.from_data({"job_id": "12_3", "reason": None, "array_task_id": "three",
                                               "cluster": "c1"})
        self.assertEqual((state.job_id, state.array_task_id, state.extra), ("12_3", None, {"array_task_id": "three",
                                                                                          "cluster": "c1"}))
        state.node = "vm"
        self.assertEqual(state.to_data(), {"job_id": "12_3", "reason": None, "node": "vm", "array_task_id": "three",
                                           "cluster": "c1"})
        here = runpilot.RunMeta("20261120-100000-0000a2")
        self.assertFalse(here.slurm)
        self.assertEqual((json.loads(here.to_json())["slurm"], here.backend, here.backend_ref), ({}, "here", None))

    def test_a_sweeps_run_written_by_0_5_keeps_its_place(self):
        block = {"id": "sw-20261120-100000-ab12", "index": 2, "repeat": 0, "point": {"env.LR": 0.1}}
        record = self.add_run("job", "succeeded", sweep=block)
        meta = self.store.folder(record.id).read_meta()
        self.assertEqual((meta.sweep.id, meta.sweep.index, meta.sweep.point), (block["id"], 2, {"env.LR": 0.1}))
        self.assertEqual(self.folder_meta(record.id)["sweep"], block)
        self.assertEqual(self.store.get(record.id).sweep_id, block["id"])
        meta.sweep = {"id": 7}  # a value of the wrong type: kept as it was, never taken for a sweep id
        self.assertEqual((meta.sweep.id, meta.sweep.to_data()), (None, {"id": 7}))

    def test_an_ssh_run_names_its_box(self):
        record = self.add_run("job", "running", runner={"backend": "ssh", "box": "gpu1", "home": "/h"})
        self.assertEqual((record.backend, record.backend_ref), ("ssh", "gpu1"))
        self.assertEqual(self.store.get(record.id).backend_ref, "gpu1")


class OldIndex(LifeCase):
    """runs.db as 0.5 left it: its rows carry over into the new columns, and the seed's query works."""

    def write_old_index(self, rows: list[tuple]) -> None:
        self.home.mkdir(exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.home / "runs.db")) as conn, conn:
            conn.executescript(SCHEMA_0_5)
            conn.executemany("INSERT INTO runs (id, name, status, started_at, finished_at, exit_code, duration, engine, "
                             "image, last_metrics, tags, metric_names, sweep_id, reason, runner, slurm_job) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("PRAGMA user_version=3")

    def test_its_rows_migrate(self):
        here = self.add_run("here", "succeeded", index=False)
        slurm_folder = self.home / "runs" / SLURM_META_0_5["run_id"]
        slurm_folder.mkdir()
        (slurm_folder / "meta.json").write_text(json.dumps(SLURM_META_0_5))
        gone = "20261120-090000-00beef"  # a row whose folder is gone: it stays until a reindex
        self.write_old_index([
            (here.id, "here", "succeeded", here.started_at, here.finished_at, 0, 10.0, "local", None,
             '{"loss": 0.5}', '{"try": "1"}', '["loss"]', None, None, '{"pid": 1, "host": "elsewhere"}', None),
            (SLURM_META_0_5["run_id"], "train", "running", SLURM_META_0_5["started_at"], None, None, None, "docker",
             "busybox", "{}", "{}", "[]", None, None, "{}", "4711"),
            (gone, "box", "running", "2026-11-20T09:00:00.000Z", None, None, None, "docker", "busybox", "{}", "{}",
             "[]", "sw-1", None, '{"backend": "ssh", "box": "gpu1"}', None),
        ])
        records = {r.id: r for r in self.store.query()}  # the first use migrates
        self.assertEqual(set(records), {here.id, SLURM_META_0_5["run_id"], gone})
        self.assertEqual((records[here.id].last_metrics, records[here.id].tags), ({"loss": 0.5}, {"try": "1"}))
        self.assertEqual((records[gone].backend, records[gone].backend_ref, records[gone].sweep_id),
                         ("ssh", "gpu1", "sw-1"))
        rows = {r["id"]: r for r in self.db_rows()}
        self.assertEqual({i: (r["backend"], r["backend_ref"]) for i, r in rows.items()},
                         {here.id: ("here", None), SLURM_META_0_5["run_id"]: ("slurm", "4711"), gone: ("ssh", "gpu1")})
        with contextlib.closing(sqlite3.connect(self.home / "runs.db")) as conn:
            seed = conn.execute(SEED_QUERY).fetchall()
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], runpilot.DB_SCHEMA_VERSION)
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        self.assertEqual(tables, ["runs"])
        self.assertNotIn("slurm_job", columns)
        self.assertEqual([(r[0], r[2], r[6]) for r in seed],
                         [(gone, "running", str(self.home / "runs" / gone)),
                          (here.id, "succeeded", here.path),
                          (SLURM_META_0_5["run_id"], "running", str(slurm_folder))])
        self.assertEqual([r.id for r in self.store.active_runs("slurm")], [SLURM_META_0_5["run_id"]])

    def test_a_damaged_runner_cell_does_not_stop_the_migration(self):
        self.write_old_index([("20261120-080000-00dead", "odd", "failed", "2026-11-20T08:00:00.000Z", None, 1, None,
                               None, None, "{}", "{}", "[]", None, None, "not json", None)])
        with self.store.db():
            pass
        self.assertEqual([(r["id"], r["backend"], r["backend_ref"]) for r in self.db_rows()],
                         [("20261120-080000-00dead", "here", None)])

    def test_list_reads_it(self):
        here = self.add_run("here", "succeeded", index=False)
        self.write_old_index([(here.id, "here", "succeeded", here.started_at, here.finished_at, 0, 10.0, "local",
                               None, "{}", "{}", "[]", None, None, "{}", None)])
        code, out, err = self.cli("list", "--json")
        self.assertEqual(code, 0, err)
        [row] = json.loads(out)
        self.assertEqual((row["id"], row["status"], row["path"]), (here.id, "succeeded", here.path))
        self.assertNotIn("backend", row)  # `list --json` says what 0.5's did


if __name__ == "__main__":
    unittest.main()


def meta_bytes(data: dict) -> bytes:
    """meta.json's bytes as RunPilot writes them."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


class TheRunnerPart(LifeCase):
    """meta.json's `runner` block as a typed part (RunnerState): the shapes RunPilot wrote read, and are
    written back byte for byte; a wrongly typed value is kept, never taken for a pid or a box."""

    RUN_ID = "20261120-100000-0000b1"
    HERE = {"pid": 4242, "host": "gpu-box-1", "boot_id": "b" * 36, "start": "123456"}
    SSH = {"backend": "ssh", "box": "gpu1", "home": "/home/u/.runpilot", "python": "python3",
           "program": "/home/u/.runpilot/bin/runpilot-0.6.py", "config_file": "/src/train.yaml", "rerun_of": None,
           "code": {"mode": "snapshot"}, "pull_outputs": False,
           "sweep": {"id": "sw-20261120-100000-ab12", "index": 0, "repeat": 0, "point": {"env.LR": 0.1}}}

    def old_file(self, runner: object) -> bytes:
        data = json.loads(runpilot.RunMeta(self.RUN_ID, name="job", status=runpilot.RUNNING,
                                           started_at="2026-11-20T10:00:00.000Z").to_json())
        return meta_bytes(dict(data, runner=runner, future_key={"kept": True}))

    def read(self, raw: bytes) -> runpilot.RunMeta:
        return runpilot.RunMeta.from_json(json.loads(raw), self.RUN_ID)

    def test_a_run_here_reads_and_round_trips(self):
        raw = self.old_file(self.HERE)
        meta = self.read(raw)
        self.assertEqual(meta.problems, [])
        self.assertEqual((meta.runner.pid, meta.runner.host, meta.runner.start, meta.runner.extra),
                         (4242, "gpu-box-1", "123456", {}))
        self.assertEqual((meta.backend, meta.backend_ref), ("here", None))
        self.assertEqual(meta.to_json(), raw)
        self.assertIsNone(runpilot.runner_alive(meta.runner))  # another host: cannot be told from here

    def test_an_ssh_run_keeps_its_backends_keys(self):
        raw = self.old_file(self.SSH)
        meta = self.read(raw)
        self.assertEqual(meta.problems, [])
        self.assertEqual((meta.backend, meta.backend_ref, meta.runner.pid), ("ssh", "gpu1", None))
        self.assertEqual(meta.runner.extra["home"], "/home/u/.runpilot")  # the ssh backend's, in extra
        self.assertEqual(meta.runner.to_data(), self.SSH)
        self.assertEqual(meta.to_json(), raw)
        self.assertIsInstance(runpilot.runner_backend(meta.runner), runpilot.SshBackend)

    def test_an_empty_and_a_null_valued_runner(self):
        for runner in ({}, {"pid": 7, "host": "h", "boot_id": None, "start": None}):
            raw = self.old_file(runner)
            self.assertEqual(self.read(raw).to_json(), raw)
        self.assertFalse(self.read(self.old_file({})).runner)

    def test_wrongly_typed_values_are_kept_not_used(self):
        runner = {"pid": "4242", "host": 5, "backend": ["ssh"], "box": 3, "start": 99}
        raw = self.old_file(runner)
        meta = self.read(raw)
        self.assertEqual(meta.problems, [])
        self.assertEqual((meta.runner.pid, meta.runner.host, meta.runner.backend, meta.runner.box),
                         (None, None, None, None))
        self.assertEqual((meta.backend, meta.backend_ref), ("here", None))
        self.assertIsNone(runpilot.runner_alive(meta.runner))
        self.assertIsNone(runpilot.runner_backend(meta.runner))
        self.assertEqual(meta.to_json(), raw)

    def test_a_runner_that_is_no_object_is_a_problem(self):
        meta = self.read(self.old_file(["pid", 1]))
        self.assertEqual(meta.problems, ["field 'runner' should be dict, found [\"pid\", 1]"])
        self.assertFalse(meta.runner)

    def test_the_index_keeps_the_same_runner(self):
        record = self.add_run("job", "running", runner=self.SSH)
        self.assertEqual(self.folder_meta(record.id)["runner"], self.SSH)
        [row] = self.db_rows()
        self.assertEqual(json.loads(row["runner"]), self.SSH)
        again = self.store.get(record.id)
        self.assertEqual((again.runner.box, again.runner.to_data()), ("gpu1", self.SSH))
        self.assertEqual(again.runner, self.SSH)


class TheSweepOptions(LifeCase):
    """sweep.json's `options` as a typed part (SweepOptions): sweep.json as RunPilot writes it (not sorted)
    reads and is written back byte for byte; a wrongly typed value is kept, never used."""

    SWEEP_ID = "sw-20261120-100000-ab12c3"
    OPTIONS = {"engine": None, "tags": {"team": "a"}, "gpus": ["0", "1"], "parallel": 2, "fail_fast": False,
               "stop_timeout": 10.0, "pull": "missing", "overrides": ["env.X=1"], "no_gpu_check": False,
               "no_wait": False, "engine_logs": False, "code_snapshots": {}, "live_code": False}

    def write_plan(self, options: object) -> bytes:
        plan = {"sweep_id": self.SWEEP_ID, "config_file": "/src/train.yaml", "axes": [["env.LR", [0.1, 0.2]]],
                "repeat": 1, "points": [{"index": 0, "values": [["env.LR", 0.1]], "repeat": 0,
                                         "run_id": "20261120-100000-0000c1"}],
                "options": options, "created_at": "2026-11-20T10:00:00.000Z", "runner": {}}
        raw = (json.dumps(plan, indent=2) + "\n").encode()
        folder = self.store.sweep_folder(self.SWEEP_ID)
        folder.path.mkdir(parents=True)
        folder.plan.write_bytes(raw)
        return raw

    def load_and_save(self) -> tuple[runpilot.Sweep, bytes]:
        sweep = runpilot.Sweep.load(self.store, self.SWEEP_ID)
        sweep.save(self.store)
        return sweep, self.store.sweep_folder(self.SWEEP_ID).plan.read_bytes()

    def test_a_local_sweeps_options_read_and_round_trip(self):
        raw = self.write_plan(self.OPTIONS)
        sweep, again = self.load_and_save()
        self.assertEqual(again, raw)
        options = runpilot._resume_options(sweep.options, mock.Mock(gpus=None, no_gpu_check=False, no_wait=False,
                                                                    engine_logs=False, live_code=False))
        self.assertEqual((options.tags, options.gpu_pool, options.stop_timeout, options.overrides),
                         ({"team": "a"}, ["0", "1"], 10.0, ["env.X=1"]))
        self.assertEqual((sweep.options.on, sweep.options.parallel), (None, 2))

    def test_backends_keys_and_unknown_keys_keep_their_place(self):
        stored = {"engine": None, "tags": {}, "parallel": None, "on": "ssh:gpu1,gpu2", "fail_fast": True,
                  "code_snapshots": {}, "pull_outputs": True, "from_the_future": [1]}
        raw = self.write_plan(stored)
        sweep, again = self.load_and_save()
        self.assertEqual(again, raw)
        self.assertEqual((sweep.options.on, sweep.options.fail_fast, sweep.options.get("pull_outputs")),
                         ("ssh:gpu1,gpu2", True, True))

    def test_wrongly_typed_values_are_kept_not_used(self):
        raw = self.write_plan({"on": 5, "parallel": "4", "tags": None, "fail_fast": "yes"})
        sweep, again = self.load_and_save()
        self.assertEqual(again, raw)
        self.assertEqual((sweep.options.on, sweep.options.parallel, sweep.options.tags, sweep.options.fail_fast),
                         (None, None, {}, None))

    def test_options_that_are_no_object_are_refused_in_one_line(self):
        self.write_plan([])
        with self.assertRaises(runpilot.StoreError) as caught:
            runpilot.Sweep.load(self.store, self.SWEEP_ID)
        self.assertIn("'options' must be an object", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_a_new_sweep_writes_the_keys_it_was_given_in_order(self):
        options = runpilot.SweepOptions.from_data(dict(self.OPTIONS))
        options.parallel = 3
        self.assertEqual(list(options.to_data()), list(self.OPTIONS))
        self.assertEqual(options.to_data()["parallel"], 3)


class ThePlannedPoints(LifeCase):
    """sweep.json's `points` as typed PlannedPoints: a resumed point's earlier runs and keys this
    version does not know read and are written back byte for byte, in their order."""

    SWEEP_ID, OPTIONS = TheSweepOptions.SWEEP_ID, TheSweepOptions.OPTIONS
    load_and_save = TheSweepOptions.load_and_save

    def write_points(self, points: list) -> bytes:
        plan = {"sweep_id": self.SWEEP_ID, "config_file": "/src/train.yaml", "axes": [["env.LR", [0.1, 0.2]]],
                "repeat": 1, "points": points, "options": self.OPTIONS,
                "created_at": "2026-11-20T10:00:00.000Z", "runner": {}}
        raw = (json.dumps(plan, indent=2) + "\n").encode()
        folder = self.store.sweep_folder(self.SWEEP_ID)
        folder.path.mkdir(parents=True)
        folder.plan.write_bytes(raw)
        return raw

    def test_earlier_runs_and_unknown_keys_round_trip(self):
        points = [{"index": 0, "values": [["env.LR", 0.1]], "repeat": 0, "run_id": "20261120-100000-0000c1",
                   "earlier": ["20261120-090000-0000a1"], "from_the_future": {"x": 1}},
                  {"index": 1, "values": [["env.LR", 0.2]], "repeat": 0, "run_id": "20261120-100000-0000c2"}]
        raw = self.write_points(points)
        sweep, again = self.load_and_save()
        self.assertEqual(again, raw)
        first, second = sweep.points
        self.assertEqual((first.run_id, first.earlier, first.grid_point().label(1)),
                         ("20261120-100000-0000c1", ["20261120-090000-0000a1"], "LR=0.1"))
        self.assertEqual(runpilot.sweep_labels(sweep)["20261120-100000-0000c2"], "[2/2 LR=0.2]")

    def test_a_resume_keeps_the_replaced_run_as_an_earlier_one(self):
        self.write_points([{"index": 0, "values": [["env.LR", 0.1]], "repeat": 0,
                            "run_id": "20261120-100000-0000c1"}])
        sweep = runpilot.Sweep.load(self.store, self.SWEEP_ID)
        sweep.points[0].replaced_by("20261120-110000-0000d1")
        sweep.save(self.store)
        saved = json.loads(self.store.sweep_folder(self.SWEEP_ID).plan.read_text())["points"][0]
        self.assertEqual(saved, {"index": 0, "values": [["env.LR", 0.1]], "repeat": 0,
                                 "run_id": "20261120-110000-0000d1", "earlier": ["20261120-100000-0000c1"]})
        self.assertEqual(list(saved), ["index", "values", "repeat", "run_id", "earlier"])
