"""Defects found attacking issue 21's daily loop and sweep views (unit tests: engine local only).

Each test failed on the merged branch before its fix.
"""

import json
import re
import signal
import subprocess
import sys
import time

import runpilot
from tests.common import RUNPILOT, STUBBORN, RunsHome

# A job that prints its LR as a metric.
JOB = """\
import os
print(f"METRIC loss={os.environ.get('LR', '0')}")
"""


class Attack21Case(RunsHome):
    def sweep(self, *grid: str, name: str = "job", env: dict | None = None) -> str:
        """Run a sweep on engine local to its end; return its id."""
        config = self.local_config(JOB, name="job", extra="metrics: [loss]\n", **(env or {"LR": 1}))
        code, out, err = self.cli("sweep", config, "--name", name, *[a for key in grid for a in ("--grid", key)])
        self.assertEqual(code, 0, err)
        return re.findall(r"runpilot: sweep (sw-\S+): runpilot list", err)[-1]

    def view(self, *args: str, width: int = 80) -> list[str]:
        code, out, err = self.tty_cli(*args, env={"COLUMNS": str(width)})
        self.assertEqual(code, 0, err)
        return out.splitlines()

    def assertFits(self, lines: list[str], width: int = 80) -> None:
        for line in lines:
            self.assertLessEqual(runpilot.text_width(line), width, line)


class ManySweptKeysFit80Columns(Attack21Case):
    """`list --sweep` of a grid over five keys with long names and values was 145 columns wide."""

    def test_list_sweep_with_many_long_keys_fits_and_keeps_the_first_key(self):
        env = {"LR": 1, "BATCH_SIZE_PER_DEVICE": 8, "WEIGHT_DECAY_VALUE": 0, "OPTIMIZER_NAME": "adam",
               "SCHEDULER": "cos"}
        self.sweep("env.LR=0.1,0.2", "env.BATCH_SIZE_PER_DEVICE=16,32", "env.WEIGHT_DECAY_VALUE=0.0001",
                   "env.OPTIMIZER_NAME=adamw-with-long-name", "env.SCHEDULER=cosine-annealing-warm",
                   name="a-very-long-experiment-name-for-testing-columns", env=env)
        lines = self.view("list", "--sweep", "latest", "--no-color")
        self.assertFits(lines)
        self.assertEqual(re.split(r"\s{2,}", lines[0])[6], "LR")
        self.assertEqual(sorted(re.split(r"\s{2,}", line.strip())[6] for line in lines[1:]),
                         ["0.1", "0.1", "0.2", "0.2"])

    def test_a_long_swept_value_is_cut_to_fit(self):
        self.sweep("env.LR=0.1," + "9" * 120)
        lines = self.view("list", "--sweep", "latest", "--no-color")
        self.assertFits(lines)
        self.assertIn("…", lines[-1])


class TrulyNewKeysAreNotTypos(Attack21Case):
    """A new key that differs from an old one only by a number was refused as a typo of it."""

    def test_a_key_with_a_number_added_is_new(self):
        config = self.write("t.yaml", """\
            name: t
            engine: local
            entrypoint: [python3, job.py]
            env: {SEED: 1, LR: 2}
            mounts: {data: /tmp}
            """)
        for item in ("env.SEED2=5", "env.LR0=1", "mounts.data2=/tmp"):
            with self.subTest(item=item):
                code, out, err = self.cli("validate", config, "--set", item)
                self.assertEqual(code, 0, err)
        for item, meant in (("env.SEEDS=5", "env.SEED"), ("env.lr=1", "env.LR")):  # typos stay errors
            with self.subTest(item=item):
                code, out, err = self.cli("validate", config, "--set", item)
                self.assertEqual(code, 2, err)
                self.assertIn(f"did you mean '{meant}'", err)


