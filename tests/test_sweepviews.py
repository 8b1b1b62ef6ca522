"""Sweeps easy to tell apart and to name (issue 21): the swept keys as columns of `list --sweep`,
names cut in the middle, views that use the whole width, `runpilot sweeps`, and sweep ids taken
by short id, prefix, `latest` and `-N` wherever a SWEEP_ID is.

The sweeps here are real ones on engine local (no container engine needed).
"""

import json
import re
import signal

import runpilot
from tests.common import RunsHome, Tty

# A job whose metric is its LR; LR=0 fails (exit 3).
JOB = """\
import os, sys
lr = float(os.environ["LR"])
print(f"METRIC train_loss={lr} val_accuracy={1 - lr}")
sys.exit(3 if lr == 0 else 0)
"""
LONG_NAME = "synth-cnn-resnet-baseline-experiment"


class SweepViewsCase(RunsHome):
    def sweep(self, *grid: str, name: str = LONG_NAME, parallel: str = "1") -> str:
        """Run a sweep to its end; return its id (from the line that names it at the end)."""
        config = self.local_config(JOB, name="job", extra="metrics: [train_loss, val_accuracy]\n", LR=1)
        code, out, err = self.cli("sweep", config, "--name", name, "--parallel", parallel,
                                  *[a for key in grid for a in ("--grid", key)])
        self.assertIn(code, (0, 1), err)
        return re.findall(r"runpilot: sweep (sw-\S+): runpilot list", err)[-1]

    def view(self, *args: str, width: int = 80) -> list[str]:
        code, out, err = self.tty_cli(*args, *(["--no-color"] if args[0] == "list" else []),
                                      env={"COLUMNS": str(width)})
        self.assertEqual(code, 0, err)
        return out.splitlines()

    def cells(self, line: str) -> list[str]:
        """A table line's cells (columns are two spaces apart; `0s ago` is one cell)."""
        return re.split(r"\s{2,}", line.strip())

    def assertFits(self, lines: list[str], width: int = 80) -> None:
        for line in lines:
            self.assertLessEqual(runpilot.text_width(line), width, line)


class SweptKeysAsColumns(SweepViewsCase):
    def test_list_sweep_shows_each_swept_key_and_the_repeat_as_a_column(self):
        config = self.local_config(JOB, name="job", extra="metrics: [train_loss]\n", LR=1, BS=8)
        code, _, err = self.cli("sweep", config, "--name", LONG_NAME, "--grid", "env.LR=0.1,0.05",
                                "--grid", "env.BS=16,32", "--repeat", "2")
        self.assertEqual(code, 0, err)
        lines = self.view("list", "--sweep", "latest")
        self.assertFits(lines)
        header = self.cells(lines[0])
        self.assertEqual(header[:9], ["ID", "NAME", "STATUS", "STARTED", "DURATION", "EXIT", "LR", "BS", "REPEAT"])
        # plan order: the first key varies slowest, the repeat fastest; the values are the columns' cells
        cells = [self.cells(line)[6:9] for line in lines[1:]]
        self.assertEqual(cells, [[lr, bs, r] for lr in ("0.1", "0.05") for bs in ("16", "32") for r in "01"])
        for line in lines[1:]:  # the name is the config's, cut in its middle: the point is in the columns
            self.assertRegex(self.cells(line)[1], r"^synth.*….*-experiment$")

    def test_the_swept_keys_stay_when_the_width_is_short(self):
        self.sweep("env.LR=0.1,0.05,0.01")
        lines = self.view("list", "--sweep", "-1", width=60)
        self.assertFits(lines, 60)
        self.assertEqual(self.cells(lines[0])[6], "LR")
        self.assertEqual([self.cells(line)[6] for line in lines[1:]], ["0.1", "0.05", "0.01"])

    def test_two_keys_with_the_same_last_part_are_named_whole(self):
        self.assertEqual([runpilot._key_header(k, ["env.LR", "opt.LR", "env.BS"]) for k in ("env.LR", "env.BS")],
                         ["ENV.LR", "BS"])


