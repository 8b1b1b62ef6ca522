"""Looking at runs: list, show, logs, compare, export, rm and gc, and how every command names a run.

Most tests fill a private home with synthetic runs made through RunPilot's own store code (run folder,
meta.json, metrics.json, runs.db row) with controlled start times, statuses, names, tags and metrics;
only `logs -f` starts a real job (engine local).
"""

import csv
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
import unittest
from unittest import mock

import runpilot
from pathlib import Path
from tests.common import BASE, RUNPILOT, UTC, RunsHome, Tty

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ViewsHome(RunsHome):
    """Synthetic runs (tests.common.RunsHome) and ways to look at them as a user does."""

    def without_terminal(self) -> None:
        """stdin is not a terminal (as in CI): commands that ask must be told -y instead."""
        patcher = mock.patch("sys.stdin", io.StringIO(""))
        patcher.start()
        self.addCleanup(patcher.stop)

    def ids(self, *args: str) -> list[str]:
        code, out, err = self.cli("list", "-q", *args)
        self.assertEqual(code, 0, err)
        return out.split()

def columns_of(header: str) -> list[tuple[int, int]]:
    """(start, end) of each header word."""
    return [m.span() for m in re.finditer(r"\S+", header)]


# ==== list ==================================================================

class ListTable(ViewsHome):
    def three_runs(self) -> list[runpilot.RunRecord]:
        a = self.add_run("alpha", started=BASE, duration=5.0, metric_names=["loss", "acc"],
                         samples=[{"loss": 0.5, "acc": 0.5}, {"loss": 0.25, "acc": 0.9}])
        b = self.add_run("beta-long-name", "failed", started=BASE + dt.timedelta(hours=1), duration=75.0,
                         exit_code=3, metric_names=["loss", "acc"], samples=[{"loss": 1.25}])
        c = self.add_run("c", "running", started=BASE + dt.timedelta(hours=2), metric_names=["loss"])
        return [a, b, c]

    def test_absolute_table_is_aligned_and_newest_first(self):
        a, b, c = self.three_runs()
        code, out, err = self.cli("list", "--absolute")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [  # ids shown short: their last six hex digits
            "ID      NAME            STATUS     STARTED               DURATION  EXIT  LOSS  ACC",
            f"{c.id[-6:]}  c               running    2026-11-20T12:00:00Z         -     -     -    -",
            f"{b.id[-6:]}  beta-long-name  failed     2026-11-20T11:00:00Z     1m15s     3  1.25    -",
            f"{a.id[-6:]}  alpha           succeeded  2026-11-20T10:00:00Z      5.0s     0  0.25  0.9",
        ])
        code, out, err = self.cli("list", "--absolute", "--no-trunc")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            "ID                      NAME            STATUS     STARTED               DURATION  EXIT  LOSS  ACC",
            f"{c.id}  c               running    2026-11-20T12:00:00Z         -     -     -    -",
            f"{b.id}  beta-long-name  failed     2026-11-20T11:00:00Z     1m15s     3  1.25    -",
            f"{a.id}  alpha           succeeded  2026-11-20T10:00:00Z      5.0s     0  0.25  0.9",
        ])

    def test_tags_column_when_a_run_has_tags(self):
        a = self.add_run("alpha", started=BASE, metric_names=["loss"], samples=[{"loss": 0.5}])
        b = self.add_run("beta", started=BASE + dt.timedelta(minutes=1), metric_names=["loss"],
                         tags={"try": "2", "opt": "adam"})
        code, out, err = self.cli("list", "--absolute")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            "ID      NAME   STATUS     STARTED               DURATION  EXIT  LOSS  TAGS",
            f"{b.id[-6:]}  beta   succeeded  2026-11-20T10:01:00Z     10.0s     0     -  opt=adam,try=2",
            f"{a.id[-6:]}  alpha  succeeded  2026-11-20T10:00:00Z     10.0s     0   0.5  -",
        ])

    def test_columns_line_up_under_their_headers(self):
        self.three_runs()
        lines = self.cli("list")[1].splitlines()
        spans = columns_of(lines[0])
        self.assertEqual(len(spans), 8)
        for line in lines[1:]:
            with self.subTest(line=line):
                for i, (start, end) in enumerate(spans):
                    if i in (0, 1, 2, 3):   # id, name, status, started: left-aligned
                        self.assertNotEqual(line[start], " ")
                        self.assertEqual(line[start - 1:start].strip(), "")
                    else:                   # duration, exit, metrics: right-aligned
                        self.assertNotEqual(line[end - 1], " ")
                        self.assertEqual(line[end:end + 1].strip(), "")

    def test_relative_start_times(self):
        self.add_run("days", ago=dt.timedelta(days=2, hours=1))
        self.add_run("hours", ago=dt.timedelta(hours=3, minutes=5))
        self.add_run("minutes", ago=dt.timedelta(minutes=45, seconds=10))
        lines = self.cli("list")[1].splitlines()
        started = {line.split()[1]: " ".join(line.split()[3:5]) for line in lines[1:]}
        self.assertEqual(started, {"days": "2d ago", "hours": "3h ago", "minutes": "45m ago"})
        self.assertEqual([line.split()[1] for line in lines[1:]], ["minutes", "hours", "days"])

    def test_colour_codes_only_decorate_the_status(self):
        self.three_runs()
        records = self.store.query()
        plain = runpilot.render_runs(records, ["loss", "acc"], True, None, colour=False)
        coloured = runpilot.render_runs(records, ["loss", "acc"], True, None, colour=True)
        self.assertIn("\x1b[36mrunning  \x1b[0m", coloured)
        self.assertIn("\x1b[31mfailed   \x1b[0m", coloured)
        self.assertIn("\x1b[32msucceeded\x1b[0m", coloured)
        self.assertNotIn("\x1b", plain)
        self.assertEqual(ANSI.sub("", coloured), plain)
        self.assertEqual(coloured.splitlines()[0], plain.splitlines()[0])  # the header is never painted

    def test_no_colour_when_piped_or_asked(self):
        self.three_runs()
        code, out, _ = self.cli("list")
        self.assertEqual(code, 0)
        self.assertNotIn("\x1b", out)
        code, tty_out, _ = self.tty_cli("list")
        self.assertEqual(code, 0)
        self.assertIn("\x1b[32m", tty_out)
        self.assertEqual(ANSI.sub("", tty_out), out)
        self.assertEqual(self.tty_cli("list", "--no-color")[1], out)
        self.assertEqual(self.tty_cli("list", env={"NO_COLOR": "1"})[1], out)

    def test_metric_columns_are_the_featured_metrics(self):
        self.add_run("one", started=BASE, metric_names=["loss"], samples=[{"loss": 0.5, "noise": 7}])
        self.add_run("two", started=BASE + dt.timedelta(minutes=1), metric_names=["f1", "loss"],
                     samples=[{"f1": 0.75, "other": 1}])
        lines = self.cli("list", "--absolute")[1].splitlines()
        self.assertEqual(lines[0].split()[6:], ["F1", "LOSS"])
        self.assertEqual([line.split()[6:] for line in lines[1:]], [["0.75", "-"], ["-", "0.5"]])

    def test_a_metric_named_like_a_column_keeps_its_case(self):
        self.add_run("s", metric_names=["loss", "status"], samples=[{"loss": 1, "status": "ok"}])
        self.assertEqual(self.cli("list")[1].splitlines()[0].split(),
                         ["ID", "NAME", "STATUS", "STARTED", "DURATION", "EXIT", "LOSS", "status"])

    def test_sorting_by_a_metric_no_run_has_is_an_error(self):
        # a typo (durations) came back unsorted with exit 0
        self.add_run("a", samples=[{"loss": 0.5, "acc": 0.9}])
        code, out, err = self.cli("list", "--sort", "durations")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, "runpilot: error: --sort 'durations': no listed run has that metric; sort by "
                              "started, duration or one of acc, loss\n")
        self.assertEqual(self.cli("list", "--sort", "acc")[0], 0)

    def test_width_drops_the_last_metric_columns_but_never_the_first_six(self):
        # a line wider than the terminal wraps and garbles the table: metrics give way from the right
        self.add_run("wide", duration=3725.0, metric_names=["loss", "accuracy", "f1"],
                     samples=[{"loss": 0.125, "accuracy": 0.875, "f1": 0.5}])
        records = self.store.query()
        full = runpilot.render_runs(records, ["loss", "accuracy", "f1"], True, None)
        full_width = max(len(line) for line in full.splitlines())
        two_metrics = full_width - len("  0.5")  # the F1 column and its separator
        one_metric = two_metrics - len("  ACCURACY")
        six = [line.split()[:6] for line in full.splitlines()]
        for width, headers in ((full_width, ["LOSS", "ACCURACY", "F1"]),
                               (full_width - 1, ["LOSS", "ACCURACY"]), (two_metrics, ["LOSS", "ACCURACY"]),
                               (two_metrics - 1, ["LOSS"]), (one_metric, ["LOSS"]), (one_metric - 1, []),
                               (10, []), (1, [])):
            with self.subTest(width=width):
                table = runpilot.render_runs(records, ["loss", "accuracy", "f1"], True, width)
                lines = table.splitlines()
                self.assertEqual(lines[0].split()[6:], headers)
                self.assertEqual([line.split()[:6] for line in lines], six)
                self.assertEqual([len(line.split()) for line in lines], [6 + len(headers)] * 2)
                self.assertTrue(full.splitlines()[0].startswith(lines[0]))
                if headers:  # it fits; narrower than the first six columns, they stay anyway
                    self.assertLessEqual(max(len(line) for line in lines), width)
        self.assertEqual(runpilot.render_runs(records, ["loss", "accuracy", "f1"], True, 10, full=True),
                         runpilot.render_runs(records, ["loss", "accuracy", "f1"], True, None, full=True))
        self.assertEqual(six[1][4], "1h02m")

    def test_wide_characters_keep_the_columns_aligned(self):
        # Was a bug (fixed): format_table pads with len(), not display width, so a name in CJK (two terminal columns per
        # character) pushes the rest of its row right of the header.
        self.add_run("训练实验", started=BASE)
        self.add_run("plain", started=BASE + dt.timedelta(minutes=1))
        lines = self.cli("list", "--absolute")[1].splitlines()

        def display_column(line: str, text: str) -> int:
            head = line[:line.index(text)]
            return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in head)
        columns = [display_column(line, word) for line, word in zip(lines, ("STATUS", "succeeded", "succeeded"))]
        self.assertEqual(columns, [columns[0]] * 3)

    def test_terminal_width_cuts_the_name_and_keeps_the_metrics(self):
        name = "wide-" + "x" * 40
        self.add_run(name, metric_names=["loss", "accuracy"], samples=[{"loss": 0.125, "accuracy": 0.875}])
        full = self.cli("list")[1].splitlines()  # piped without COLUMNS: no limit
        self.assertEqual(full[1].split()[1], name)
        width = len(full[1]) - 10
        code, out, _ = self.tty_cli("list", "--no-color", env={"COLUMNS": str(width)})
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual([len(line) for line in lines], [width, width])
        self.assertEqual(lines[0].split()[-2:], ["LOSS", "ACCURACY"])
        self.assertEqual(lines[1].split()[1], "wide-" + "x" * 6 + "…" + "x" * 23)  # cut in the middle, end kept
        self.assertEqual(lines[1].split()[-2:], ["0.125", "0.875"])
        self.assertEqual(self.cli("list", env={"COLUMNS": str(width)})[1], out)  # piped: COLUMNS holds too
        self.assertEqual(self.tty_cli("list", "--no-color", "--no-trunc", env={"COLUMNS": str(width)})[1].split(),
                         (self.cli("list", "--no-trunc")[1]).split())


