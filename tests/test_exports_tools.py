"""RunPilot's exports read by the tools themselves: TensorBoard's EventMultiplexer reads the event files
of `export --format tensorboard` (also while `--follow` grows them, and the runner's own file of config
`tensorboard: true`), and a real `mlflow server` (sqlite backend, started here on a free port) receives
`export --format mlflow`, read back with the mlflow client.

The tools are pip packages (`pip install tensorboard mlflow`, as .ci/run does); without them these
tests skip, saying so; RUNPILOT_TEST_EXPORT_TOOLS=1 (set by .ci/run) makes a missing tool a failure.
"""

import importlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

import runpilot
from tests.common import RUNPILOT, LiveRun, RunsHome

REQUIRED_VAR = "RUNPILOT_TEST_EXPORT_TOOLS"
MLFLOW_START_S = 300   # mlflow 3 takes a minute to answer on a busy two-core machine


def require(test: unittest.TestCase | None, module: str):
    """The module, or a skip (a failure when RUNPILOT_TEST_EXPORT_TOOLS=1) saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed here: pip install {module.split('.')[0]}"
        if os.environ.get(REQUIRED_VAR) == "1":
            raise AssertionError(f"{reason} (required by {REQUIRED_VAR}=1)") from None
        raise unittest.SkipTest(reason) from None


def float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def multiplexer(folder: Path):
    """TensorBoard's reader over FOLDER, keeping every point (its default samples 10,000 per tag)."""
    em = require(None, "tensorboard.backend.event_processing.event_multiplexer")
    mux = em.EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(folder))
    return mux.Reload()


def points(mux, run: str, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in mux.Scalars(run, tag)]