class UsingTheWidth(SweepViewsCase):
    def test_the_full_list_at_80_columns_uses_the_whole_width_and_keeps_the_names_ends(self):
        sweep_id = self.sweep("env.LR=0.1,0.05,0.01")
        lines = self.view("list")
        # the names were cut to `synth-c…` with 5 columns unused: now the name takes what the columns leave
        self.assertEqual(max(len(line) for line in lines), 80)
        self.assertEqual(self.cells(lines[0])[6], "SWEEP")
        names = [line.split()[1] for line in lines[1:]]
        self.assertEqual([n.rsplit("…", 1)[1] for n in names], ["[LR=0.01]", "[LR=0.05]", "[LR=0.1]"])
        self.assertTrue(all(n.startswith("syn") for n in names), names)
        self.assertEqual({self.cells(line)[6] for line in lines[1:]}, {"sw-" + sweep_id[-6:]})

    def test_the_plot_legend_keeps_the_points_of_long_names(self):
        self.sweep("env.LR=0.1,0.05", name="x" * 70)
        code, out, err = self.cli("plot", "--sweep", "latest", "--ascii", "--width", "80", "--metric", "train_loss")
        self.assertEqual(code, 0, err)
        legend = out.splitlines()[-2:]
        self.assertRegex(legend[0], r"^\* x+~\[LR=0\.1\] [0-9a-f]{6}  last 0\.1  best 0\.1$")
        self.assertRegex(legend[1], r"^o x+~\[LR=0\.05\] [0-9a-f]{6}  last 0\.05  best 0\.05$")
        self.assertFits(legend)

    def test_no_sweep_column_without_sweeps(self):
        self.add_run("plain", metric_names=["loss"], samples=[{"loss": 1}])
        self.assertNotIn("SWEEP", self.view("list")[0])

    def test_dropping_a_column_gives_its_room_to_the_name(self):
        headers = ["ID", "NAME", "A", "B"]
        rows = [["abc", "n" * 40, "1" * 10, "2" * 10]]
        table = runpilot.render_table(headers, rows, width=35, min_columns=2, shrink={1})
        # B cannot stay (the name would be under 8); A stays and the name takes the rest: exactly 35
        self.assertEqual(table.splitlines()[0].split(), ["ID", "NAME", "A"])
        self.assertEqual(len(table.splitlines()[1]), 35)

    def test_cut_in_the_middle_keeping_the_end(self):
        cases = [("synth-cnn-resnet[LR=0.001]", 16, "synth…[LR=0.001]"),
                 ("synth-cnn-resnet[LR=0.001]", 26, "synth-cnn-resnet[LR=0.001]"),
                 ("very-long-experiment-name-v12", 12, "ver…name-v12"),
                 ("ab", 1, "…"),
                 ("日本語の長い名前です[LR=1]", 16, "日本語の…[LR=1]")]
        for text, width, expected in cases:
            with self.subTest(text=text, width=width):
                self.assertEqual(runpilot.clip_middle(text, width), expected)
                self.assertLessEqual(runpilot.text_width(runpilot.clip_middle(text, width)), width)