class ListFilters(ViewsHome):
    def test_status_name_and_tags(self):
        a = self.add_run("sweep-lr1", "succeeded", started=BASE, tags={"lr": "0.1", "opt": "adam"})
        b = self.add_run("sweep-lr2", "failed", started=BASE + dt.timedelta(minutes=1), tags={"lr": "0.2"})
        c = self.add_run("baseline", "failed", started=BASE + dt.timedelta(minutes=2), tags={"lr": "0.1"})
        d = self.add_run("sweep-big", "timeout", started=BASE + dt.timedelta(minutes=3))
        self.assertEqual(self.ids("--status", "failed"), [c.id, b.id])
        self.assertEqual(self.ids("--status", "timeout"), [d.id])
        self.assertEqual(self.ids("--name", "sweep-*"), [d.id, b.id, a.id])
        self.assertEqual(self.ids("--name", "sweep-lr?"), [b.id, a.id])
        self.assertEqual(self.ids("--name", "sweep"), [])
        self.assertEqual(self.ids("--tag", "lr=0.1"), [c.id, a.id])
        self.assertEqual(self.ids("--tag", "lr=0.1", "--tag", "opt=adam"), [a.id])
        self.assertEqual(self.ids("--tag", "lr=0.1", "--status", "failed", "--name", "base*"), [c.id])
        code, out, _ = self.cli("list", "--tag", "lr=9")
        self.assertEqual((code, out), (0, "no run matches\n"))
        self.assertEqual(self.cli("list", "--status", "bogus")[0], 2)

    def test_since_age_and_date(self):
        old = self.add_run("old", ago=dt.timedelta(days=3))
        new = self.add_run("new", ago=dt.timedelta(days=1))
        newest = self.add_run("newest", ago=dt.timedelta(hours=1))
        self.assertEqual(self.ids("--since", "2d"), [newest.id, new.id])
        self.assertEqual(self.ids("--since", "12h"), [newest.id])
        self.assertEqual(self.ids("--since", "4d"), [newest.id, new.id, old.id])
        for gone in (old, new, newest):
            self.store.delete(gone.id)
        before = self.add_run("before", started=dt.datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC))
        first = self.add_run("first", started=dt.datetime(2026, 11, 1, 0, 0, 0, tzinfo=UTC))
        later = self.add_run("later", started=dt.datetime(2026, 11, 15, 8, 0, 0, tzinfo=UTC))
        self.assertEqual(self.ids("--since", "2026-11-01"), [later.id, first.id])
        self.assertEqual(self.ids("--since", "2026-11-15T08:00:01"), [])
        self.assertEqual(self.ids("--since", "2026-10-31"), [later.id, first.id, before.id])

    def test_bad_since_is_a_one_line_usage_error(self):
        self.add_run()
        for bad in ("yesterday", "2d ago", "2026-13-01", "0"):
            with self.subTest(since=bad):
                self.assertCleanError(self.cli("list", "--since", bad), 2, f"--since {bad!r}", "2d", "2026-11-01")

    def test_limit_all_and_default_screenful(self):
        records = [self.add_run(f"r{i}", started=BASE + dt.timedelta(minutes=i)) for i in range(30)]
        newest_first = [r.id for r in reversed(records)]
        self.assertEqual(self.ids("--limit", "3"), newest_first[:3])
        self.assertEqual(self.ids("--all"), newest_first)
        default = self.ids()
        self.assertLess(len(default), 30)
        self.assertEqual(default, newest_first[:len(default)])
        code, out, _ = self.tty_cli("list", env={"LINES": "15"})
        self.assertEqual(code, 0)
        self.assertLessEqual(len(out.splitlines()), 15)
        self.assertGreaterEqual(len(out.splitlines()), 5)
        self.assertEqual([ln.split()[0] for ln in ANSI.sub("", out).splitlines()[1:]],
                         [run_id[-6:] for run_id in newest_first[:len(out.splitlines()) - 1]])

    def test_hundreds_of_runs(self):
        records = []
        for i in range(300):
            status = ("succeeded", "failed", "timeout")[i % 3]
            records.append(self.add_run(f"sweep-{i:03d}", status, started=BASE - dt.timedelta(hours=i),
                                        duration=float(i), metric_names=["loss"], samples=[{"loss": i / 1000}],
                                        index=False))
        self.assertEqual(self.store.reindex(), 300)
        everything = self.ids("--all")
        self.assertEqual(everything, [r.id for r in records])   # records were made newest first
        self.assertEqual(self.ids("--all", "--status", "failed"), [r.id for r in records[1::3]])
        self.assertEqual(self.ids("--all", "--name", "sweep-1??"), [r.id for r in records[100:200]])
        self.assertEqual(self.ids("--limit", "5", "--sort", "loss", "--asc"), [r.id for r in records[:5]])
        self.assertEqual(self.ids("--limit", "2", "--sort", "duration"), [records[299].id, records[298].id])
        self.assertEqual(len(self.cli("list", "--all")[1].splitlines()), 301)


