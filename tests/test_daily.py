"""The researcher's daily loop (issue 21), without an engine: stop_signal, typos in --set/--grid
keys, env values as written, metrics in list/compare/export, init's interpreter, gc of sweeps.

Ctrl-C reaching real jobs as SIGINT is proven in tests/test_daily_integration.py.
"""

import datetime as dt
import json
import os
import signal
import sys
import time
import unittest
from unittest import mock

import runpilot
from tests.common import HomeTestCase, LiveRun, RunsHome


class StopSignalConfig(HomeTestCase):
    def config(self, extra: str) -> str:
        return str(self.write("c.yaml", f"name: c\nengine: local\nentrypoint: [\"true\"]\n{extra}"))

    def test_stop_signal_is_read_in_every_spelling(self):
        for written, name in (("SIGINT", "SIGINT"), ("INT", "SIGINT"), ("sigusr1", "SIGUSR1"), ("QUIT", "SIGQUIT"),
                              ("15", "SIGTERM"), ("TERM", "SIGTERM")):
            with self.subTest(written=written):
                self.assertEqual(runpilot.load_config(self.config(f"stop_signal: {written}\n")).stop_signal, name)
        self.assertIsNone(runpilot.load_config(self.config("")).stop_signal)

    def test_a_bad_stop_signal_is_a_located_error(self):
        for bad in ("SIGFOO", "KILL", "SIGSTOP", "1.5", "true", "[INT]"):
            with self.subTest(bad=bad):
                code, out, err = self.cli("validate", self.config(f"stop_signal: {bad}\n"))
                self.assertEqual(code, 2)
                first = err.splitlines()[0]
                self.assertTrue(first.startswith(f"runpilot: error: {self.work}/c.yaml:4:1: stop_signal must name a "
                                                 "signal the job can handle, such as SIGINT"), err)
                self.assertNotIn("Traceback", err)

    def test_stop_signal_is_kept_in_the_runs_config(self):
        config = runpilot.load_config(self.config("stop_signal: USR1\n"))
        self.assertEqual(runpilot.config_to_dict(config)["stop_signal"], "SIGUSR1")

    def test_the_job_gets_sigint_for_ctrl_c_and_sigterm_otherwise(self):
        self.assertEqual(runpilot.job_stop_signal(signal.SIGINT), signal.SIGINT)
        self.assertEqual(runpilot.job_stop_signal(signal.SIGTERM), signal.SIGTERM)
        self.assertEqual(runpilot.job_stop_signal(signal.SIGHUP), signal.SIGTERM)

    def test_an_engine_job_is_signalled_with_engine_kill(self):
        launch = runpilot.Launch(["x"], {}, None, "podman", "runpilot-x", stop_signal="SIGUSR1")
        job = runpilot.Job.__new__(runpilot.Job)
        job.launch, job.stop_timeout, job.helpers = launch, 10.0, []
        job.kill_at, job.first_stop, job.last_stop, job.forced, job.sent = None, 0.0, 0.0, False, 0
        with mock.patch("subprocess.Popen") as popen:
            self.assertEqual(job.request_stop(False, signal.SIGINT), signal.SIGUSR1)
        self.assertEqual(popen.call_args[0][0], ["podman", "kill", "--signal", "SIGUSR1", "runpilot-x"])


class TyposInOverrideKeys(HomeTestCase):
    def config(self) -> str:
        return str(self.write("c.yaml", "name: c\nengine: local\nentrypoint: [\"true\"]\n"
                                         "env:\n  LR: 0.1\n  EPOCHS: 3\n  GPU0: a\n"))

    def test_a_key_close_to_one_the_config_has_is_an_error_naming_it(self):
        for flag, arg, meant in (("--set", "env.lr=1", "env.LR"), ("--set", "env.EPOCH=2", "env.EPOCHS"),
                                 ("--grid", "env.lr=0.1,0.2", "env.LR"), ("--grid", "env.Epochs=1,2", "env.EPOCHS")):
            with self.subTest(arg=arg):
                command = "run" if flag == "--set" else "sweep"
                code, out, err = self.cli(command, self.config(), flag, arg, "--dry-run")
                self.assertEqual(code, 2, err)
                key = arg.split("=")[0]
                self.assertIn(f"runpilot: error: {flag} {key}", err)
                self.assertIn(f"the config has no {key}; did you mean '{meant}'?", err)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))

    def test_a_truly_new_key_can_still_be_added(self):
        for arg in ("env.NEW=1", "env.GPU1=b", "env.B=2", "env.LR=5"):
            with self.subTest(arg=arg):
                code, out, err = self.cli("run", self.config(), "--set", arg, "--dry-run")
                self.assertEqual(code, 0, err)
        code, out, err = self.cli("sweep", self.config(), "--grid", "env.SEED=1,2", "--dry-run")
        self.assertEqual(code, 0, err)

    def test_closeness(self):
        for key, existing, meant in (("lr", ["LR"], "LR"), ("x", ["y"], None), ("abc", ["abd"], None),
                                     ("epoch", ["EPOCHS"], "EPOCHS"), ("GPU1", ["GPU0"], None),
                                     ("learnig_rate", ["learning_rate"], "learning_rate"),
                                     ("batch", ["LR"], None)):
            with self.subTest(key=key):
                self.assertEqual(runpilot.key_meant(key, existing), meant)