class DamagedSweepFile(Attack21Case):
    def test_export_of_a_sweep_whose_axes_are_not_a_list(self):
        sweep_id = self.sweep("env.LR=0.1,0.2")
        path = self.home / "sweeps" / sweep_id / "sweep.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "axes": 5}))
        code, out, err = self.cli("export", "--sweep", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(out.splitlines()[0].split(",")[:2], ["run_id", "name"])


class StopSignalSpellings(Attack21Case):
    def validate(self, value: str) -> tuple[int, str]:
        config = self.write("t.yaml", f"name: t\nengine: local\nentrypoint: [python3, job.py]\nstop_signal: {value}\n")
        code, out, err = self.cli("validate", config)
        return code, err

    def test_only_ascii_names_and_numbers_name_a_signal(self):
        for value in ("ſigint", "ınt", "SIGİNT"):  # str.upper() turns these into SIGINT
            with self.subTest(value=value):
                code, err = self.validate(value)
                self.assertEqual(code, 2, err)
                self.assertIn("stop_signal must name a signal", err)

    def test_a_quoted_number_is_the_same_signal_as_the_number(self):
        config = self.write("t.yaml", "name: t\nengine: local\nentrypoint: [python3, job.py]\nstop_signal: '10'\n")
        self.assertEqual(runpilot.load_config(config).stop_signal, "SIGUSR1")
        code, err = self.validate("'9'")
        self.assertEqual(code, 2, err)


class OddNamesInErrors(Attack21Case):
    def test_compare_metric_with_a_control_character_is_shown_once_escaped(self):
        self.sweep("env.LR=0.1,0.2")
        code, out, err = self.cli("compare", "--sweep", "latest", "--metric", "lo\x1bss")
        self.assertEqual(code, 2)
        self.assertIn("--metric 'lo\\x1bss': none of these runs has that metric", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)


class SweepNamesWithBrackets(Attack21Case):
    """A swept value holding `[` (a control sequence, `a[0]`) made `list --sweep` cut the name there:
    `job[LR=\\x1b` instead of `job`."""

    def test_list_sweep_names_the_config_whatever_the_values_hold(self):
        self.sweep('env.LR=0.1,"\\e[2J0.3","a[0]"', name="exp[v2]")
        lines = self.view("list", "--sweep", "latest", "--no-color", width=120)
        self.assertEqual([re.split(r"\s{2,}", line)[1] for line in lines[1:]], ["exp[v2]"] * 3)
        self.assertEqual(runpilot.base_name("exp[v2][LR=a[0],BS=1,repeat=2]"), "exp[v2]")

    def test_a_name_cut_in_its_middle_keeps_the_whole_point(self):
        cut = runpilot.clip_middle("experiment-long-name[LR=a[0]]", 22)
        self.assertTrue(cut.endswith("[LR=a[0]]"), cut)


class ProxyVariablesInBothCases(Attack21Case):
    """`--set env.http_proxy=...` on a config with HTTP_PROXY was refused as a typo of it; tools read
    both (curl the lower-case one), so people set both."""

    def test_lower_case_proxy_beside_upper_case_is_new(self):
        config = self.write("t.yaml", "name: t\nengine: local\nentrypoint: [python3, job.py]\n"
                                      "env: {HTTP_PROXY: 'http://proxy:3128', LR: 1}\n")
        for item in ("env.http_proxy=http://proxy:3128", "env.HTTPS_PROXY=http://proxy:3128"):
            with self.subTest(item=item):
                code, out, err = self.cli("validate", config, "--set", item)
                self.assertEqual(code, 0, err)
        code, out, err = self.cli("validate", config, "--set", "env.lr=0.1")
        self.assertEqual(code, 2, err)


class CtrlCWhileATimeoutStopsTheJob(Attack21Case):
    """A run that hit its timeout and got Ctrl-C in the grace period was recorded `interrupted by
    Ctrl-C` (its timeout forgotten), and the Ctrl-C was taken as a first one: the job kept its whole
    grace period, and the message promised it a fresh one."""

    def test_ctrl_c_kills_now_and_the_run_stays_timeout(self):
        config = self.local_config(STUBBORN, name="stubborn", extra="timeout: 1\n")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--stop-timeout", "20"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        for line in proc.stderr:
            if "hit its timeout" in line:
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=60)
        self.assertLess(time.monotonic() - started, 10, err)
        self.assertEqual(proc.returncode, 124, err)
        self.assertIn("killing run", err)
        self.assertNotIn("has 20s to exit; press Ctrl-C again", err)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "timeout")
        self.assertIn("killed by Ctrl-C", meta["reason"])