class ListSorting(ViewsHome):
    def setUp(self) -> None:
        super().setUp()
        self.fast = self.add_run("fast", started=BASE, duration=2.0, samples=[{"loss": 0.5, "acc": 0.25}])
        self.slow = self.add_run("slow", started=BASE + dt.timedelta(minutes=1), duration=300.0,
                                 samples=[{"loss": 0.125}])
        self.live = self.add_run("live", "running", started=BASE + dt.timedelta(minutes=2))
        self.mid = self.add_run("mid", started=BASE + dt.timedelta(minutes=3), duration=30.0,
                                samples=[{"loss": 0.25, "acc": 0.75}])

    def names(self, *args: str) -> list[str]:
        code, out, err = self.cli("list", *args)
        self.assertEqual(code, 0, err)
        return [line.split()[1] for line in out.splitlines()[1:]]

    def test_started(self):
        self.assertEqual(self.names(), ["mid", "live", "slow", "fast"])
        self.assertEqual(self.names("--sort", "started", "--desc"), ["mid", "live", "slow", "fast"])
        self.assertEqual(self.names("--sort", "started", "--asc"), ["fast", "slow", "live", "mid"])

    def test_duration_with_runs_lacking_one_last(self):
        self.assertEqual(self.names("--sort", "duration"), ["slow", "mid", "fast", "live"])
        self.assertEqual(self.names("--sort", "duration", "--asc"), ["fast", "mid", "slow", "live"])

    def test_metric_with_runs_lacking_it_last(self):
        self.assertEqual(self.names("--sort", "loss"), ["fast", "mid", "slow", "live"])
        self.assertEqual(self.names("--sort", "loss", "--asc"), ["slow", "mid", "fast", "live"])
        self.assertEqual(self.names("--sort", "acc", "--desc"), ["mid", "fast", "live", "slow"])
        self.assertEqual(self.names("--sort", "acc", "--asc"), ["fast", "mid", "live", "slow"])
        self.assertEqual(self.cli("list", "--sort", "nothing")[0], 2)  # a typo, not an unsorted list

    def test_asc_and_desc_exclude_each_other_and_bad_keys_fail(self):
        self.assertEqual(self.cli("list", "--asc", "--desc")[0], 2)
        self.assertCleanError(self.cli("list", "--sort", "not a key"), 2, "--sort 'not a key'")

    def test_sorting_survives_a_nan_metric(self):
        # Was a bug (fixed): a run whose last value is nan is stored as {"loss": NaN} in runs.db (json.dumps allows NaN);
        # SQLite's json_extract rejects that text, so `list --sort <any metric>` fails for every run with
        # "runs.db: malformed JSON; 'runpilot reindex' rebuilds it" (and reindex does not help).
        self.add_run("diverged", started=BASE + dt.timedelta(minutes=4), samples=[{"loss": "nan", "acc": 0.5}])
        code, out, err = self.cli("list", "--sort", "acc")
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split()[1] for line in out.splitlines()[1:3]], ["mid", "diverged"])