class EnvValuesAreText(HomeTestCase):
    TEXT = ("name: e\nengine: local\nentrypoint: [\"true\"]\nenv:\n  PYVER: 3.10\n  ID: 007\n  HEX: 0x1F\n"
            "  BIG: 1e400\n  T: true\n  TT: True\n  EMPTY:\n  NOTHING: ~\n  Q: \"3.10\"\n  FLOW: {}\n"
            "timeout: 0x10\nsweep:\n  env.LR: [3.10, 007]\n  timeout: [010]\n")

    def test_plain_env_values_reach_the_job_as_written(self):
        config = runpilot.load_config(self.write("e.yaml", self.TEXT.replace("  FLOW: {}\n", "")))
        self.assertEqual(config.env, {"PYVER": "3.10", "ID": "007", "HEX": "0x1F", "BIG": "1e400", "T": "true",
                                      "TT": "True", "EMPTY": "", "NOTHING": "", "Q": "3.10"})
        self.assertEqual(config.timeout, 16.0)  # other keys are typed as before
        self.assertEqual(config.sweep, (("env.LR", ("3.10", "007")), ("timeout", (10,))))

    def test_flow_mappings_keep_the_text_too(self):
        config = runpilot.load_config(self.write("f.yaml", "name: e\nengine: local\nentrypoint: [\"true\"]\n"
                                                           "env: {A: 3.10, B: [1], C: 2}\n"
                                      .replace(", B: [1]", "")))
        self.assertEqual(config.env, {"A": "3.10", "C": "2"})

    def test_set_and_grid_keep_the_text(self):
        config = runpilot.load_config(self.write("e.yaml", "name: e\nengine: local\nentrypoint: [\"true\"]\n"),
                                      ["env.PYVER=3.10", "env.ID=007", "timeout=0x10"])
        self.assertEqual((config.env, config.timeout), ({"PYVER": "3.10", "ID": "007"}, 16.0))
        self.assertEqual(runpilot.parse_grid(["env.LR=3.10,1e400", "epochs=010"]),
                         (("env.LR", ("3.10", "1e400")), ("epochs", (10,))))
        self.assertEqual(runpilot.parse_grid(["env.LR=[3.10, 0x1F, 'q']"]), (("env.LR", ("3.10", "0x1F", "q")),))

    def test_the_job_sees_the_text(self):
        script = "import os\nprint(os.environ['PYVER'], os.environ['ID'], os.environ['HEX'])\n"
        self.write("j.py", script)
        config = self.write("j.yaml", f"name: j\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, j.py]\n"
                                      "env:\n  PYVER: 3.10\n  ID: 007\n  HEX: 0x1F\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"3.10 007 0x1F\n")
        result = self.process("run", config, "--set", "env.PYVER=3.20")
        self.assertEqual(result.stdout, b"3.20 007 0x1F\n")


class RunningRunsShowTheirMetrics(HomeTestCase):
    def test_list_shows_a_running_runs_latest_values(self):
        script = ("import time\nfor i in range(1, 4):\n    print(f'METRIC loss={i / 4} acc={i}', flush=True)\n"
                  "print('METRIC loss=0.125', flush=True)\nprint('ready', flush=True)\ntime.sleep(60)\n")
        live = LiveRun(self, self.local_config(script, extra="metrics: [loss, acc]\n"))
        deadline = time.monotonic() + 10
        while True:
            code, out, err = self.cli("list")
            row = out.splitlines()[1].split()
            if row[-2:] == ["0.125", "3"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(code, 0, err)
        self.assertIn("running", row)
        self.assertEqual(row[-2:], ["0.125", "3"], out)
        listed = json.loads(self.cli("list", "--json")[1])[0]
        self.assertEqual(listed["last_metrics"], {"loss": 0.125, "acc": 3})
        live.proc.send_signal(signal.SIGINT)
        self.assertEqual(live.finish()[0], 130)

    def test_the_tail_gives_the_latest_value_of_each_metric(self):
        path = self.work / "metrics.json"
        path.write_text('[\n{"step": 1, "a": 1, "b": 2},\n{"step": 2, "a": 3},\n{"step": 3, "a": 4, "c": "x"}')
        self.assertEqual(runpilot.latest_metrics(path), {"a": 4, "b": 2, "c": "x"})
        self.assertEqual(runpilot.latest_metrics(self.work / "none.json"), {})


class CompareAndExportKnowMetricsFromSettings(RunsHome):
    def runs(self, metric_names=()) -> list:
        return [self.add_run("sw", samples=[{"lr": lr, "epoch": 3, "loss": loss}], metric_names=metric_names,
                             config=f"name: sw\nengine: local\nentrypoint: [python3, t.py]\nenv:\n  LR: {lr}\n")
                for lr, loss in ((0.03, 0.5), (0.01, 0.4))]

    def starred(self, out: str) -> list[str]:
        return [line.split()[0] for line in out.splitlines() if "*" in line]

    def test_stars_only_where_best_means_something(self):
        a, b = self.runs()
        code, out, err = self.cli("compare", a.id, b.id)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.starred(out), ["loss", "loss"])  # not lr (last) 0.03*, not epoch 3*
        self.assertIn(["lr", "(last)", "0.03", "0.01"], [line.split() for line in out.splitlines()])

    def test_the_configs_metrics_and_the_metric_option_choose(self):
        a, b = self.runs(metric_names=["lr"])
        self.assertEqual(self.starred(self.cli("compare", a.id, b.id)[1]), ["lr", "lr"])
        code, out, err = self.cli("compare", a.id, b.id, "--metric", "epoch")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.starred(out), ["epoch", "epoch"])  # asked for: starred (here both runs tie)
        self.assertNotIn("0.01*", out)
        code, out, err = self.cli("compare", a.id, b.id, "--metric", "loss")
        self.assertEqual(self.starred(out), ["loss", "loss"])
        self.assertCleanError(self.cli("compare", a.id, b.id, "--metric", "los"), 2,
                              "--metric 'los': none of these runs has that metric; choose one of epoch, loss, lr")

    def test_export_of_a_sweep_carries_its_swept_keys(self):
        config = self.local_config("print('METRIC loss=1')\n", name="lr", extra="env: {LR: 0.5, B: 1}\n")
        code, out, err = self.cli("sweep", config, "--grid", "env.LR=0.1,3.10")
        self.assertEqual(code, 0, err)
        sweep_id = json.loads(self.cli("list", "--json")[1])[0]["sweep_id"]
        code, out, err = self.cli("export", "--sweep", sweep_id)
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0], "run_id,name,env.LR,step,loss")
        self.assertEqual([line.split(",")[2] for line in lines[1:]], ["0.1", "3.10"])
        code, out, err = self.cli("export", "--sweep", sweep_id, "--format", "jsonl")
        self.assertEqual([json.loads(line)["env.LR"] for line in out.splitlines()], ["0.1", "3.10"])
        code, out, err = self.cli("export", "--sweep", sweep_id, "--config")
        self.assertEqual(out.splitlines()[0], "run_id,name,env.LR,step,loss")  # once, not twice


