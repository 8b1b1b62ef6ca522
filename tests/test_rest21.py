"""Issue 21's remaining items: the lazy sweep plan, a value given twice in a grid, a line break in a
--set value, stop signals that cannot stop a job, and `list --sort METRIC --limit N` (unit tests:
engine local only)."""

import itertools
import json
import subprocess
import sys
import time

import runpilot
from tests.common import RUNPILOT, RunsHome


class LazySweepPlan(RunsHome):
    def config(self) -> str:
        return str(self.local_config("print('METRIC loss=1')\n", A=0, B=0))

    def test_the_plan_is_the_product_of_the_axes_in_order(self):
        axes = (("env.A", ("0", "1", "2")), ("seed", (1, 2)), ("env.B", ("x",)))
        plan = runpilot.sweep_points(axes, repeat=2)
        eager = [(combo, r) for combo in itertools.product(*(v for _, v in axes)) for r in range(2)]
        self.assertEqual(len(plan), 12)
        self.assertEqual([(tuple(v for _, v in p.values), p.repeat) for p in plan], eager)
        self.assertEqual([p.index for p in plan], list(range(12)))
        self.assertEqual(plan[-1], plan[11])
        self.assertEqual(plan[10:], [plan[10], plan[11]])
        with self.assertRaises(IndexError):
            plan[12]

    def test_a_dry_run_of_a_million_points_takes_bounded_time_and_memory(self):
        values = ",".join(str(i) for i in range(1000))
        script = ("import resource, subprocess, sys, time\nstart = time.monotonic()\n"
                  "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                  "print(done.returncode, time.monotonic() - start,\n"
                  "      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, repr(done.stderr))\n")
        done = subprocess.run([sys.executable, "-c", script, sys.executable, str(RUNPILOT), "sweep", self.config(),
                               "--grid", f"env.A={values}", "--grid", f"env.B={values}", "--max-points", "1000000",
                               "--dry-run"], capture_output=True, text=True, timeout=120)
        code, seconds, max_kib, err = done.stdout.split(" ", 3)
        err = eval(err)  # the repr printed above
        self.assertEqual(code, "0", err)
        lines = err.splitlines()
        self.assertRegex(lines[0], r"^sweep sw-\S+: 1000000 run\(s\), 1 at a time$")
        self.assertEqual(lines[1:3], ["    1. A=0,B=0", "    2. A=0,B=1"])
        self.assertEqual(lines[-2:], ["   50. A=0,B=49", "  (and 999950 more)"])
        self.assertLess(float(seconds), 20)      # 82 s when every point was built and checked
        self.assertLess(int(max_kib), 200 << 10)  # 1.8 GB then
        self.assertEqual(self.runs(), [])

    def test_a_dry_run_checks_the_points_it_prints_and_a_sweep_every_point(self):
        config = self.config()
        code, out, err = self.cli("sweep", config, "--grid", "timeout=1,nope", "--dry-run")
        self.assertEqual(code, 2)
        self.assertIn("--grid timeout (point 2: timeout=nope)", err)
        many = ",".join([str(i + 1) for i in range(60)] + ["nope"])
        code, out, err = self.cli("sweep", config, "--grid", f"timeout={many}", "--dry-run")
        self.assertEqual(code, 0, err)  # point 61 is neither printed nor run
        self.assertIn("(and 11 more)", err)
        code, out, err = self.cli("sweep", config, "--grid", f"timeout={many}")
        self.assertEqual(code, 2, err)
        self.assertIn("--grid timeout (point 61: timeout=nope)", err)
        self.assertEqual(self.runs(), [])  # refused before any point was recorded


class SweepValueTwice(RunsHome):
    def test_a_grid_value_given_twice_is_refused_naming_it(self):
        config = self.local_config("print('METRIC loss=1')\n", X=0)
        for grid, shown in (("env.X=1,1", "'1'"), ("env.X=[a, b, a]", "'a'"), ("timeout=5,5.0", "5.0")):
            with self.subTest(grid=grid):
                self.assertCleanError(self.cli("sweep", config, "--grid", grid), 2,
                                      f"--grid {grid.split('=')[0]} gives the value {shown} twice")
        self.assertEqual(self.runs(), [])
        code, out, err = self.cli("sweep", config, "--grid", "env.X=1,01,true,True", "--dry-run")
        self.assertEqual(code, 0, err)  # env values are text: four different values

    def test_a_sweep_section_value_given_twice_is_a_located_error(self):
        config = self.local_config("print('METRIC loss=1')\n", extra="sweep:\n  seed: [1, 2, 1]\n")
        code, out, err = self.cli("validate", config)
        self.assertEqual(code, 2)
        self.assertIn(f"{config}:5:", err)
        self.assertIn("sweep.seed gives the value 1 twice", err)
        self.assertNotIn("Traceback", err)


class LineBreakInSet(RunsHome):
    def test_a_line_break_in_a_set_or_grid_value_is_refused_in_one_line(self):
        config = self.local_config("print('METRIC loss=1')\n", X=0)
        self.assertCleanError(self.cli("run", config, "--set", "env.X=a\nb"), 2,
                              "--set env.X: the value 'a\\nb' has a line break")
        self.assertCleanError(self.cli("sweep", config, "--grid", "env.X=a\r\nb,c"), 2,
                              "--grid env.X: the value 'a\\r\\nb' has a line break")
        self.assertEqual(self.runs(), [])

    def test_the_config_carries_one_to_the_job(self):
        self.write("j.py", "import os\nprint(repr(os.environ['X']))\n")
        config = self.write("j.yaml", f"name: j\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, j.py]\n"
                                      "env:\n  X: \"a\\nb\"\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"'a\\nb'\n")


class StopSignalsThatStop(RunsHome):
    def test_signals_that_cannot_stop_a_job_are_refused_with_the_list(self):
        for bad in ("SIGCHLD", "CONT", "sigwinch", "URG", "SIGSTOP", "TSTP", "SIGSEGV", "9", "17"):
            with self.subTest(bad=bad):
                config = self.local_config("pass\n", extra=f"stop_signal: {bad}\n")
                code, out, err = self.cli("validate", config)
                self.assertEqual(code, 2, err)
                self.assertTrue(err.startswith(f"runpilot: error: {config}:4:1: stop_signal must name"), err)
                self.assertIn("SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGABRT", err)

    def test_the_sensible_ones_are_taken(self):
        for name in runpilot.STOP_SIGNALS:
            with self.subTest(name=name):
                config = self.local_config("pass\n", extra=f"stop_signal: {name[3:].lower()}\n")
                self.assertEqual(runpilot.load_config(config).stop_signal, name)


class ListSortsLiveValuesBeforeTheLimit(RunsHome):
    def test_a_running_runs_live_value_competes_for_the_limit(self):
        for loss, minutes in ((0.5, 3), (0.4, 2), (0.3, 1)):
            self.add_run("done", samples=[{"loss": loss}], metric_names=["loss"],
                         ago=runpilot._dt.timedelta(minutes=minutes))
        live = self.add_run("live", status=runpilot.RUNNING, ago=runpilot._dt.timedelta(minutes=10))
        runpilot.MetricLog(self.store.folder(live.id).metrics).close()  # the index has no value for it...
        log = runpilot.MetricLog(self.store.folder(live.id).metrics)
        log.add_lines([b"METRIC loss=0.1"])  # ...its metrics.json has
        log.close()
        self.assertIsNone(self.store.get(live.id).last_metrics.get("loss"))
        code, out, err = self.cli("list", "--sort", "loss", "--asc", "--limit", "2", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual([(r["name"], r["last_metrics"]["loss"]) for r in json.loads(out)],
                         [("live", 0.1), ("done", 0.3)])
        code, out, err = self.cli("list", "--sort", "loss", "--limit", "2", "--json")
        self.assertEqual([(r["name"], r["last_metrics"]["loss"]) for r in json.loads(out)],
                         [("done", 0.5), ("done", 0.4)])


class NoticeScanOfALoudLog(RunsHome):
    def test_a_log_without_any_styles_mark_is_not_read_line_by_line(self):
        # the 0-sample notice fed the last MiB of `yes` (524,288 lines) to three recognisers: 1.2 s per run
        started = time.process_time()
        self.assertIsNone(runpilot.recogniser_for_log(b"y\n" * (1 << 19)))
        self.assertLess(time.process_time() - started, 0.2)

    def test_each_style_is_still_named_also_behind_colour_codes(self):
        keras = b"Epoch 1/2\n\x1b[1m3/3\x1b[0m \x1b[32m\xe2\x94\x81\x1b[0m 10ms/step -\x1b[0m accuracy: 0.5 - loss: 1.25\n"
        for log, name in ((b"{'loss': 0.5, 'learning_rate': 1e-05, 'epoch': 1.0}\n", "huggingface"),
                          (keras, "keras"), (keras.replace(b"\x1b[0m", b""), "keras"),
                          (b"100%|##########| 10/10 [00:01<00:00, 9.1it/s, loss=0.25]\n", "tqdm")):
            with self.subTest(name=name):
                self.assertEqual(runpilot.recogniser_for_log(b"y\n" * 1000 + log + b"y\n" * 1000), name)


if __name__ == "__main__":
    import unittest
    unittest.main()