class ListForScripts(ViewsHome):
    KEYS = ["duration", "engine", "exit_code", "finished_at", "id", "image", "last_metrics", "metric_names", "name",
            "outputs_bytes", "path", "reason", "started_at", "status", "sweep_id", "tags"]

    def setUp(self) -> None:
        super().setUp()
        self.a = self.add_run("a,b \"quoted\"", started=BASE, duration=1.5, metric_names=["loss"],
                              samples=[{"loss": 0.5}], tags={"try": "1"})
        self.b = self.add_run("plain", "failed", started=BASE + dt.timedelta(minutes=1), duration=2.0,
                              exit_code=3, metric_names=["loss", "acc"], samples=[{"acc": 0.875}])

    def test_json_has_stable_keys_and_values(self):
        code, out, err = self.cli("list", "--json")
        self.assertEqual((code, err), (0, ""))
        rows = json.loads(out)
        self.assertEqual([list(r) for r in rows], [self.KEYS, self.KEYS])
        self.assertEqual(rows[1], {
            "duration": 1.5, "engine": "local", "exit_code": 0, "finished_at": "2026-11-20T10:00:01.500Z",
            "id": self.a.id, "image": None, "last_metrics": {"loss": 0.5}, "metric_names": ["loss"],
            "name": 'a,b "quoted"', "outputs_bytes": 0, "path": str(self.home / "runs" / self.a.id), "reason": None,
            "started_at": "2026-11-20T10:00:00.000Z", "status": "succeeded", "sweep_id": None, "tags": {"try": "1"}})
        self.assertEqual((rows[0]["id"], rows[0]["exit_code"], rows[0]["last_metrics"]), (self.b.id, 3, {"acc": 0.875}))
        self.assertEqual(self.cli("list", "--json")[1], out)
        self.assertEqual(json.loads(self.cli("list", "--json", "--status", "timeout")[1]), [])

    def test_json_is_strict_json_with_a_nan_metric(self):
        # Was a bug (fixed): `list --json` prints NaN for a nan metric (json.dumps allow_nan=True); that is not JSON,
        # so jq and strict parsers reject the whole list.
        self.add_run("diverged", started=BASE + dt.timedelta(minutes=2), samples=[{"loss": "nan"}])
        out = self.cli("list", "--json")[1]
        json.loads(out, parse_constant=lambda name: self.fail(f"{name} is not JSON"))

    def test_csv(self):
        code, out, err = self.cli("list", "--format", "csv")
        self.assertEqual((code, err), (0, ""))
        rows = list(csv.reader(io.StringIO(out)))
        self.assertEqual(rows[0], ["id", "name", "status", "started_at", "finished_at", "duration", "exit_code",
                                   "tags", "loss", "acc"])
        self.assertEqual(rows[1:], [
            [self.b.id, "plain", "failed", "2026-11-20T10:01:00.000Z", "2026-11-20T10:01:02.000Z", "2.0", "3",
             "", "", "0.875"],
            [self.a.id, 'a,b "quoted"', "succeeded", "2026-11-20T10:00:00.000Z", "2026-11-20T10:00:01.500Z",
             "1.5", "0", "try=1", "0.5", ""]])

    def test_quiet_prints_ids_only(self):
        code, out, err = self.cli("list", "-q")
        self.assertEqual((code, out, err), (0, f"{self.b.id}\n{self.a.id}\n", ""))
        self.assertEqual(self.cli("list", "-q", "--limit", "1")[1], f"{self.b.id}\n")


# ==== show ==================================================================

class Sparkline(unittest.TestCase):
    def test_rising(self):
        self.assertEqual(runpilot.sparkline([1, 2, 3, 4, 5, 6, 7, 8]), "▁▂▃▄▅▆▇█")
        self.assertEqual(runpilot.sparkline([8, 7, 6, 5, 4, 3, 2, 1]), "█▇▆▅▄▃▂▁")
        self.assertEqual(runpilot.sparkline([1.0, 0.5, 0.25, 0.125]), "█▄▂▁")

    def test_flat(self):
        self.assertEqual(runpilot.sparkline([5, 5, 5]), "▁▁▁")
        self.assertEqual(runpilot.sparkline([0.3]), "▁")

    def test_resampled_to_width(self):
        line = runpilot.sparkline(list(range(1000)))
        self.assertEqual(line, "▁▁▁▂▂▂▂▂▂▃▃▃▃▃▃▄▄▄▄▄▅▅▅▅▅▅▆▆▆▆▆▆▇▇▇▇▇▇██")
        self.assertEqual(len(runpilot.sparkline(list(range(1000)), width=10)), 10)
        self.assertEqual(runpilot.sparkline([0] * 999 + [1]), "▁" * 39 + "█")  # the last point is kept

    def test_nan_and_inf_are_skipped(self):
        nan, inf = float("nan"), float("inf")
        self.assertEqual(runpilot.sparkline([1, nan, 2, inf, 3, -inf]), "▁▅█")
        self.assertEqual(runpilot.sparkline([nan, inf, "text"]), "")
        self.assertEqual(runpilot.sparkline([]), "")

    def test_ascii_fallback(self):
        self.assertEqual(runpilot.sparkline([1, 2, 3, 4, 5, 6, 7, 8], ascii_only=True), "_.-=+*#@")
        self.assertEqual(runpilot.sparkline([1.0, 0.5, 0.25, 0.125], ascii_only=True), "@=._")
        self.assertTrue(runpilot.sparkline(list(range(1000)), ascii_only=True).isascii())


def shown_size(size: int) -> str:
    """How `show` spells a file's size: bytes below 1 KiB, else KiB with one decimal."""
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB"