class SweepIds(SweepViewsCase):
    def setUp(self) -> None:
        super().setUp()
        self.first = self.sweep("env.LR=0.1,0.2")
        self.second = self.sweep("env.LR=0.3")

    def ids_listed(self, *args: str) -> list[str]:
        code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        return sorted({row["sweep_id"] for row in json.loads(out)})

    def test_every_form_names_the_same_sweep(self):
        forms = {self.first: [self.first, self.first[-6:], "sw-" + self.first[-6:], "-2"],
                 self.second: [self.second, "latest", "-1", self.second[:-3]]}
        for sweep_id, refs in forms.items():
            for ref in refs:
                with self.subTest(ref=ref):
                    self.assertEqual(self.ids_listed("list", "--json", "--sweep", ref), [sweep_id])

    def test_compare_export_and_plot_take_the_short_forms(self):
        code, out, err = self.cli("compare", "--sweep", "-2")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[1].split(), ["env.LR", "0.1", "0.2"])
        code, out, err = self.cli("export", "--sweep", "sw-" + self.second[-6:], "--format", "jsonl")
        self.assertEqual(code, 0, err)
        self.assertEqual([json.loads(line)["train_loss"] for line in out.splitlines()], [0.3])
        code, out, err = self.cli("plot", "--sweep", "latest", "--ascii", "--width", "60", "--height", "10")
        self.assertEqual(code, 0, err)
        self.assertIn("train_loss", out)

    def test_stop_and_resume_take_them_too(self):
        code, out, err = self.cli("stop", "--sweep", "latest")
        self.assertEqual((code, out), (0, f"sweep {self.second}: 1 succeeded\n"), err)
        code, out, err = self.cli("stop", "sw-" + self.first[-6:])
        self.assertEqual((code, out), (0, f"sweep {self.first}: 2 succeeded\n"), err)
        code, out, err = self.cli("sweep", "--resume", "-2")
        self.assertEqual((code, out), (0, f"sweep {self.first}: every point has finished; nothing to resume\n"),
                         err)

    def test_wrong_forms_are_one_line_errors(self):
        cases = [(("list", "--sweep", "-3"), "there is no sweep '-3' yet"),
                 (("list", "--sweep", "-0"), "names no sweep: -1 is the newest"),
                 (("list", "--sweep", "sw-ffffff"), "no sweep matches 'sw-ffffff'; see runpilot sweeps"),
                 (("compare", "--sweep", "sw-2"), "matches several sweeps"),
                 (("list", "--sweep", "bad id"), "is not a sweep id"),
                 (("stop", "--sweep", "-1", "latest"), "give a run or --sweep ID, not both"),
                 (("stop",), "name the run to stop (id, prefix, latest, -N), or a sweep with --sweep ID"),
                 (("sweep", "--resume", "nope!"), "is not a sweep id")]
        for args, message in cases:
            with self.subTest(args=args):
                self.assertCleanError(self.cli(*args), 2, message)

    def test_the_sweep_folder_is_the_truth_for_latest(self):
        # a sweep whose runs were all deleted is still a sweep (its plan is there): latest names it
        self.assertEqual(runpilot.find_sweep(self.store, "latest"), self.second)
        self.assertEqual(runpilot.find_sweep(self.store, self.second[3:]), self.second)