class TensorBoardReadsExports(RunsHome):
    def setUp(self):
        super().setUp()
        require(self, "tensorboard")

    def test_runs_tags_steps_and_values(self):
        losses = [2.5, 1.25, 0.1, 0.0333333333, 1e-7]
        a = self.add_run("train", samples=[{"step": 10 * i, "loss": v, "phase": "warm"} for i, v in enumerate(losses)],
                         config="name: train\nengine: local\nentrypoint: [python3, t.py]\nenv: {LR: '0.1'}\n")
        b = self.add_run("train", samples=[{"step": 1, "loss": 3.0, "val/acc": 0.5}, {"step": 2, "val/acc": 0.75}],
                         config="name: train\nengine: local\nentrypoint: [python3, t.py]\nenv: {LR: '0.2'}\n")
        out = self.tmp / "tb"
        code, _, err = self.cli("export", a.id, b.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        mux = multiplexer(out)
        run_a, run_b = f"train-{runpilot.short_id(a.id)}", f"train-{runpilot.short_id(b.id)}"
        self.assertEqual(sorted(mux.Runs()), sorted([run_a, run_b]))
        self.assertEqual(mux.Runs()[run_a]["scalars"], ["loss"])
        self.assertEqual(sorted(mux.Runs()[run_b]["scalars"]), ["loss", "val/acc"])
        self.assertEqual(points(mux, run_a, "loss"), [(10 * i, float32(v)) for i, v in enumerate(losses)])
        self.assertEqual(points(mux, run_b, "val/acc"), [(1, 0.5), (2, 0.75)])
        # the config values that differ, as the hparams plugin's session data
        content = mux.PluginRunToTagToContent("hparams")
        self.assertEqual(sorted(content[run_a]), ["_hparams_/session_end_info", "_hparams_/session_start_info"])
        plugin_data = require(self, "tensorboard.plugins.hparams.plugin_data_pb2")
        start = plugin_data.HParamsPluginData.FromString(content[run_a]["_hparams_/session_start_info"])
        self.assertEqual(dict(start.session_start_info.hparams)["env.LR"].string_value, "0.1")
        end = plugin_data.HParamsPluginData.FromString(content[run_b]["_hparams_/session_end_info"])
        self.assertEqual(end.session_end_info.status, 1)  # STATUS_SUCCESS

    def test_follow_shows_new_samples_while_the_run_runs(self):
        go = self.work / "go"
        script = (f"import os, time\nfor i in range(5):\n    print(f'METRIC step={{i}} loss={{i / 10}}', flush=True)\n"
                  f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
                  "for i in range(5, 12):\n    print(f'METRIC step={i} loss={i / 10}', flush=True)\n")
        live = LiveRun(self, self.local_config(script, "slow"))
        out = self.tmp / "tb"
        follow = subprocess.Popen([sys.executable, str(RUNPILOT), "export", "latest", "--format", "tensorboard",
                                   "-o", str(out), "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        seen = self.wait_for_points(out, 5)
        self.assertEqual(seen, [(i, float32(i / 10)) for i in range(5)])
        self.assertIsNone(follow.poll(), "export --follow ended while the run runs")
        go.write_text("")
        self.assertEqual(live.finish()[0], 0)
        seen = self.wait_for_points(out, 12)
        self.assertEqual(seen, [(i, float32(i / 10)) for i in range(12)])
        _, err = follow.communicate(timeout=30)
        self.assertEqual(follow.returncode, 0, err)
        self.assertIn(b"wrote 12 sample(s) of 1 run(s)", err)

    def wait_for_points(self, out: Path, count: int) -> list:
        deadline, seen = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            if out.exists():
                mux = multiplexer(out)
                runs = list(mux.Runs())
                seen = points(mux, runs[0], "loss") if runs and "loss" in mux.Runs()[runs[0]]["scalars"] else []
                if len(seen) >= count:
                    return seen
            time.sleep(0.2)
        self.fail(f"TensorBoard saw {len(seen)} of {count} samples")

    def test_the_runners_own_event_file(self):
        script = ("for i in range(3000):\n    print(f'METRIC step={i} loss={1 / (i + 1)} acc={i % 7} tag=x')\n"
                  "print('METRIC step=3000 loss=nan')\n")
        code, _, err = self.cli("run", self.local_config(script, "tb", "tensorboard: true\n"))
        self.assertEqual(code, 0, err)
        mux = multiplexer(self.home / "runs")
        run = self.only_run().name
        self.assertEqual(list(mux.Runs()), [run])
        loss = points(mux, run, "loss")
        self.assertEqual(loss[:3000], [(i, float32(1 / (i + 1))) for i in range(3000)])
        self.assertEqual(loss[3000][0], 3000)
        self.assertNotEqual(loss[3000][1], loss[3000][1])  # NaN
        self.assertEqual(points(mux, run, "acc"), [(i, float(i % 7)) for i in range(3000)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowReceivesExports(RunsHome):
    @classmethod
    def setUpClass(cls):
        require(None, "mlflow")
        cls.server_dir = tempfile.TemporaryDirectory()
        cls.uri = f"http://127.0.0.1:{free_port()}"
        log = open(Path(cls.server_dir.name) / "server.log", "wb")
        cls.server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{cls.server_dir.name}/mlflow.db", "--default-artifact-root", f"{cls.server_dir.name}/art",
             "--host", "127.0.0.1", "--port", cls.uri.rsplit(":", 1)[1], "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + MLFLOW_START_S
        while time.monotonic() < deadline and cls.server.poll() is None:
            try:
                with urllib.request.urlopen(cls.uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(1)
        cls.tearDownClass()
        raise AssertionError(f"mlflow server did not answer within {MLFLOW_START_S}s")

    @classmethod
    def tearDownClass(cls):
        if cls.server.poll() is None:
            os.killpg(cls.server.pid, 15)
            cls.server.wait(timeout=30)
        cls.server_dir.cleanup()

    def client(self):
        return require(self, "mlflow.tracking").MlflowClient(self.uri)

    def test_two_runs_and_an_export_again(self):
        a = self.add_run("resnet", samples=[{"step": i, "loss": 1 / (i + 1), "acc": i / 10} for i in range(1500)],
                         tags={"team": "vision"}, image="pytorch:2.3", engine="docker",
                         config="name: resnet\nimage: pytorch:2.3\nentrypoint: [python3, t.py]\nenv: {LR: '0.1'}\n")
        b = self.add_run("resnet", status="failed", samples=[{"step": 5, "loss": 9.5}],
                         config="name: resnet\nimage: pytorch:2.3\nentrypoint: [python3, t.py]\nenv: {LR: '0.2'}\n")
        args = ("export", a.id, b.id, "--format", "mlflow", "-o", self.uri, "--experiment", "runpilot-test")
        code, _, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        self.assertIn("exported 2 run(s) (3001 new metric value(s))", err)
        client = self.client()
        experiment = client.get_experiment_by_name("runpilot-test")
        runs = {r.data.tags["runpilot.run_id"]: r for r in client.search_runs([experiment.experiment_id])}
        self.assertEqual(sorted(runs), sorted([a.id, b.id]))
        ra, rb = runs[a.id], runs[b.id]
        self.assertEqual((ra.info.status, rb.info.status), ("FINISHED", "FAILED"))
        self.assertEqual(ra.info.run_name, "resnet")
        self.assertEqual(ra.data.params, {"name": "resnet", "image": "pytorch:2.3", "entrypoint": "python3,t.py",
                                          "env.LR": "0.1"})
        self.assertEqual({k: v for k, v in ra.data.tags.items() if not k.startswith("mlflow.")},
                         {"team": "vision", "runpilot.run_id": a.id, "runpilot.image": "pytorch:2.3",
                          "runpilot.engine": "docker", "runpilot.backend": "host", "runpilot.status": "succeeded"})
        start = int(runpilot.parse_time(a.started_at).timestamp() * 1000)
        self.assertEqual((ra.info.start_time, ra.info.end_time), (start, start + 10000))
        history = sorted((m.step, m.value) for m in client.get_metric_history(ra.info.run_id, "loss"))
        self.assertEqual(history, [(i, 1 / (i + 1)) for i in range(1500)])
        self.assertEqual([(m.step, m.value) for m in client.get_metric_history(rb.info.run_id, "loss")], [(5, 9.5)])
        # again: the same runs, nothing duplicated
        code, _, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        self.assertIn("exported 2 run(s) (0 new metric value(s))", err)
        self.assertEqual(len(client.search_runs([experiment.experiment_id])), 2)
        self.assertEqual(len(client.get_metric_history(ra.info.run_id, "loss")), 1500)

    def test_default_experiment_is_the_runs_name(self):
        run = self.add_run("mnist-small", samples=[{"step": 1, "loss": 0.5}])
        self.assertEqual(self.cli("export", run.id, "--format", "mlflow", "-o", self.uri)[0], 0)
        experiment = self.client().get_experiment_by_name("mnist-small")
        self.assertIsNotNone(experiment)

    def test_a_server_that_is_down_is_one_line(self):
        run = self.add_run()
        self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", f"http://127.0.0.1:{free_port()}"),
                              1, "cannot reach the MLflow server", "runs exported: none")