class Show(ViewsHome):
    SAMPLES = [{"loss": 1.0, "acc": 0.5}, {"loss": 0.5}, {"loss": 0.25, "acc": 0.75}, {"loss": 0.125}]
    LOG = b"".join(b"step %026d\n" % i for i in range(64))  # 2 KiB in 64 lines
    HINT = "the job ran out of shared memory (/dev/shm): set resources.shm_size (e.g. 8g)"

    def make(self) -> runpilot.RunRecord:
        return self.add_run(
            "mnist", "failed", started=BASE, duration=125.0, exit_code=3, samples=self.SAMPLES,
            metric_names=["loss", "acc"], tags={"try": "2", "opt": "adam"}, log=self.LOG,
            config="name: mnist\nimage: pytorch/pytorch:2.2\nentrypoint: python train.py\nenv:\n  LR: '0.01'\n",
            engine="docker", engine_version="27.1.1", image="pytorch/pytorch:2.2", image_id="sha256:abc123",
            command_line="docker run --rm --init pytorch/pytorch:2.2 -c 'python train.py'",
            warnings=["metric f1 listed in the config never appeared"], hint=self.HINT,
            rerun_of="20261119-080000-aaaaaa")

    def test_every_field(self):
        r = self.make()
        folder = self.home / "runs" / r.id
        code, out, err = self.cli("show", r.id)
        self.assertEqual((code, err), (0, ""))
        meta_size = (folder / "meta.json").stat().st_size
        metrics_size = (folder / "metrics.json").stat().st_size
        config_size = (folder / "config.yaml").stat().st_size
        self.assertEqual(len(self.LOG), 2048)
        self.assertEqual(out.splitlines(), [
            f"run        {r.id}",
            "name       mnist",
            "status     failed (exit code 3)",
            "started    2026-11-20T10:00:00.000Z",
            "finished   2026-11-20T10:02:05.000Z",
            "duration   2m05s",
            "engine     docker 27.1.1",
            "image      pytorch/pytorch:2.2  (sha256:abc123)",
            "command    docker run --rm --init pytorch/pytorch:2.2 -c 'python train.py'",
            "host       testhost",
            f"folder     {folder}",
            "tags       opt=adam try=2",
            "rerun of   20261119-080000-aaaaaa",
            "files",
            f"  config.yaml    {shown_size(config_size):>10}",
            "  logs.txt          2.0 KiB",
            f"  meta.json      {shown_size(meta_size):>10}",
            f"  metrics.json   {shown_size(metrics_size):>10}",
            "metrics",
            "  metric  count  first   last    min   max  trend",
            "  loss        4      1  0.125  0.125     1  @=._",
            "  acc         2    0.5   0.75    0.5  0.75  _@",
            "warning    metric f1 listed in the config never appeared",
            f"hint       {self.HINT}",
            "log        the last 10 line(s) of logs.txt",  # a failed run shows how its log ends
            *[f"  step {i:026d}" for i in range(54, 64)],
            "config",
            "  name: mnist",
            "  image: pytorch/pytorch:2.2",
            "  entrypoint: python train.py",
            "  env:",
            "    LR: '0.01'",
        ])

    def test_unicode_sparkline_when_the_terminal_can_draw_it(self):
        r = self.make()
        utf8 = self.process("show", r.id, env={"PYTHONIOENCODING": "utf-8"})
        self.assertEqual(utf8.returncode, 0, utf8.stderr)
        self.assertRegex(utf8.stdout.decode(), r"\n  loss +4 +1 +0\.125 +0\.125 +1  █▄▂▁\n")
        ascii_only = self.process("show", r.id, env={"PYTHONIOENCODING": "ascii"})
        self.assertEqual(ascii_only.returncode, 0, ascii_only.stderr)
        self.assertRegex(ascii_only.stdout.decode("ascii"), r"\n  loss +4 +1 +0\.125 +0\.125 +1  @=\._\n")
        forced = self.process("show", r.id, "--ascii", env={"PYTHONIOENCODING": "utf-8"})
        self.assertEqual(forced.stdout, ascii_only.stdout)

    def test_a_run_without_metrics_or_exit_code(self):
        r = self.add_run("live", "running", started=BASE)
        lines = self.cli("show", r.id)[1].splitlines()
        self.assertIn("status     running", lines)
        self.assertIn("finished   -", lines)
        self.assertIn("duration   -", lines)
        self.assertIn("metrics    none", lines)

    def test_json(self):
        r = self.make()
        folder = self.home / "runs" / r.id
        (folder / ".hidden").write_text("x")
        code, out, err = self.cli("show", "latest", "--json")
        self.assertEqual((code, err), (0, ""))
        data = json.loads(out)
        self.assertEqual(sorted(data), ["files", "meta", "metrics", "outputs", "run"])
        self.assertEqual(data["run"], json.loads(self.cli("list", "--json")[1])[0])
        self.assertEqual(data["meta"], self.meta(folder))
        self.assertEqual(data["files"], {name: (folder / name).stat().st_size
                                         for name in ("config.yaml", "logs.txt", "meta.json", "metrics.json")})
        self.assertEqual(data["metrics"], {
            "loss": {"count": 4, "first": 1.0, "last": 0.125, "min": 0.125, "max": 1.0},
            "acc": {"count": 2, "first": 0.5, "last": 0.75, "min": 0.5, "max": 0.75}})


# ==== logs ==================================================================

SLOW_JOB = """\
import sys, time
for i in range(8):
    print(f"line {i}", flush=True)
    sys.stderr.write(f"err {i}\\n")
    sys.stderr.flush()
    time.sleep(0.25)
print("METRIC loss=0.5", flush=True)
print("the end", flush=True)
"""