class SortByAMetricWithRunningRuns(Attack21Case):
    """`list` shows a running run's latest values, but `--sort loss` placed it last, as having none
    (the index learns its values when it ends): the printed column was out of order."""

    def test_a_running_run_sorts_by_the_values_list_shows(self):
        self.add_run("done-a", samples=[{"loss": 0.5}])
        self.add_run("live", status="running", samples=[{"loss": 0.05}], last_metrics={})
        self.add_run("done-b", samples=[{"loss": 0.2}])
        for flags, order in ((["--asc"], ["live", "done-b", "done-a"]), ([], ["done-a", "done-b", "live"])):
            with self.subTest(flags=flags):
                lines = self.view("list", "--sort", "loss", "--no-color", *flags, width=120)
                self.assertEqual([re.split(r"\s{2,}", line)[1] for line in lines[1:]], order)
                self.assertIn("0.05", lines[1 if flags else 3])


class SweepsReadsOnlyWhatItShows(Attack21Case):
    """`runpilot sweeps` (the 20 newest) read and summarized every sweep of the home first, and spoke
    of damaged old ones it was not going to show."""

    def test_an_old_damaged_sweep_beyond_the_limit_is_not_read(self):
        newest = self.sweep("env.LR=0.1")
        old = self.home / "sweeps" / "sw-20250101-000000-abcdef"
        old.mkdir()
        (old / "sweep.json").write_text("{damaged")
        code, out, err = self.tty_cli("sweeps", "--limit", "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        self.assertIn(runpilot.fmt_sweep_ref(newest), out)
        code, out, err = self.tty_cli("sweeps", "--all")
        self.assertIn("sw-20250101-000000-abcdef is left out", err)


class AnotherWordIsAnotherKey(Attack21Case):
    """`--set env.MIN_STEPS=...` beside MAX_STEPS, or NUM_CPUS beside NUM_GPUS, was refused as a typo
    (two substitutions from 8 characters on): a short word for another is a key of its own."""

    def test_min_beside_max_and_cpus_beside_gpus_are_new(self):
        config = self.write("t.yaml", "name: t\nengine: local\nentrypoint: [python3, job.py]\n"
                                      "env: {MAX_STEPS: 100, NUM_GPUS: 1, BATCH_SIZE: 8}\n")
        for item in ("env.MIN_STEPS=10", "env.NUM_CPUS=4"):
            with self.subTest(item=item):
                code, out, err = self.cli("validate", config, "--set", item)
                self.assertEqual(code, 0, err)
        for item, meant in (("env.NUM_GPSU=2", "NUM_GPUS"), ("env.BACTH_SIZE=2", "BATCH_SIZE"),
                            ("env.MAX_STEP=2", "MAX_STEPS")):
            with self.subTest(item=item):
                code, out, err = self.cli("validate", config, "--set", item)
                self.assertEqual(code, 2, err)
                self.assertIn(f"did you mean 'env.{meant}'", err)


class StarsOnCountersNamedLikeMetrics(Attack21Case):
    """compare starred `grad_accum` (it holds `acc`) and `timestep` (it holds `time`): counters, whose
    best means nothing."""

    def test_counters_are_not_starred_and_real_metrics_are(self):
        runs = [self.add_run("sw", samples=[{"grad_accum": accum, "timestep": step, "val_acc": acc,
                                             "epoch_time": secs}])
                for accum, step, acc, secs in ((4, 100, 0.9, 12.0), (8, 200, 0.8, 11.0))]
        code, out, err = self.cli("compare", *[r.id for r in runs])
        self.assertEqual(code, 0, err)
        starred = sorted({line.split()[0] for line in out.splitlines() if "*" in line})
        self.assertEqual(starred, ["epoch_time", "val_acc"])


class SweepsBestCountsRunningPoints(Attack21Case):
    """`runpilot sweeps` left a running point's values out of BEST, which `list` shows for it."""

    def test_a_running_points_latest_value_can_be_the_best(self):
        sweep_id = self.sweep("env.LR=0.5")
        live = self.add_run("job[LR=0.01]", status="running", samples=[{"loss": 0.01}], last_metrics={},
                            sweep={"id": sweep_id, "index": 1, "repeat": 0})
        path = self.home / "sweeps" / sweep_id / "sweep.json"
        plan = json.loads(path.read_text())
        plan["points"].append({"index": 1, "values": [["env.LR", "0.01"]], "repeat": 0, "run_id": live.id})
        path.write_text(json.dumps(plan))
        code, out, err = self.tty_cli("sweeps", "--json")
        self.assertEqual(code, 0, err)
        best = json.loads(out)[0]["best"]
        self.assertEqual((best["metric"], best["value"], best["run_id"]), ("loss", 0.01, live.id))
