"""Many runs on one GPU box (issue 15): sweeps, one run per free GPU, claims across processes.

Without GPUs: tests/fixtures/nvidia-smi stands in for the real tool (FAKE_NVIDIA_SMI=4xh100 lists
four), and engine local jobs print CUDA_VISIBLE_DEVICES with their start and end times, so the
tests can check that no two overlapping runs ever shared a GPU. Real Docker and Podman sweeps are
in test_integration.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import runpilot
from tests.common import ROOT, RUNPILOT, HomeTestCase, LiveRun, pid_alive

FIXTURES = ROOT / "tests" / "fixtures"

# A job that records which GPUs it got and when it held them.
TIMED = """\
import json, os, time
start = time.time()
time.sleep(float(os.environ.get("HOLD", "0.6")))
gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
with open("spans.jsonl", "a") as f:
    f.write(json.dumps({"gpus": gpus, "start": start, "end": time.time(), "lr": os.environ.get("LR"),
                        "repeat": os.environ.get("RUNPILOT_REPEAT"), "run": os.environ["RUNPILOT_RUN_ID"]}) + "\\n")
print(f"METRIC loss={float(os.environ.get('LR', '1')) * 10}")
"""


class SweepCase(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.env = {"PATH": f"{FIXTURES}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI": "4xh100"}
        self.patch_env(self.env)

    def patch_env(self, env: dict) -> None:
        from unittest import mock
        patcher = mock.patch.dict(os.environ, env)
        patcher.start()
        self.addCleanup(patcher.stop)

    def config(self, gpus: object = 1, extra: str = "", script: str = TIMED) -> Path:
        return self.local_config(script, name="lr", extra=f"resources: {{gpus: {json.dumps(gpus)}}}\n"
                                 f"metrics: [loss]\nenv: {{LR: 0.5}}\n{extra}")

    def spans(self) -> list[dict]:
        path = self.work / "spans.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def assert_never_shared(self, spans: list[dict]) -> int:
        """No two runs that overlapped in time held the same GPU; returns the most held at once."""
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a["start"] < b["end"] and b["start"] < a["end"]:
                    shared = set(a["gpus"].split(",")) & set(b["gpus"].split(","))
                    self.assertEqual(shared, set(), f"{a} and {b} overlapped on a GPU")
        moments = sorted({s["start"] for s in spans})
        return max(sum(1 for s in spans if s["start"] <= t < s["end"]) for t in moments)


class Grid(SweepCase):
    def test_points_are_the_product_typed_as_yaml(self):
        axes = runpilot.parse_grid(["train.LR=0.1,1e-3,x", "seed=[1, 2]"])
        self.assertEqual(axes, (("train.LR", (0.1, 0.001, "x")), ("seed", (1, 2))))
        self.assertEqual(runpilot.parse_grid(["env.LR=0.1,1e-3"]), (("env.LR", ("0.1", "1e-3")),))  # env: text
        points = runpilot.sweep_points(axes, repeat=2)
        self.assertEqual(len(points), 12)
        self.assertEqual([p.values for p in points[:3]],
                         [(("train.LR", 0.1), ("seed", 1))] * 2 + [(("train.LR", 0.1), ("seed", 2))])
        self.assertEqual([p.repeat for p in points[:4]], [0, 1, 0, 1])
        self.assertEqual(points[7].label(2), "LR=0.001,seed=2,repeat=1")
        for bad in ("env.LR", "=1,2", "env.LR=[[1], 2]"):
            with self.subTest(bad=bad), self.assertRaises(runpilot.UsageError):
                runpilot.parse_grid([bad])

    def test_dry_run_prints_the_plan_and_records_nothing(self):
        code, out, err = self.cli("sweep", self.config(), "--grid", "env.LR=0.1,0.01", "--repeat", "2", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertIn("4 run(s), 4 at a time", err)
        self.assertIn("  4. LR=0.01,repeat=1", err)
        self.assertFalse(self.home.exists())

    def test_a_sweep_section_is_read_by_sweep_only(self):
        config = self.config(gpus=0, extra="sweep:\n  env.LR: [0.2, 0.02]\n")
        code, out, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        self.assertIn("only `runpilot sweep` reads", err)
        self.assertEqual([s["lr"] for s in self.spans()], ["0.5"])
        code, out, err = self.cli("sweep", config)
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(s["lr"] for s in self.spans()), ["0.02", "0.2", "0.5"])

    def test_a_bad_value_for_one_point_records_nothing(self):
        code, out, err = self.cli("sweep", self.config(gpus=0), "--grid", "resources.cpu=1,-2")
        self.assertEqual(code, 2, err)
        self.assertEqual(err, "runpilot: error: --grid resources.cpu (point 2: resources.cpu=-2): resources.cpu must "
                              "be a positive number of CPUs; got -2\n")
        self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))

    def test_a_bad_sweep_section_is_located_in_the_file_by_validate_too(self):
        config = self.write("bad.yaml", "name: s\nengine: local\nentrypoint: 'true'\nsweep:\n"
                                        "  env.LR: [0.1]\n  resources.gpus: [1, two]\n")
        for command in ("validate", "sweep"):
            with self.subTest(command=command):
                code, out, err = self.cli(command, config)
                self.assertEqual((code, out), (2, ""))
                self.assertTrue(err.startswith(f"runpilot: error: {config}:6:3 (point 2: resources.gpus=two): "
                                               "resources.gpus must be a count"), err)


class Placement(SweepCase):
    def test_a_sweep_fills_the_pool_and_never_shares_a_gpu(self):
        code, out, err = self.cli("sweep", self.config(), "--grid", "env.LR=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
        self.assertEqual(code, 0, err)
        spans = self.spans()
        self.assertEqual(len(spans), 8)
        most = self.assert_never_shared(spans)
        self.assertEqual(most, 4)  # reaches the pool, never more
        self.assertTrue(all(s["gpus"] in ("0", "1", "2", "3") for s in spans))
        for line in ("started on GPU", "succeeded in"):
            self.assertEqual(err.count(line), 8, err)
        last = next(line for line in out.splitlines() if line.startswith("loss (last)"))
        self.assertEqual(last.split()[2:4], ["1*", "2"])  # the end table marks the best run
        self.assertNotIn("name", out)  # a sweep's runs are told apart by the swept values

    def test_two_gpus_per_run_and_parallel_caps_it(self):
        code, out, err = self.cli("sweep", self.config(gpus=2), "--grid", "env.LR=0.1,0.2,0.3,0.4")
        self.assertEqual(code, 0, err)
        spans = self.spans()
        self.assertEqual(self.assert_never_shared(spans), 2)
        self.assertTrue(all(len(s["gpus"].split(",")) == 2 for s in spans))
        (self.work / "spans.jsonl").unlink()
        code, out, err = self.cli("sweep", self.config(), "--grid", "env.LR=0.1,0.2,0.3", "--parallel", "1",
                                  "--gpus", "2,3")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.assert_never_shared(self.spans()), 1)
        self.assertTrue(all(s["gpus"] in ("2", "3") for s in self.spans()))

    def test_runs_without_gpus_run_one_at_a_time_unless_parallel(self):
        code, out, err = self.cli("sweep", self.config(gpus=0), "--grid", "env.LR=0.1,0.2,0.3")
        self.assertEqual(code, 0, err)
        spans = self.spans()
        self.assertEqual(self.assert_never_shared(spans), 1)
        self.assertEqual({s["gpus"] for s in spans}, {""})

    def test_separate_runs_get_different_gpus_and_wait_queued(self):
        config = self.config(gpus=2)
        env = {"HOLD": "2.5"}
        procs = [subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, **env}) for _ in range(3)]
        results = [p.communicate(timeout=60) for p in procs]
        self.assertEqual([p.returncode for p in procs], [0, 0, 0], results)
        spans = self.spans()
        self.assertEqual(self.assert_never_shared(spans), 2)
        waited = [err for _, err in results if b"queued, waiting for 2 GPUs: GPU" in err]
        self.assertEqual(len(waited), 1, results)
        self.assertIn(b"is held by run", waited[0])

    def test_no_wait_fails_at_once_and_records_nothing(self):
        live = LiveRun(self, self.config(gpus="all", script="import time\nprint('ready', flush=True)\n"
                                                             "time.sleep(30)\n"))
        started = time.monotonic()
        code, out, err = self.cli("run", self.config(gpus=1), "--no-wait")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(code, 1, err)
        self.assertIn("waiting for 1 GPU: GPU 0 is held by run", err)
        self.assertEqual(len(self.runs()), 1)
        live.proc.send_signal(signal.SIGINT)
        live.finish()

    def test_a_sigkilled_runners_gpus_are_free_again(self):
        live = LiveRun(self, self.config(gpus="all", script="import os, time\nopen('job.pid', 'w').write("
                                                             "str(os.getpid()))\nprint('ready', flush=True)\n"
                                                             "time.sleep(30)\n"))
        live.proc.kill()
        live.proc.wait()
        os.kill(int((self.work / "job.pid").read_text()), signal.SIGKILL)  # its job too, as `stop` would
        code, out, err = self.cli("run", self.config(gpus=4), "--no-wait")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(self.cli("list", "--json")[1])[0]["status"], "succeeded")

    def test_a_job_that_outlives_its_runner_keeps_its_gpus_until_it_ends(self):
        live = LiveRun(self, self.config(gpus=[0], script="import os, time\nopen('job.pid', 'w').write("
                                                         "str(os.getpid()))\nprint('ready', flush=True)\n"
                                                         "time.sleep(30)\n"))
        live.proc.kill()  # the runner dies holding GPU 0; its job runs on, as a container would
        live.proc.wait()
        job = int((self.work / "job.pid").read_text())
        self.addCleanup(lambda: pid_alive(job) and os.kill(job, signal.SIGKILL))
        run_id = self.runs()[0].name
        code, out, err = self.cli("run", self.config(gpus=[0]), "--no-wait")
        self.assertEqual(code, 1, err)
        self.assertIn(f"waiting for GPU 0: GPU 0 is used by run {run_id}, whose runner died while its job "
                      f"runs on ('runpilot stop {run_id}' ends it)", err)
        self.assertEqual(len(self.runs()), 1)
        code, out, err = self.cli("run", self.config(gpus=4), "--no-wait")  # the other three are not enough
        self.assertEqual(code, 1, err)
        self.assertEqual(self.cli("stop", run_id)[0], 0)
        self.assertFalse(pid_alive(job))
        code, out, err = self.cli("run", self.config(gpus=4), "--no-wait")
        self.assertEqual(code, 0, err)
        self.assertIn("on GPU 0,1,2,3", err)

    def test_a_uuid_in_the_pool_claims_the_same_gpu_as_its_index(self):
        # locked under the text typed, GPU-6f2e... and 0 were two GPUs: two runs at once on GPU 0
        uuid = "GPU-6f2e4b7a-1c0d-3e7f-9a8b-2c4d6e8f0a1b"
        live = LiveRun(self, self.config(script="import time\nprint('ready', flush=True)\ntime.sleep(30)\n"),
                       "--gpus", uuid)
        code, out, err = self.cli("run", self.config(), "--gpus", "0", "--no-wait")
        self.assertEqual(code, 1, err)
        self.assertIn("waiting for 1 GPU: GPU 0 is held by run", err)
        live.proc.send_signal(signal.SIGINT)
        live.finish()
        self.assertEqual(self.meta(self.runs()[0])["devices"], ["0"])
        code, out, err = self.cli("sweep", self.config(), "--gpus", f"{uuid},0", "--grid", "env.LR=1,2")
        self.assertEqual((code, err), (2, f"runpilot: error: --gpus {uuid},0 names one GPU twice (by its index and "
                                          "its UUID); name it once\n"))

    def test_what_run_refuses_a_sweep_refuses_before_recording(self):
        # each was a failed run per point: GPUs the machine lacks, in the config or in --gpus
        for argv, words in ((("--set", "resources.gpus=5"), "resources.gpus asks for 5 GPUs but this machine has 4"),
                            (("--gpus", "9"), "--gpus names GPU 9, which nvidia-smi does not list (GPUs here: "
                                              "0, 1, 2, 3)")):
            with self.subTest(argv=argv):
                code, out, err = self.cli("sweep", self.config(), *argv, "--grid", "env.LR=1,2")
                self.assertEqual(code, 1, err)
                self.assertTrue(err.startswith(f"runpilot: error: {words}") and err.count("\n") == 1, err)
                self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))
        self.assertEqual(self.cli("run", self.config(), "--gpus", "9")[0], 1)
        self.assertEqual(self.cli("run", self.config(), "--gpus", "9", "--no-gpu-check")[0], 0)

    def test_devices_are_recorded_and_pinned_runs_wait_for_theirs(self):
        code, out, err = self.cli("run", self.config(gpus=[2, 0]))
        self.assertEqual(code, 0, err)
        meta = self.meta(self.only_run())
        self.assertEqual((meta["devices"], self.spans()[0]["gpus"]), (["2", "0"], "2,0"))


class Control(SweepCase):
    def sweep(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "sweep", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.communicate()))
        return proc

    def wait_for_running(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (self.home / "runs.db").exists():
                code, out, _ = self.cli("list", "--status", "running", "-q")
                if len(out.split()) >= count:
                    return
            time.sleep(0.1)
        self.fail("the sweep's runs never started")

    LONG = "import os, time\nopen(f\"{os.environ['RUNPILOT_RUN_ID']}.pid\", 'w').write(str(os.getpid()))\ntime.sleep(60)\n"

    def test_ctrl_c_stops_the_running_cancels_the_rest_and_leaves_nothing(self):
        proc = self.sweep(self.config(script=self.LONG), "--grid", "env.LR=1,2,3,4,5,6")
        self.wait_for_running(4)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        statuses = sorted(r["status"] for r in json.loads(self.cli("list", "--json", "--all")[1]))
        self.assertEqual(statuses, ["cancelled"] * 2 + ["interrupted"] * 4)
        for pid_file in self.work.glob("*.pid"):
            self.assertFalse(pid_alive(int(pid_file.read_text())))

    def test_stop_from_another_terminal_and_resume(self):
        job = self.LONG.replace("time.sleep(60)", "time.sleep(0 if os.path.exists('fast') else 60)")
        proc = self.sweep(self.config(script=job), "--grid", "env.LR=1,2,3,4,5,6")
        self.wait_for_running(4)
        sweep_id = json.loads(self.cli("list", "--json")[1])[0]["sweep_id"]
        code, out, err = self.cli("stop", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertIn(f"sweep {sweep_id}: 4 interrupted, 2 cancelled", out)
        self.assertEqual(proc.wait(timeout=30), 143)
        (self.work / "fast").write_text("")
        code, out, err = self.cli("sweep", "--resume", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertIn("resuming sweep", err)
        rows = json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1])
        self.assertEqual(sorted(r["status"] for r in rows), ["interrupted"] * 4 + ["succeeded"] * 6)
        points = json.loads((self.home / "sweeps" / sweep_id / "sweep.json").read_text())["points"]
        latest = {r["id"]: r["status"] for r in rows}
        self.assertEqual([latest[p["run_id"]] for p in points], ["succeeded"] * 6)
        code, out, err = self.cli("sweep", "--resume", sweep_id)
        self.assertEqual((code, out.strip()), (0, f"sweep {sweep_id}: every point has finished; nothing to resume"))

    def test_fail_fast_and_the_exit_status(self):
        failing = ("import os, sys, time\ntime.sleep(float(os.environ['LR']))\n"
                   "sys.exit(3 if os.environ['LR'] == '0.2' else 0)\n")
        code, out, err = self.cli("sweep", self.config(gpus=0, script=failing), "--grid", "env.LR=0.2,0.1,5",
                                  "--fail-fast")
        self.assertEqual(code, 1, err)  # a run failed; no signal stopped the sweep (128+N would say one did)
        rows = json.loads(self.cli("list", "--json")[1])
        statuses = {r["name"]: r["status"] for r in rows}
        self.assertEqual(statuses, {"lr[LR=0.2]": "failed", "lr[LR=0.1]": "cancelled", "lr[LR=5]": "cancelled"})
        failed = next(r["id"] for r in rows if r["status"] == "failed")
        for row in rows:
            if row["status"] == "cancelled":
                meta = json.loads((self.home / "runs" / row["id"] / "meta.json").read_text())
                self.assertEqual((meta["stop_signal"], meta["reason"]),
                                 (None, f"--fail-fast: run {failed} did not succeed"))
        code, out, err = self.cli("sweep", self.config(gpus=0, script=failing), "--grid", "env.LR=0.2,0.1")
        self.assertEqual(code, 1, err)  # one failure does not stop the others, but the sweep says so

    def test_detached_sweep_survives_and_stops(self):
        code, out, err = self.cli("sweep", self.config(script=self.LONG), "--grid", "env.LR=1,2", "-d")
        self.assertEqual(code, 0, err)
        sweep_id = out.strip()
        self.assertRegex(sweep_id, r"^sw-\d{8}-\d{6}-[0-9a-f]{6}$")
        self.wait_for_running(2)
        self.assertEqual(self.cli("stop", sweep_id)[0], 0)
        statuses = sorted(r["status"] for r in json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1]))
        self.assertEqual(statuses, ["interrupted", "interrupted"])

    def test_ctrl_c_while_the_points_are_recorded_leaves_every_record_true(self):
        # a Ctrl-C that landed while 1,000 points were recorded left queued folders no index row knew.
        # The Ctrl-C lands once the first, the 150th and the last of 300 folders exists (by count, not
        # after a fixed sleep: on a fast machine and a loaded one alike it lands while they are recorded,
        # and, the last time, once all are, while the points run).
        config = self.config(gpus=0, script="pass\n")
        values = ",".join(str(i) for i in range(1, 301))
        for landing in (1, 150, 300):
            with self.subTest(landing=landing):
                before = len(self.runs())
                proc = self.sweep(config, "--grid", f"env.LR={values}")
                started = time.monotonic()
                while len(self.runs()) < before + landing and time.monotonic() - started < 60 and proc.poll() is None:
                    time.sleep(0.002)  # Python compiling the file: a Ctrl-C there is Python's, not RunPilot's
                self.assertIsNone(proc.poll(), "the sweep ended before its Ctrl-C")
                proc.send_signal(signal.SIGINT)
                self.assertEqual(proc.wait(timeout=60), 130)
                folders = {path.name for path in self.runs()}
                rows = json.loads(self.cli("list", "--json", "--all")[1])
                self.assertEqual({r["id"] for r in rows}, folders)
                self.assertNotIn("queued", {r["status"] for r in rows})
                self.assertEqual({self.meta(self.home / "runs" / r["id"])["status"] for r in rows},
                                 {r["status"] for r in rows})

    def test_stopping_one_run_stops_only_that_run(self):
        # the sweep's runner runs every point: a SIGTERM to it stopped the whole sweep
        proc = self.sweep(self.config(gpus=0, script=self.LONG), "--grid", "env.LR=1,2,3,4", "--parallel", "2")
        self.wait_for_running(2)
        rows = json.loads(self.cli("list", "--json", "--status", "running")[1])
        queued = json.loads(self.cli("list", "--json", "--status", "queued")[1])[0]["id"]
        self.assertEqual(self.cli("stop", queued)[1], f"run {queued} cancelled\n")  # a point not started yet
        code, out, err = self.cli("stop", rows[0]["id"])
        self.assertEqual((code, out), (0, f"run {rows[0]['id']} interrupted\n"), err)
        self.wait_for_running(2)  # the sweep goes on: the last point takes the freed slot
        self.assertIn(rows[1]["id"], self.cli("list", "--status", "running", "-q")[1])
        sweep_id = rows[0]["sweep_id"]
        self.assertEqual(self.cli("stop", sweep_id)[1], f"sweep {sweep_id}: 3 interrupted, 1 cancelled\n")
        self.assertEqual(proc.wait(timeout=30), 143)

    def test_stopping_a_sweep_whose_runner_died_ends_its_jobs(self):
        proc = self.sweep(self.config(gpus=0, script=self.LONG), "--grid", "env.LR=1,2,3")
        self.wait_for_running(1)
        proc.kill()
        proc.wait()
        sweep_id = json.loads(self.cli("list", "--json")[1])[0]["sweep_id"]
        code, out, err = self.cli("stop", sweep_id)
        self.assertEqual((code, out), (0, f"sweep {sweep_id}: 2 cancelled, 1 lost\n"), err)
        for pid_file in self.work.glob("*.pid"):
            self.assertFalse(pid_alive(int(pid_file.read_text())))

    def test_resume_keeps_the_sweeps_options_and_refuses_changes(self):
        env = {"FAKE_NVIDIA_SMI": "none"}  # nvidia-smi answers, with no GPU: only --no-gpu-check lets a run start
        self.patch_env(env)
        job = self.LONG.replace("time.sleep(60)", "time.sleep(0 if os.path.exists('fast') else 60)")
        proc = self.sweep(self.config(gpus=1, script=job), "--grid", "env.LR=1,2", "--no-gpu-check")
        self.wait_for_running(1)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=30), 130)
        sweep_id = json.loads(self.cli("list", "--json")[1])[0]["sweep_id"]
        code, out, err = self.cli("sweep", "--resume", sweep_id, "--set", "env.LR=9")
        self.assertEqual((code, err), (2, "runpilot: error: --resume runs the points as they were recorded; --set "
                                          "cannot be given with it (start a new sweep to change them)\n"))
        (self.work / "fast").write_text("")
        code, out, err = self.cli("sweep", "--resume", sweep_id)
        self.assertEqual(code, 0, err)
        rows = json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1])
        self.assertEqual([(r["name"], r["status"]) for r in rows],  # in plan order, a point's earlier run first
                         [("lr[LR=1]", "interrupted"), ("lr[LR=1]", "succeeded"), ("lr[LR=2]", "succeeded")])

    def test_a_deleted_point_is_not_resumed_and_nothing_stray_is_left(self):
        proc = self.sweep(self.config(gpus=0, script=self.LONG), "--grid", "env.LR=1,2,3")
        self.wait_for_running(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        rows = json.loads(self.cli("list", "--json")[1])
        sweep_id, cancelled = rows[0]["sweep_id"], [r["id"] for r in rows if r["status"] == "cancelled"]
        self.assertEqual(self.cli("rm", "-y", cancelled[0])[0], 0)
        (self.work / "fast").write_text("")
        code, out, err = self.cli("sweep", "--resume", sweep_id, "--parallel", "3", "--set", "x=1")
        self.assertEqual(code, 2, err)
        self.assertEqual(len(self.runs()), 2)  # nothing recorded by the refused resume

    def test_grid_mistakes_and_a_taken_sweep_id_record_nothing(self):
        config = self.config(gpus=0)
        code, out, err = self.cli("sweep", config, "--grid", "env.LR=1,2", "--grid", "env.LR=3")
        self.assertEqual((code, err), (2, "runpilot: error: --grid env.LR is given twice; give each key once, "
                                          "with all its values\n"))
        self.assertEqual(self.cli("sweep", config, "--grid", "env.LR=1")[0], 0)
        sweep_id = json.loads(self.cli("list", "--json")[1])[0]["sweep_id"]
        code, out, err = self.cli("sweep", config, "--grid", "env.LR=2", "--sweep-id", sweep_id)
        self.assertEqual((code, err), (2, f"runpilot: error: sweep {sweep_id} exists already; leave out --sweep-id\n"))
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.cli("stop", sweep_id, "--wait", "nan")[0], 2)


class LookingAtASweep(SweepCase):
    def test_list_compare_export_by_sweep(self):
        code, out, err = self.cli("sweep", self.config(gpus=0), "--grid", "env.LR=0.1,0.3", "--repeat", "2",
                                  "--parallel", "2")
        self.assertEqual(code, 0, err)
        self.cli("run", self.config(gpus=0))  # not part of the sweep
        rows = json.loads(self.cli("list", "--json")[1])
        sweep_id = next(r["sweep_id"] for r in rows if r["sweep_id"])
        listed = json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1])
        self.assertEqual(len(listed), 4)
        self.assertTrue(all(r["sweep_id"] == sweep_id for r in listed))
        meta = self.meta(self.home / "runs" / listed[0]["id"])
        self.assertEqual(set(meta["sweep"]), {"id", "index", "point", "repeat"})
        self.assertEqual(sorted({s["repeat"] for s in self.spans() if s["repeat"]}), ["0", "1"])
        code, out, err = self.cli("compare", "--sweep", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertIn("env.LR", out)
        self.assertEqual(out.count("*"), 2 * 2)  # best loss (last and best rows) for the two LR=0.1 runs
        code, out, err = self.cli("export", "--sweep", sweep_id, "--config")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[0].split(","), ["run_id", "name", "env.LR", "step", "loss"])  # one name
        self.assertEqual(len(out.splitlines()), 5)

    def test_parallel_one_streams_the_job_as_run_does(self):
        code, out, err = self.cli("sweep", self.config(gpus=0, script="print('hello', flush=True)\n"),
                                  "--grid", "env.LR=1,2")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count("hello\n"), 2)
        self.assertEqual(err.count("starting: on this host"), 2)