class Logs(ViewsHome):
    LOG = b"plain\r\nbytes \xff\xfe not utf-8\n\x1b[31mred\x1b[0m\n\tlast line without newline"

    def test_whole_log_is_byte_exact(self):
        r = self.add_run(log=self.LOG)
        result = self.process("logs", r.id)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, self.LOG, b""))

    def test_tail(self):
        log = b"".join(b"line %d\n" % i for i in range(1, 101))
        r = self.add_run(log=log)
        self.assertEqual(self.process("logs", r.id, "--tail", "3").stdout, b"line 98\nline 99\nline 100\n")
        self.assertEqual(self.process("logs", r.id, "--tail", "1000").stdout, log)
        self.assertEqual(self.process("logs", r.id, "--tail", "0").stdout, b"")
        self.assertEqual(self.cli("logs", r.id, "--tail", "2")[1], "line 99\nline 100\n")

    def test_tail_of_long_lines(self):
        # Was a bug (fixed): _print_log reads only the last max(65536, N*512) bytes, so --tail N of lines longer than
        # that shows a cut first line (here: a fragment of line 0 instead of all 5 lines).
        log = b"".join(bytes([65 + i]) * 20000 + b"\n" for i in range(5))
        r = self.add_run(log=log)
        self.assertEqual(self.process("logs", r.id, "--tail", "5").stdout, log)

    def test_missing_log_prints_nothing(self):
        r = self.add_run()
        (self.home / "runs" / r.id / "logs.txt").unlink()
        self.assertEqual(self.cli("logs", r.id), (0, "", ""))

    def test_follow_prints_everything_and_ends_with_the_run(self):
        config = self.local_config(SLOW_JOB)
        runner = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(lambda: runner.poll() is None and (runner.kill(), runner.wait()))
        self.addCleanup(runner.stderr.close)
        deadline = time.monotonic() + 20
        while not self.store.query(runpilot.RunFilter(status="running")):
            self.assertLess(time.monotonic(), deadline, "the run never started")
            time.sleep(0.05)
        follower = self.process("logs", "-f", "latest", timeout=30)
        self.assertEqual(self.db_rows()[0]["status"], "succeeded", "logs -f returned before the run ended")
        self.assertEqual(runner.wait(timeout=30), 0)
        self.assertEqual(follower.returncode, 0, follower.stderr)
        run = self.only_run()
        log = (run / "logs.txt").read_bytes()
        self.assertEqual(follower.stdout, log)
        self.assertTrue(log.endswith(b"the end\n"))
        self.assertEqual(sorted(log.splitlines()), sorted(
            [b"line %d" % i for i in range(8)] + [b"err %d" % i for i in range(8)] + [b"METRIC loss=0.5",
                                                                                     b"the end"]))
        self.assertEqual(follower.stderr, b"")

    def test_follow_a_finished_run_returns_at_once(self):
        r = self.add_run(log=b"done\n")
        started = time.monotonic()
        self.assertEqual(self.cli("logs", "-f", r.id), (0, "done\n", ""))
        self.assertLess(time.monotonic() - started, 2)


# ==== compare ===============================================================

class Compare(ViewsHome):
    def test_differences_status_duration_last_and_best(self):
        a = self.add_run("mnist", "succeeded", started=BASE, duration=75.0,
                         config="name: mnist\nengine: local\nentrypoint: [python3, t.py]\n"
                                "env:\n  LR: 0.1\n  EPOCHS: 5\nresources:\n  gpus: 1\n",
                         samples=[{"loss": 1.0, "acc": 0.5}, {"loss": 0.4, "acc": 0.8}, {"loss": 0.5, "acc": 0.7}])
        b = self.add_run("mnist", "failed", started=BASE + dt.timedelta(hours=1), duration=5.0,
                         config="name: mnist\nengine: local\nentrypoint: [python3, t.py]\n"
                                "env:\n  LR: 0.2\n  EPOCHS: 5\n",
                         samples=[{"loss": 0.9, "acc": 0.6}, {"loss": 0.45, "acc": 0.75}])
        code, out, err = self.cli("compare", a.id, b.id)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [  # short ids in the header
            f"                   {a.id[-6:]}  {b.id[-6:]}",
            "env.LR                0.1     0.2",
            "resources.gpus          1       -",
            "status          succeeded  failed",
            "duration            1m15s    5.0s",
            "loss (last)           0.5   0.45*",
            "loss (best)          0.4*    0.45",
            "acc (last)            0.7   0.75*",
            "acc (best)           0.8*    0.75",
        ])
        code, out, err = self.cli("compare", a.id, b.id, "--no-trunc")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            f"                {a.id}  {b.id}",
            "env.LR                             0.1                     0.2",
            "resources.gpus                       1                       -",
            "status                       succeeded                  failed",
            "duration                         1m15s                    5.0s",
            "loss (last)                        0.5                   0.45*",
            "loss (best)                       0.4*                    0.45",
            "acc (last)                         0.7                   0.75*",
            "acc (best)                        0.8*                    0.75",
        ])

    def test_many_runs_go_in_blocks_that_fit_the_width(self):
        # eight runs made an 88-column table at any width: it wrapped and garbled
        ids = [self.add_run(f"run{i}", started=BASE + dt.timedelta(minutes=i),
                            samples=[{"val_loss": 0.125 * (i + 1)}]).id for i in range(8)]
        code, out, err = self.tty_cli("compare", *ids, env={"COLUMNS": "60"})
        self.assertEqual(code, 0, err)
        blocks = out.split("\n\n")
        self.assertGreater(len(blocks), 1)
        self.assertLessEqual(max(len(line) for line in out.splitlines()), 60)
        shown = [short for block in blocks for short in block.splitlines()[0].split()]
        self.assertEqual(shown, [run_id[-6:] for run_id in ids])  # every run once, in order
        for block in blocks:
            self.assertEqual([line.split()[0] for line in block.splitlines()[1:]],
                             ["name", "status", "duration", "val_loss", "val_loss"])
        self.assertEqual(self.cli("compare", *ids, "--no-trunc")[1].count("\n\n"), 0)

    def test_three_runs_by_reference_and_lower_is_better_names(self):
        for i, (val_loss, f1) in enumerate(((0.3, 0.5), (0.1, 0.9), (0.2, 0.7))):
            self.add_run(f"run{i}", started=BASE + dt.timedelta(minutes=i),
                         samples=[{"val_loss": val_loss, "f1": f1}])
        code, out, err = self.cli("compare", "-3", "-2", "latest")
        self.assertEqual((code, err), (0, ""))
        rows = {line.split()[0] + (" " + line.split()[1] if "(" in line else ""): line.split()[-3:]
                for line in out.splitlines()[1:]}
        self.assertEqual(rows["val_loss (last)"], ["0.3", "0.1*", "0.2"])
        self.assertEqual(rows["f1 (best)"], ["0.5", "0.9*", "0.7"])
        self.assertEqual(rows["name"], ["run0", "run1", "run2"])
        self.assertNotIn("engine", rows)
        self.assertNotIn("entrypoint", rows)

    def test_real_runs_with_an_override(self):
        config = self.local_config('import os\nprint("METRIC loss=" + os.environ["LR"])\n', LR=0.5,
                                   extra="metrics: [loss]\n")
        self.assertEqual(self.cli("run", config)[0], 0)
        self.assertEqual(self.cli("run", config, "--set", "env.LR=0.25")[0], 0)
        lines = self.cli("compare", "-2", "-1")[1].splitlines()
        self.assertEqual(lines[1].split(), ["env.LR", "0.5", "0.25"])
        self.assertEqual(lines[2].split(), ["status", "succeeded", "succeeded"])
        self.assertEqual(lines[4].split(), ["loss", "(last)", "0.5", "0.25*"])