class SweepsCommand(SweepViewsCase):
    def test_the_sweeps_their_progress_statuses_and_best_at_80_columns(self):
        first = self.sweep("env.LR=0.3,0,0.1")  # LR=0 fails
        second = self.sweep("env.LR=0.5", name="short")
        lines = self.view("sweeps")
        self.assertFits(lines)
        self.assertEqual(lines[0].split(), ["SWEEP", "NAME", "CREATED", "DONE", "STATUSES", "BEST"])
        newest, older = lines[1], lines[2]
        self.assertTrue(newest.startswith(f"sw-{second[-6:]}  short"), newest)
        self.assertEqual(self.cells(newest)[3:], ["1/1", "1 succeeded", "train_loss=0.5"])
        self.assertEqual(self.cells(older)[:2], [f"sw-{first[-6:]}", "synt…experiment"])  # the name gives way
        self.assertEqual(self.cells(older)[3:], ["3/3", "2 succeeded, 1 failed", "train_loss=0"])

    def test_json(self):
        sweep_id = self.sweep("env.LR=0.3,0.1")
        code, out, err = self.cli("sweeps", "--json")
        self.assertEqual(code, 0, err)
        [row] = json.loads(out)
        run_of_best = json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1])[1]["id"]
        self.assertEqual(row, {"id": sweep_id, "name": LONG_NAME, "created_at": row["created_at"], "on": "here",
                               "points": 2, "done": 2, "statuses": {"succeeded": 2},
                               "best": {"metric": "train_loss", "value": 0.1, "run_id": run_of_best}})

    def test_narrow_terminal_cuts_names_and_statuses_not_the_rest(self):
        self.sweep("env.LR=0.3,0,0.1", name="n" * 60)
        lines = self.view("sweeps", width=70)
        self.assertFits(lines, 70)
        self.assertEqual(len(lines[0].split()), 6)
        self.assertEqual(self.cells(lines[1])[3], "3/3")
        self.assertRegex(self.cells(lines[1])[4], r"^2 succeeded, ")

    def test_no_sweeps_yet(self):
        code, out, err = self.cli("sweeps")
        self.assertEqual((code, out), (0, "no sweeps yet; start one with: runpilot sweep CONFIG --grid KEY=V1,V2\n"))

    def test_a_wrongly_typed_plan_is_left_out_with_a_note(self):
        good = self.sweep("env.LR=0.3")
        for broken in ({"points": [5]}, {"options": []}, {"points": [{"index": 0}]}, {"points": {"a": 1}},
                       {"points": [{"run_id": ["x"]}], "created_at": 5}):
            with self.subTest(broken=broken):
                plan = self.home / "sweeps" / "sw-20990101-000000-abcdef" / "sweep.json"
                plan.parent.mkdir(parents=True, exist_ok=True)
                plan.write_text(json.dumps({"sweep_id": plan.parent.name, "config_file": None, "axes": [],
                                            "repeat": 1, "points": [], "options": {}, **broken}))
                code, out, err = self.cli("sweeps", "--json")
                self.assertEqual(code, 0, err)
                self.assertIn([row["id"] for row in json.loads(out)], ([good], [plan.parent.name, good]))
                self.assertEqual(runpilot._sweep_points_of(self.store, plan.parent.name) or {}, {})

    def test_a_queued_point_counts_as_not_done(self):
        sweep_id = self.sweep("env.LR=0.3,0.1")
        sweep = runpilot.Sweep.load(self.store, sweep_id)
        folder = self.store.folder(sweep.points[1].run_id)
        meta = folder.read_meta()
        meta.status, meta.runner = runpilot.QUEUED, runpilot.runner_identity()  # this process holds it queued
        folder.write_meta(meta)
        self.store.save(meta)
        [row] = json.loads(self.cli("sweeps", "--json")[1])
        self.assertEqual((row["done"], row["statuses"]), (1, {"succeeded": 1, "queued": 1}))


class SlurmEndings(RunsHome):
    """How an attached Slurm run's end is told and recorded (pure parts; the cluster tests are in
    test_sweepviews_slurm)."""

    def meta(self, **fields) -> runpilot.RunMeta:
        record = self.add_run("on-slurm", metric_names=["loss"], samples=[{"loss": 0.5}], **fields)
        return self.store.folder(record.id).read_meta()

    def test_closing_lines_are_a_local_runs(self):
        meta = self.meta(status="interrupted", exit_code=143, stop_signal=signal.SIGINT,
                         reason="stopped by Ctrl-C (scancel; the job got SIGTERM)")
        folder = self.store.folder(meta.run_id).path
        self.assertEqual(runpilot.slurm_closing_lines(self.store, meta, 130, None, stopped_here=True),
                         [f"run {meta.run_id} interrupted by Ctrl-C after 10.0s (exit code 143); runpilot exits "
                          "with 130", "  loss=0.5", f"  folder: {folder}"])

    def test_a_failure_keeps_its_reason_and_hint(self):
        meta = self.meta(status="failed", exit_code=1, reason="podman is not installed on node vm", hint="use local")
        lines = runpilot.slurm_closing_lines(self.store, meta, 1, None, stopped_here=False)
        self.assertEqual(lines[0], f"run {meta.run_id} failed in 10.0s (exit code 1): podman is not installed on "
                                   "node vm")
        self.assertEqual(lines[-1], "hint: use local")

    def test_a_sweeps_point_closes_as_a_local_sweeps(self):
        meta = self.meta(status="succeeded", exit_code=0)
        self.assertEqual(runpilot.slurm_closing_lines(self.store, meta, 0, "[2/3 LR=0.1]", stopped_here=False),
                         [f"[2/3 LR=0.1] succeeded in 10.0s (exit code 0), loss 0.5 (run {meta.run_id[-6:]})"])


if __name__ == "__main__":
    import unittest
    unittest.main()