class GcAndDryRuns(RunsHome):
    SWEEP = "sw-20261201-120000-a1b2c3"

    def add_sweep_and_runs(self) -> tuple[list, list]:
        start = runpilot.parse_time("2026-12-01T12:00:00Z")
        alone = [self.add_run(f"alone{i}", started=start + dt.timedelta(hours=i)) for i in range(2)]
        points = [self.add_run(f"lr[LR={i}]", started=start + dt.timedelta(hours=2 + i),
                               sweep={"id": self.SWEEP, "index": i, "repeat": 0, "point": {"env.LR": i}})
                  for i in range(3)]
        return alone, points

    def remaining(self) -> list[str]:
        return sorted(r["id"] for r in self.db_rows())

    def test_keep_n_keeps_a_sweep_whole_and_says_so(self):
        alone, points = self.add_sweep_and_runs()
        code, out, err = self.cli("gc", "--keep", "2", "--dry-run")  # the 2 newest are points of the sweep
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines(), [f"would delete {r.id} succeeded   {r.name}" for r in alone]
                         + ["2 run(s) would be deleted"])
        self.assertEqual(err, f"runpilot: kept sweep {self.SWEEP} whole: 2 of its 3 runs are not to be deleted, "
                              "so its other 1 stay too\n")
        code, out, err = self.cli("gc", "--keep", "2", "-y")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.remaining(), sorted(r.id for r in points))
        code, out, err = self.cli("gc", "--keep", "0", "-y")  # all of it may go: the sweep goes whole
        self.assertEqual((code, self.remaining()), (0, []), err)

    def test_dry_run_lines_fit_80_columns(self):
        self.add_run("a-very-long-experiment-name-" * 4, status="interrupted")
        code, out, err = self.cli("gc", "--keep", "0", "--dry-run", env={"COLUMNS": "80"})
        self.assertEqual(code, 0, err)
        self.assertLessEqual(max(len(line) for line in out.splitlines()), 80, out)
        self.assertEqual(out.splitlines()[0], "would delete 20261120-100000-000001 interrupted "
                                              "a-very-long-experiment-name-a-v…")

    def test_a_gpu_sweeps_dry_run_prints_the_plan_on_a_box_without_gpus(self):
        config = self.write("g.yaml", "name: g\nengine: local\nentrypoint: [python3, t.py]\nresources:\n  gpus: 1\n")
        with mock.patch.dict(os.environ, {"PATH": "/usr/bin:/bin"}):  # no nvidia-smi
            self.assertEqual(self.cli("run", config)[0], 1)  # a real run still needs the GPU
            code, out, err = self.cli("sweep", config, "--grid", "env.A=1,2", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertRegex(err, r"sweep sw-\S+: 2 run\(s\), 1 at a time\n    1\. A=1\n    2\. A=2\n")
        self.assertFalse((self.home / "sweeps").exists() and any((self.home / "sweeps").iterdir()))


if __name__ == "__main__":
    unittest.main()