# ==== export ================================================================

class Export(ViewsHome):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.add_run("first", started=BASE, samples=[{"loss": 1.0, "acc": 0.5}, {"loss": 0.5}])
        self.b = self.add_run("second", started=BASE + dt.timedelta(minutes=1),
                              samples=[{"step": 10, "loss": 0.75, "lr": 0.001}])

    def test_csv_one_row_per_sample(self):
        code, out, err = self.cli("export", self.a.id, self.b.id, "--format", "csv")
        self.assertEqual((code, err), (0, ""))
        rows = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual(list(rows[0]), ["run_id", "name", "step", "loss", "acc", "lr"])
        self.assertEqual(rows, [
            {"run_id": self.a.id, "name": "first", "step": "1", "loss": "1.0", "acc": "0.5", "lr": ""},
            {"run_id": self.a.id, "name": "first", "step": "2", "loss": "0.5", "acc": "", "lr": ""},
            {"run_id": self.b.id, "name": "second", "step": "10", "loss": "0.75", "acc": "", "lr": "0.001"}])
        self.assertEqual(self.cli("export", "-2", "-1")[1], out)  # csv is the default

    def test_jsonl(self):
        code, out, err = self.cli("export", "latest", self.a.id[:20], "--format", "jsonl")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([json.loads(line) for line in out.splitlines()], [
            {"run_id": self.b.id, "name": "second", "step": 10, "loss": 0.75, "lr": 0.001},
            {"run_id": self.a.id, "name": "first", "step": 1, "loss": 1.0, "acc": 0.5},
            {"run_id": self.a.id, "name": "first", "step": 2, "loss": 0.5}])

    def test_output_file(self):
        target = self.work / "metrics.csv"
        code, out, err = self.cli("export", self.a.id, self.b.id, "-o", target)
        self.assertEqual((code, out), (0, ""))
        self.assertEqual(err, f"wrote 3 sample(s) of 2 run(s) to {target}\n")
        self.assertEqual(target.read_text(), self.cli("export", self.a.id, self.b.id)[1])
        target = self.work / "metrics.jsonl"
        self.assertEqual(self.cli("export", self.a.id, "--format", "jsonl", "--output", target)[0], 0)
        self.assertEqual(len(target.read_text().splitlines()), 2)


class ExportErrors(ViewsHome):
    def test_unwritable_output_is_one_line(self):
        # Was a bug (fixed): cmd_export writes -o FILE with Path.write_text and does not catch OSError, so a missing folder
        # or a full disk ends in a Python traceback instead of one "runpilot: error:" line.
        r = self.add_run(samples=[{"loss": 1}])
        result = self.process("export", r.id, "-o", self.work / "no-such-folder" / "m.csv")
        self.assertEqual(result.stdout, b"")
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertTrue(result.stderr.startswith(b"runpilot: error: "), result.stderr)


# ==== rm and gc =============================================================

class Remove(ViewsHome):
    def setUp(self) -> None:
        super().setUp()
        self.keep = self.add_run("keep", started=BASE)
        self.drop = self.add_run("drop", started=BASE + dt.timedelta(minutes=1))
        # a stdin that is not a terminal, whatever runs the tests
        self.without_terminal()

    def assertPresent(self, *records: runpilot.RunRecord) -> None:
        self.assertEqual([p.name for p in self.runs()], sorted(r.id for r in records))
        self.assertEqual(sorted(row["id"] for row in self.db_rows()), sorted(r.id for r in records))

    def test_without_a_terminal_and_without_yes_nothing_is_deleted(self):
        self.assertCleanError(self.cli("rm", self.drop.id), 2, "-y")
        self.assertPresent(self.keep, self.drop)

    def test_yes_deletes_folder_and_row(self):
        size = runpilot.fmt_size(runpilot.tree_size(Path(self.drop.path)))
        code, out, err = self.cli("rm", self.drop.id[:18], "-y")
        self.assertEqual((code, out, err), (0, f"deleted {self.drop.id} (drop)\nfreed {size}\n", ""))
        self.assertPresent(self.keep)
        self.assertEqual([p.name for p in (self.home / "runs").iterdir()], [self.keep.id])

    def test_several_and_the_same_twice(self):
        code, out, _ = self.cli("rm", "-1", "-2", self.drop.id, "-y")
        self.assertEqual(code, 0)
        self.assertEqual(sorted(out.splitlines()[:-1]), sorted([f"deleted {self.drop.id} (drop)",
                                                                f"deleted {self.keep.id} (keep)"]))
        self.assertRegex(out.splitlines()[-1], r"^freed [\d.]+ KiB$")  # what rm frees (issue 23)
        self.assertPresent()

    def test_confirmation_on_a_terminal(self):
        for answer, code, left in (("n\n", 1, (self.keep, self.drop)), ("\n", 1, (self.keep, self.drop)),
                                   ("yes\n", 0, (self.keep,))):
            with self.subTest(answer=answer):
                stdin = Tty(answer)
                with mock.patch("sys.stdin", stdin):
                    got, out, _ = self.cli("rm", "latest")
                self.assertEqual(got, code)
                self.assertIn("delete 1 run(s) and their files? [y/N]", out)
                self.assertPresent(*left)

    def test_a_running_run_is_refused(self):
        live = self.add_run("live", "running", started=BASE + dt.timedelta(minutes=2))
        self.assertCleanError(self.cli("rm", live.id, "-y"), 2, f"run {live.id} is running; stop it first",
                              f"runpilot stop {live.id}")
        self.assertCleanError(self.cli("rm", live.id, self.drop.id, "-y"), 2, f"run {live.id} is running")
        self.assertPresent(self.keep, self.drop, live)
        self.assertEqual(self.db_rows()[-1]["status"], "running")


class GarbageCollect(ViewsHome):
    def setUp(self) -> None:
        super().setUp()
        self.without_terminal()
        # ten runs, one a day: the newest half a day old, the oldest 9.5 days; the third oldest still running
        self.records = [self.add_run(f"r{i}", "running" if i == 7 else "succeeded",
                                     ago=dt.timedelta(days=i, hours=12)) for i in range(10)]  # newest first

    def remaining(self) -> list[str]:
        return [row["id"] for row in reversed(self.db_rows())]

    @staticmethod
    def skipped(record) -> str:
        """What gc says of an active run that its rule would have taken (issue 21: it names it)."""
        return (f"runpilot: skipped: run {record.id} ({record.name}) is running; gc never deletes an active run "
                f"(runpilot stop {record.id} first)\n")

    def test_keep_newest(self):
        code, out, err = self.cli("gc", "--keep", "3", "-y")
        self.assertEqual((code, err), (0, self.skipped(self.records[7])))
        expected = [r.id for r in self.records[:3]] + [self.records[7].id]
        self.assertEqual(self.remaining(), expected)
        self.assertEqual(sorted(p.name for p in self.runs()), sorted(expected))
        self.assertEqual(len(out.splitlines()), 7)  # a line per run, and what they freed

    def test_older_than(self):
        self.assertEqual(self.cli("gc", "--older-than", "5d12h", "-y")[0], 2)  # not a duration
        code, _, err = self.cli("gc", "--older-than", "5d", "-y")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.remaining(), [r.id for r in self.records[:5]] + [self.records[7].id])

    def test_keep_and_older_than_together(self):
        code, _, err = self.cli("gc", "--keep", "2", "--older-than", "4d", "-y")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.remaining(), [r.id for r in self.records[:4]] + [self.records[7].id])

    def test_dry_run_lists_and_deletes_nothing(self):
        before = (self.db_rows(), self.runs())
        code, out, err = self.cli("gc", "--keep", "7", "--dry-run")
        self.assertEqual((code, err), (0, self.skipped(self.records[7])))
        lines = out.splitlines()
        doomed = [self.records[9], self.records[8]]  # oldest first; the running one is never collected
        self.assertEqual(lines, [f"would delete {r.id} succeeded   {r.name}" for r in doomed]
                         + ["2 run(s) would be deleted"])
        self.assertEqual((self.db_rows(), self.runs()), before)

    def test_needs_a_confirmation_and_a_rule(self):
        self.assertCleanError(self.cli("gc", "--keep", "1"), 2, "-y")
        self.assertEqual(len(self.db_rows()), 10)
        self.assertCleanError(self.cli("gc", "-y"), 2, "--keep", "--older-than")
        self.assertEqual(self.cli("gc", "--older-than", "100d", "-y"), (0, "nothing to delete\n", ""))

    def test_hundreds(self):
        for i in range(250):
            self.add_run(f"bulk{i}", started=BASE - dt.timedelta(days=60, minutes=i), index=False)
        self.assertEqual(self.store.reindex(), 260)
        code, out, _ = self.cli("gc", "--older-than", "30d", "--dry-run")
        self.assertEqual(out.splitlines()[-1], "250 run(s) would be deleted")
        self.assertEqual(len(self.db_rows()), 260)
        code, out, err = self.cli("gc", "--older-than", "30d", "-y")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 251)  # a line per run, and what they freed
        self.assertEqual(self.remaining(), [r.id for r in self.records])
        self.assertEqual(len(self.runs()), 10)


# ==== naming a run ==========================================================

class References(ViewsHome):
    def setUp(self) -> None:
        super().setUp()
        self.without_terminal()
        self.old = self.add_run("old", started=BASE, log=b"old log\n", samples=[{"loss": 2}])
        self.mid = self.add_run("mid", started=BASE + dt.timedelta(days=1), log=b"mid log\n", samples=[{"loss": 1}])
        self.new = self.add_run("new", started=BASE + dt.timedelta(days=2), log=b"new log\n", samples=[{"loss": 0}])

    def shown(self, ref: str) -> str:
        code, out, err = self.cli("show", ref)
        self.assertEqual(code, 0, err)
        return out.splitlines()[0].split()[1]

    def test_latest_minus_n_and_prefixes_on_every_command(self):
        for ref, record in (("latest", self.new), ("-1", self.new), ("-2", self.mid), ("-3", self.old),
                            (self.mid.id, self.mid), (self.mid.id[:10], self.mid), (self.old.id[:8], self.old)):
            with self.subTest(ref=ref):
                self.assertEqual(self.shown(ref), record.id)
                self.assertEqual(self.cli("logs", ref)[1], f"{record.name} log\n")
                self.assertEqual(self.cli("logs", ref, "--tail", "1")[1], f"{record.name} log\n")
                self.assertEqual(json.loads(self.cli("show", ref, "--json")[1])["run"]["id"], record.id)
                self.assertEqual(self.cli("export", ref, "--format", "jsonl")[1].count(record.id), 1)
                self.assertEqual(self.cli("compare", ref, ref)[1].splitlines()[0].split(), [record.id[-6:]] * 2)

    def test_rm_by_reference(self):
        self.assertEqual(self.cli("rm", "-2", "-y")[1].splitlines()[0], f"deleted {self.mid.id} (mid)")
        self.assertEqual(self.cli("rm", "latest", "-y")[1].splitlines()[0], f"deleted {self.new.id} (new)")
        self.assertEqual(self.cli("rm", self.old.id[:11], "-y")[1].splitlines()[0], f"deleted {self.old.id} (old)")
        self.assertEqual(self.db_rows(), [])

    def test_errors_go_to_stderr_only(self):
        ambiguous = self.old.id[:4]  # all three start with 2026
        for command in (["show"], ["logs"], ["export"], ["compare", "latest"], ["rm", "-y"], ["stop"]):
            with self.subTest(command=command[0]):
                self.assertCleanError(self.cli(*command, ambiguous), 2, f"{ambiguous!r} matches several runs",
                                      self.old.id, self.new.id)
                self.assertCleanError(self.cli(*command, "19990101"), 2, "no run matches '19990101'")
                self.assertCleanError(self.cli(*command, "-9"), 2, "no run '-9'")
                self.assertCleanError(self.cli(*command, "../x"), 2, "is not a run id")
        self.assertEqual(len(self.db_rows()), 3)

    def test_empty_home(self):
        with mock.patch.dict(os.environ, {"RUNPILOT_HOME": str(self.tmp / "empty")}):
            for command in ("show", "logs", "export", "compare", "rm"):
                with self.subTest(command=command):
                    self.assertCleanError(self.cli(command, "latest"), 2, "no run 'latest' yet",
                                          "runpilot run CONFIG")


if __name__ == "__main__":
    unittest.main()
