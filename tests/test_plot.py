"""`runpilot plot`: braille charts in the terminal and the self-contained HTML page.

The drawing is tested as pure functions (known series to known braille cells, tick choice, decimation,
smoothing); the command on synthetic runs written through RunPilot's own store code (widths, colours,
hostile names, refusals); end to end on real runs made with engine local; and the HTML page in a real
browser (chromium headless), which CI installs and requires with RUNPILOT_TEST_BROWSER=1.
"""

import contextlib
import datetime as dt
import io
import json
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import unittest
import xml.etree.ElementTree as ET
import zlib
from array import array
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import RUNPILOT, RunsHome, Tty

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)
ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SVG = "{http://www.w3.org/2000/svg}"
BRAILLE = re.compile("[\u2801-\u28ff]")
# The browser test needs one of these; RUNPILOT_TEST_BROWSER=1 (set by .ci/run) makes a missing one a failure.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
REQUIRED_BROWSER_VAR = "RUNPILOT_TEST_BROWSER"

# A job that prints a falling loss and a rising accuracy for LR, every step, and val_loss every 10 steps.
CURVES_JOB = """\
import math, os, sys
lr = float(os.environ["LR"])
steps = int(os.environ.get("STEPS", "60"))
for step in range(1, steps + 1):
    loss = 2.0 * math.exp(-lr * step / 10) + 0.05
    line = f"METRIC step={step} loss={loss:.5f} acc={1 - loss / 2.2:.5f}"
    if step % 10 == 0:
        line += f" val_loss={loss * 1.1:.5f}"
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
"""


def visible(line: str) -> str:
    """A line as it shows on the screen: without its colour codes."""
    return ESCAPE.sub("", line)


def series(n: int, start: float = 1.0, end: float = 0.1) -> list[dict]:
    return [{"step": i, "loss": start + (end - start) * i / max(1, n - 1), "acc": i / max(1, n - 1)}
            for i in range(n)]


class PlotHome(RunsHome):
    """A home with synthetic runs (tests.common.RunsHome), one minute apart, each 90 s long."""

    def add_run(self, name: str = "job", samples: list[dict] = (), status: str = "succeeded",
                metric_names: list[str] = (), config: str | None = None) -> runpilot.RunRecord:
        started = BASE + dt.timedelta(minutes=self.serial + 1)
        return super().add_run(name, status, started=started, duration=90.0, samples=samples,
                               metric_names=metric_names, config=config or f"name: {json.dumps(name)}\n"
                               "engine: local\nentrypoint: [python3, train.py]\n")



# ==== the drawing, as pure functions =========================================

class BrailleCells(unittest.TestCase):
    def test_each_dot_is_unicodes_braille_dot(self):
        # Unicode numbers the dots 1 2 3 7 down the left column and 4 5 6 8 down the right one.
        for (x, y), dot in {(0, 0): 1, (0, 1): 2, (0, 2): 3, (1, 0): 4, (1, 1): 5, (1, 2): 6, (0, 3): 7,
                            (1, 3): 8}.items():
            with self.subTest(x=x, y=y):
                canvas = runpilot.BrailleCanvas(1, 1)
                canvas.dot(x, y, (0, False))
                self.assertEqual(canvas.row_text(0, runpilot.PlotStyle(), {}), chr(0x2800 + (1 << (dot - 1))))

    def test_known_lines_give_known_cells(self):
        canvas = runpilot.BrailleCanvas(1, 1)
        canvas.line(0, 3, 1, 0, (0, False))  # a rising diagonal through one cell: dots 7, 3, 5, 4
        self.assertEqual(canvas.row_text(0, runpilot.PlotStyle(), {}), "⡜")
        canvas = runpilot.BrailleCanvas(3, 2)
        canvas.line(0, 7, 5, 7, (0, False))  # along the bottom row of dots
        canvas.line(0, 0, 0, 7, (0, False))  # and up the first column
        style = runpilot.PlotStyle()
        self.assertEqual([canvas.row_text(r, style, {}) for r in range(2)], ["⡇  ", "⣇⣀⣀"])
        canvas = runpilot.BrailleCanvas(2, 1)
        for x in range(4):
            canvas.dot(x, x, (0, False))
        self.assertEqual(canvas.row_text(0, style, {}), "⠑⢄")

    def test_ascii_canvas_draws_each_runs_marker(self):
        canvas = runpilot.BrailleCanvas(4, 1, braille=False)
        canvas.line(0, 0, 1, 0, (0, False))
        canvas.line(2, 0, 3, 0, (1, False))
        self.assertEqual(canvas.row_text(0, runpilot.PlotStyle(braille=False), {}), "**oo")

    def test_a_flat_series_is_one_row_of_the_top_dots(self):
        curve = runpilot.Curve(0, "flat", "20261120-100000-000001", [(0.0, 1.0), (100.0, 1.0)], last=1.0,
                               best=1.0, best_x=0.0, low=1.0, count=2)
        lines = runpilot.chart_lines(runpilot.Chart("acc", [curve]), 30, 8, runpilot.PlotStyle())
        self.assertEqual(lines[0], "acc")
        plot = [line[3:] for line in lines[1:5]]
        self.assertEqual([line[:3] for line in lines[1:5]], ["2 ┤", "  │", "  │", "0 ┤"])  # room for 2 ticks
        self.assertEqual(plot[2], "⠉" * 27)  # 1.0 on an axis 0..2: dot row 8 of 16, the top dots of row 3
        self.assertEqual([p.strip() for p in (plot[0], plot[1], plot[3])], ["", "", ""])
        self.assertTrue(lines[5].startswith("  └"), lines[5])
        self.assertEqual(lines[-1], "* flat 000001  last 1  best 1")

    def test_markers_tell_runs_apart_without_colour(self):
        curves = [runpilot.Curve(i, f"run{i}", f"20261120-10000{i}-00000{i}", [(0.0, i), (50.0, i + 1.0)],
                                 last=i + 1.0, best=i + 1.0, best_x=50.0, low=float(i), count=2) for i in range(3)]
        lines = runpilot.chart_lines(runpilot.Chart("acc", curves), 60, 20, runpilot.PlotStyle())
        plot = "\n".join(lines[1:-5])
        for i, marker in enumerate("*o+"):
            self.assertIn(marker, plot, f"run {i}'s marker {marker!r} is on its curve")
            self.assertTrue(lines[-3 + i].startswith(f"{marker} run{i} "), lines[-3 + i])
        coloured = runpilot.chart_lines(runpilot.Chart("acc", curves), 60, 20, runpilot.PlotStyle(colour=True))
        self.assertNotIn("*", "\n".join(visible(line) for line in coloured[1:-5]))  # colours instead
        for i, colour in enumerate(runpilot.PLOT_COLOURS[:3]):
            self.assertIn(f"\x1b[0;{colour}m", "\n".join(coloured))


class Ticks(unittest.TestCase):
    def test_round_ticks_inside_a_range(self):
        for lo, hi, count, want in ((0, 1, 6, [0, 0.2, 0.4, 0.6, 0.8, 1.0]), (0, 100, 5, [0, 25, 50, 75, 100]),
                                    (3, 997, 10, [100, 200, 300, 400, 500, 600, 700, 800, 900]),
                                    (1, 300, 4, [100, 200, 300]), (-1, 1, 5, [-1, -0.5, 0, 0.5, 1])):
            with self.subTest(lo=lo, hi=hi, count=count):
                self.assertEqual(runpilot.nice_ticks(lo, hi, count)[0], want)

    def test_an_extended_axis_starts_and_ends_on_a_tick(self):
        ticks, lo, hi, step = runpilot.nice_ticks(0.013, 0.987, 6, extend=True)
        self.assertEqual((ticks, lo, hi, step), ([0, 0.2, 0.4, 0.6, 0.8, 1.0], 0, 1.0, 0.2))
        ticks, lo, hi, _ = runpilot.nice_ticks(0.06, 2.1, 6, extend=True)
        self.assertEqual(ticks, [0, 0.5, 1.0, 1.5, 2.0, 2.5])
        self.assertEqual(runpilot.nice_ticks(5.0, 5.0, 3, extend=True)[0], [4.5, 5.0, 5.5])  # flat: ±10 %

    def test_labels_have_the_digits_the_step_needs(self):
        for value, step, text in ((0, 0.25, "0"), (0.25, 0.25, "0.25"), (1.0, 0.5, "1.0"), (12, 2, "12"),
                                  (1500, 500, "1500"), (12_500, 2500, "12.5k"), (15_000, 5000, "15k"),
                                  (250_000, 50_000, "250k"), (2_000_000, 1_000_000, "2M"),
                                  (1e-7, 1e-8, "1.0e-07"), (-0.5, 0.5, "-0.5")):
            with self.subTest(value=value, step=step):
                self.assertEqual(runpilot.fmt_tick(value, step), text)

    def test_log_ticks_are_powers_of_ten(self):
        self.assertEqual(runpilot.log_ticks(0.001, 1, 6), ([0.001, 0.01, 0.1, 1.0], 0.001, 1.0))
        self.assertEqual(runpilot.log_ticks(2, 8, 6)[0], [1.0, 2.0, 5.0, 10.0])
        self.assertEqual(runpilot.log_ticks(1e-6, 1e6, 4)[0], [1e-6, 1e-2, 1e2, 1e6])

    def test_x_labels_never_touch(self):
        for columns in (8, 17, 40, 120):
            with self.subTest(columns=columns):
                labels = runpilot.x_tick_labels(0, 1_000_000, columns, lambda t: int(t / 1_000_000 * (columns - 1)))
                self.assertTrue(all(a[0] + len(a[1]) < b[0] for a, b in zip(labels, labels[1:])), labels)
                self.assertTrue(all(0 <= start and start + len(text) <= columns and start <= col < start + len(text)
                                    for start, text, col in labels), labels)


class Decimation(unittest.TestCase):
    def test_the_digest_keeps_a_spike_among_a_million_samples(self):
        rnd = random.Random(7)
        digest = runpilot.SeriesDigest()
        spike, dip = 612_345, 87_654
        for start in range(0, 1_000_000, 20_000):
            ys = array("d", (rnd.random() for _ in range(20_000)))
            for at, value in ((spike, 50.0), (dip, -50.0)):
                if start <= at < start + 20_000:
                    ys[at - start] = value
            digest.add(ys, lambda i, start=start: float(start + i))
        points = digest.points()
        self.assertLessEqual(len(points), 2 * runpilot.PLOT_BUCKETS + 2)
        self.assertIn((float(spike), 50.0), points)
        self.assertIn((float(dip), -50.0), points)
        self.assertEqual((points[0][0], points[-1][0]), (0.0, 999_999.0))
        self.assertEqual([p[0] for p in points], sorted(p[0] for p in points))  # arrival order
        self.assertEqual((digest.count, digest.low, digest.high), (1_000_000, (dip, -50.0), (spike, 50.0)))
        drawn = runpilot.decimate(points, 60, 0, 999_999)
        self.assertLessEqual(len(drawn), 2 * 60 + 2)
        self.assertIn((float(spike), 50.0), drawn)
        self.assertIn((float(dip), -50.0), drawn)

    def test_blocks_of_any_size_give_the_same_extremes(self):
        rnd = random.Random(3)
        for trial in range(50):
            n = rnd.randint(1, 5000)
            ys = [rnd.gauss(0, 1) for _ in range(n)]
            digest, at = runpilot.SeriesDigest(capacity=rnd.choice((2, 8, 64))), 0
            while at < n:
                size = rnd.randint(1, 700)
                digest.add(array("d", ys[at:at + size]), lambda i, at=at: float(at + i))
                at += size
            points = digest.points()
            with self.subTest(trial=trial):
                self.assertIn((float(ys.index(max(ys))), max(ys)), points)
                self.assertIn((float(ys.index(min(ys))), min(ys)), points)
                self.assertEqual((points[0], points[-1]), ((0.0, ys[0]), (n - 1.0, ys[-1])))
                self.assertLessEqual(len(digest.buckets), digest.capacity)

    def test_decimate_keeps_each_columns_extremes_in_order(self):
        points = [(float(x), float((x * 37) % 11)) for x in range(1000)]
        points[500] = (500.0, 99.0)
        kept = runpilot.decimate(points, 10, 0, 999)
        self.assertIn((500.0, 99.0), kept)
        self.assertEqual((kept[0], kept[-1]), (points[0], points[-1]))
        self.assertEqual(kept, sorted(kept))
        for column in range(10):
            inside = [p for p in points if int(p[0] / 999 * 9 + 0.5) == column]
            self.assertIn(max(inside, key=lambda p: p[1]), kept)
            self.assertIn(min(inside, key=lambda p: p[1]), kept)


class Smoothing(unittest.TestCase):
    def test_tensorboards_debiased_average(self):
        values, _ = runpilot.ema([1.0, 0.0, 0.0], 0.5)
        self.assertEqual(values[0], 1.0)  # debiased: the first value is itself
        self.assertAlmostEqual(values[1], 0.25 / 0.75)
        self.assertAlmostEqual(values[2], 0.125 / 0.875)
        self.assertEqual(runpilot.ema([3.0, 1.0, 2.0], 0.0)[0], [3.0, 1.0, 2.0])

    def test_block_by_block_equals_at_once(self):
        rnd = random.Random(1)
        ys = [rnd.random() for _ in range(1000)]
        whole, _ = runpilot.ema(ys, 0.9)
        first, state = runpilot.ema(ys[:333], 0.9)
        rest, _ = runpilot.ema(ys[333:], 0.9, state)
        self.assertEqual(whole, first + rest)
        self.assertLess(max(whole[500:]) - min(whole[500:]), max(ys) - min(ys))


class StreamingReader(PlotHome):
    def metrics_file(self, samples: list[dict], close: bool = True) -> Path:
        path = self.tmp / f"metrics-{len(samples)}.json"
        log = runpilot.MetricLog(path)
        for start in range(0, len(samples), 997):  # several writes, as a job's reads arrive
            log.add_lines([("METRIC " + " ".join(f"{k}={v}" for k, v in s.items())).encode()
                           for s in samples[start:start + 997]])
        if close:
            log.close()
        else:
            os.close(log.fd)
        return path

    def assertSeriesEqual(self, got: runpilot.MetricSeries, values: list[tuple[float, float]]) -> None:
        digest = got.raw
        self.assertEqual(digest.count, len(values))
        self.assertEqual((digest.first, digest.last), (values[0], values[-1]))
        self.assertEqual(digest.low[1], min(v for _, v in values))
        self.assertEqual(digest.high[1], max(v for _, v in values))

    def test_time_puts_each_sample_where_it_arrived(self):
        path, times = self.tmp / "metrics.json", self.tmp / "metrics.times"
        log = runpilot.MetricLog(path, times)
        log.add_lines([b"METRIC step=1 loss=3 acc=0.1", b"METRIC step=2 loss=2"])
        time.sleep(0.6)
        log.add_lines([b"METRIC step=3 loss=1 acc=0.3"])
        log.close()
        counts = [int(line.split()[0]) for line in times.read_text().splitlines()]
        self.assertEqual(counts, [2, 3])
        at = runpilot.read_sample_times(times)
        got = runpilot.read_metric_series(path, None, x_time=at)
        loss = got["loss"].raw.points()
        self.assertEqual([y for _, y in loss], [3.0, 2.0, 1.0])
        self.assertEqual(loss[0][0], loss[1][0])  # arrived together
        self.assertAlmostEqual(loss[2][0] - loss[0][0], 0.6 / 60, delta=0.3 / 60)
        acc = got["acc"].raw.points()  # a metric only some samples have keeps its samples' times
        self.assertEqual([(x, y) for x, y in acc], [(loss[0][0], 0.1), (loss[2][0], 0.3)])
        self.assertIsNone(runpilot.read_sample_times(self.tmp / "none.times"))

    def test_the_same_numbers_as_read_metrics(self):
        rnd = random.Random(2)
        samples = []
        for step in range(1, 30_001):
            sample = {"step": step, "loss": round(rnd.random(), 6)}
            if step % 100 == 0:
                sample["val_loss"] = round(rnd.random(), 4)
            if step % 777 == 0:
                sample["note"] = "text,with}comma"
            samples.append(sample)
        samples[1234]["loss"] = "nan"
        samples[2345]["loss"] = "inf"
        samples[3456]["loss"] = "oops"
        path = self.metrics_file(samples)
        stored = runpilot.read_metrics(path)
        got = runpilot.read_metric_series(path, None)
        self.assertEqual(sorted(got), ["loss", "val_loss"])  # note is text only: no numeric series
        for key in ("loss", "val_loss"):
            want = [(float(s["step"]), float(s[key])) for s in stored
                    if isinstance(s.get(key), (int, float)) and abs(s[key]) != float("inf") and s[key] == s[key]]
            with self.subTest(key=key):
                self.assertSeriesEqual(got[key], want)
        self.assertEqual(got["loss"].raw.count, 30_000 - 3)
        self.assertEqual(runpilot.read_metric_series(path, ["val_loss"]).keys(), {"val_loss"})

    def test_a_file_cut_short_by_a_crash(self):
        path = self.metrics_file(series(5000), close=False)
        data = path.read_bytes()
        path.write_bytes(data[:-7])  # the last sample is cut in the middle
        got = runpilot.read_metric_series(path, ["loss", "acc"])
        self.assertEqual(got["loss"].raw.count, 4999)
        self.assertEqual(len(runpilot.read_metrics(path)), 4999)
        path.write_bytes(data)  # open (no closing bracket), last line without a newline: all of it
        self.assertEqual(runpilot.read_metric_series(path, ["loss"])["loss"].raw.count, 5000)

    def test_another_layout_is_read_line_by_line(self):
        path = self.tmp / "pretty.json"
        path.write_text('[\n{"loss": 0.5, "step": 3},\n{"acc": 1, "loss": 0.25, "step": 4}\n]\n')  # step not first
        got = runpilot.read_metric_series(path, None)
        self.assertEqual((got["loss"].raw.first, got["loss"].raw.last), ((3.0, 0.5), (4.0, 0.25)))
        self.assertEqual(got["acc"].raw.count, 1)

    def test_memory_stays_flat(self):
        peaks = {}
        for n in (20_000, 100_000):
            path = self.metrics_file(series(n))
            tracemalloc.start()
            try:
                got = runpilot.read_metric_series(path, ["loss", "acc"])
                peaks[n] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertEqual(got["acc"].raw.count, n)
        self.assertGreater(path.stat().st_size, 5_000_000)
        self.assertLess(peaks[100_000], 4_000_000, "the reader holds a block of the file, never all of it")
        self.assertLess(peaks[100_000], peaks[20_000] * 1.3, peaks)


# ==== the command in the terminal ==============================================

class TerminalCharts(PlotHome):
    def setUp(self) -> None:
        super().setUp()
        hostile = "evil\x1b[31m\nname<script>" + "長い名前" * 20
        self.a = self.add_run("baseline", series(500, 2.0, 0.2), metric_names=["loss", "acc"])
        self.b = self.add_run(hostile, series(300, 1.5, 0.4), metric_names=["loss", "acc"])

    def test_no_line_wider_than_the_width(self):
        for width in (40, 80, 200):
            for flags in ([], ["--ascii"], ["--smooth", "0.8"], ["--log"]):
                for colour in (True, False):
                    with self.subTest(width=width, flags=flags, colour=colour):
                        args = ["plot", self.a.id, self.b.id, "--metric", "loss", *flags]
                        if colour:
                            code, out, err = self.tty_cli(*args, env={"COLUMNS": str(width)})
                        else:
                            with mock.patch.dict(os.environ, {"COLUMNS": str(width)}):
                                code, out, err = self.cli(*args)
                        self.assertEqual(code, 0, err)
                        lines = out.splitlines()
                        self.assertGreater(len(lines), 10)
                        widths = [runpilot.text_width(visible(line)) for line in lines]
                        self.assertLessEqual(max(widths), width, [l for l in lines if len(visible(l)) > width])
                        self.assertGreaterEqual(max(widths), width - 4)  # and the chart uses the width

    def test_no_escape_codes_without_colour(self):
        for env, flags in (({"NO_COLOR": "1"}, []), ({}, ["--no-color"])):
            with self.subTest(env=env, flags=flags):
                code, out, err = self.tty_cli("plot", self.a.id, self.b.id, *flags, env=env)
                self.assertEqual(code, 0, err)
                self.assertNotIn("\x1b", out)
                self.assertIn("* baseline", out)  # the legend tells the runs apart by marker
                self.assertIn("o evil\\x1b[31m\\nname<script>", out)
        code, out, _ = self.cli("plot", self.a.id, self.b.id)  # not a terminal
        self.assertNotIn("\x1b", out)
        code, out, _ = self.tty_cli("plot", self.a.id, self.b.id)
        self.assertIn("\x1b[0;36m", out)  # a colour terminal gets colours

    def test_hostile_names_are_shown_escaped(self):
        for run, ellipsis in ((self.cli, "~"), (self.tty_cli, "…")):  # ASCII, then a UTF-8 terminal
            code, out, err = run("plot", self.b.id, "--metric", "acc", "--no-color", "--width", "80")
            self.assertEqual(code, 0, err)
            legend = out.splitlines()[-1]
            self.assertEqual(legend, f"* evil\\x1b[31m\\nname{ellipsis}名前長い名前長い名前長い名前長い名前"
                                     f" {self.b.id[-6:]}  last 1  best 1")  # cut in the middle, the end kept
            self.assertIn(runpilot.text_width(legend), (79, 80))  # 長 takes two columns: one may stay free
            self.assertNotIn("\x1b", out)

    def test_default_size_and_metrics(self):
        with mock.patch.dict(os.environ, {"COLUMNS": "", "LINES": ""}):
            code, out, err = self.cli("plot", self.a.id)
        self.assertEqual(code, 0, err)
        charts = out.split("\n\n")
        self.assertEqual([c.splitlines()[0] for c in charts], ["loss", "acc"])  # the configs' metrics: list
        self.assertEqual([len(c.splitlines()) for c in charts], [24, 24])      # 80 x 24 per chart
        self.assertEqual(max(len(line) for line in out.splitlines()), 80)
        self.assertIn("* baseline " + self.a.id[-6:] + "  last 0.2  best 0.2", out)
        self.assertIn("last 1  best 1", out)
        with mock.patch.dict(os.environ, {"COLUMNS": "50", "LINES": "12"}):
            code, out, err = self.cli("plot", self.a.id, "--metric", "acc")
        self.assertEqual([len(out.splitlines()), max(len(line) for line in out.splitlines())], [12, 50])
        code, out, err = self.cli("plot", self.a.id, "--width", "44", "--height", "10", "--metric", "acc")
        self.assertEqual([len(out.splitlines()), max(len(line) for line in out.splitlines())], [10, 44])

    def test_every_numeric_metric_without_a_metrics_list(self):
        run = self.add_run("free", [{"step": 1, "b": 1, "a": 2, "tag": "x"}, {"step": 2, "b": 3, "a": 1}])
        code, out, err = self.cli("plot", run.id)
        self.assertEqual(code, 0, err)
        self.assertEqual([c.splitlines()[0] for c in out.split("\n\n")], ["a", "b"])
        running = self.add_run("live", [{"step": 1, "z": 1.0}], status="running")  # no last_metrics yet
        code, out, err = self.cli("plot", running.id)
        self.assertEqual((code, out.splitlines()[0]), (0, "z"), err)
        self.assertIn("(running)", out)
        starting = self.add_run("starting", [], status="running")  # what --follow sees first
        self.assertEqual(self.cli("plot", starting.id), (0, "no numeric samples yet\n", ""))

    def test_ids_prefixes_latest_and_minus_n(self):
        code, out, err = self.cli("plot", "latest", "-2", self.a.id[:17], "--metric", "acc")
        self.assertEqual(code, 0, err)
        legend = [line for line in out.splitlines() if " last " in line]
        self.assertEqual([line.split()[0] for line in legend], ["*", "o"])  # the same run given twice: once
        self.assertIn(self.b.id[-6:], legend[0])
        self.assertIn(self.a.id[-6:], legend[1])

    def test_log_axis(self):
        code, out, err = self.cli("plot", self.a.id, "--metric", "loss", "--log")
        self.assertEqual(code, 0, err)
        self.assertIn("loss  (log scale)", out)
        self.assertRegex(out, r"(?m)^ *1 \+")
        self.assertRegex(out, r"(?m)^ *0\.1 \+")
        self.assertRegex(self.tty_cli("plot", self.a.id, "--metric", "loss", "--log")[1], r"(?m)^ *10 ┤")
        self.assertCleanError(self.cli("plot", self.a.id, "--metric", "acc", "--log"), 2,
                              "--log: 'acc' of run", "goes down to 0", "without --log")
        negative = self.add_run("neg", [{"step": 1, "loss": -1.5}, {"step": 2, "loss": 3}])
        self.assertCleanError(self.cli("plot", negative.id, "--log"), 2, "goes down to -1.5")

    def test_refusals_are_one_line(self):
        self.assertCleanError(self.cli("plot", self.a.id, "--smooth", "1"), 2, "--smooth 1", "below 1")
        self.assertCleanError(self.cli("plot", self.a.id, "--smooth", "-0.1"), 2, "--smooth -0.1")
        self.assertCleanError(self.cli("plot", self.a.id, "--x", "time"), 2, "--x time",
                              "has no metrics.times", "plot it by step")
        self.assertCleanError(self.cli("plot", self.a.id, "--width", "12"), 2, "too small", "--width 20")
        self.assertCleanError(self.cli("plot", self.a.id, "--metric", "los"), 2,  # a usage mistake
                              "no numeric samples of 'los'", "the metrics with numbers there: acc, loss")
        empty = self.add_run("quiet", [])
        self.assertCleanError(self.cli("plot", empty.id), 1, f"no metrics in run(s) {empty.id}", "METRIC step=1")
        nan = self.add_run("nan", [{"step": 1, "loss": "nan"}, {"step": 2, "loss": "inf"}])
        self.assertCleanError(self.cli("plot", nan.id), 1, "no numeric samples that a chart can place",
                              "values beyond ±1e300 are left out")
        self.assertCleanError(self.cli("plot", "19990101"), 2, "no run matches '19990101'")
        self.assertEqual(self.cli("plot")[0], 2)
        for argv, words in ((("--html", ""), "--html needs a file path"), (("--width", "0"), "from 1 to 1000"),
                            (("--height", "100000"), "from 1 to 1000"), (("--sweep", "sw-20261120-100000-abcdef"),
                                                                         "give runs or --sweep ID, not both")):
            with self.subTest(argv=argv):
                self.assertCleanError(self.cli("plot", self.a.id, *argv), 2, words)

    def test_extreme_but_accepted_values_never_crash(self):
        # each was a traceback: an axis around ±1e308 overflowed, log10 of a subnormal, a 400-digit step
        huge = self.add_run("huge", [{"step": 1, "loss": 1e308}, {"step": 2, "loss": -1e308}, {"step": 3, "loss": 2}])
        code, out, err = self.cli("plot", huge.id, "--width", "40", "--height", "8")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("last 2  best 2", out)  # the huge values are left out, as NaN is
        tiny = self.add_run("tiny", [{"step": 1, "loss": 5e-324}, {"step": 2, "loss": 1}])
        self.assertCleanError(self.cli("plot", tiny.id, "--log"), 2, "goes down to 4.94066e-324")
        far = self.add_run("far", [{"step": 10 ** 400, "loss": 1}, {"step": 2, "loss": 2}])
        self.assertEqual(self.cli("plot", far.id, "--width", "40", "--height", "8")[0], 0)
        self.assertEqual(self.cli("plot", far.id, "--html", str(self.tmp / "far.html"))[0], 0)
        (Path(huge.path) / "metrics.times").write_text("1 0.1\n2 inf\n3 nan\n")
        self.assertEqual(self.cli("plot", huge.id, "--x", "time", "--width", "40", "--height", "8")[0], 0)

    def test_a_queued_run_is_called_queued_and_has_no_time_yet(self):
        queued = self.add_run("later", [], status="queued")
        for extra in ((), ("--x", "time")):
            with self.subTest(extra=extra):
                if extra:
                    (Path(self.a.path) / "metrics.times").write_text("2 0.5\n")
                code, out, err = self.cli("plot", self.a.id, queued.id, "--metric", "loss", *extra)
                self.assertEqual((code, err), (0, ""))
                self.assertIn(f"later {queued.id[-6:]} (queued)  no samples", out)

    def test_a_metric_whose_last_value_was_text_is_still_drawn(self):
        run = self.add_run("diverged", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": "diverged"}])
        out = self.cli("plot", run.id, "--width", "40", "--height", "8")[1]
        self.assertEqual(out.splitlines()[0], "loss")

    def test_html_never_replaces_what_is_not_a_regular_file(self):
        # replacing the path with the page turned a device (as root: /dev/null) or a pipe into a file
        fifo = self.tmp / "pipe"
        os.mkfifo(fifo)
        self.assertCleanError(self.cli("plot", self.a.id, "--html", str(fifo)), 2,
                              f"--html {fifo} is not a regular file")
        self.assertTrue(stat.S_ISFIFO(os.stat(fifo).st_mode))
        self.assertCleanError(self.cli("plot", self.a.id, "--html", str(self.tmp)), 2, "is not a regular file")
        target, link = self.tmp / "page.html", self.tmp / "link.html"
        target.write_text("old")
        link.symlink_to(target)
        self.assertEqual(self.cli("plot", self.a.id, "--html", str(link))[0], 0)
        self.assertTrue(link.is_symlink())  # the page went where the link points
        self.assertIn("<svg", target.read_text())

    def test_output_that_cannot_encode_a_name_is_escaped(self):
        run = self.add_run("café", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
        for command in (("plot", run.id, "--width", "40", "--height", "8"), ("list",), ("show", run.id)):
            with self.subTest(command=command[0]):
                done = self.process(*command, env={"PYTHONIOENCODING": "ascii"})
                self.assertEqual((done.returncode, done.stderr), (0, b""))
                self.assertIn(b"caf\\xe9", done.stdout)

    def test_smoothing_draws_the_raw_series_faint(self):
        noisy = self.add_run("noisy", [{"step": i, "loss": 1 + (i % 2)} for i in range(200)])
        code, out, err = self.tty_cli("plot", noisy.id, "--smooth", "0.9")
        self.assertEqual(code, 0, err)
        self.assertIn("loss  (smoothed 0.9)", out)
        self.assertIn("\x1b[0;2;36m", out)  # faint raw
        self.assertIn("\x1b[0;36m", out)    # the average
        plain = self.tty_cli("plot", noisy.id, "--smooth", "0.9", env={"NO_COLOR": "1"})[1]
        raw = self.tty_cli("plot", noisy.id, env={"NO_COLOR": "1"})[1]
        smooth_rows = [i for i, line in enumerate(plain.splitlines()) if BRAILLE.search(line)]
        raw_rows = [i for i, line in enumerate(raw.splitlines()) if BRAILLE.search(line)]
        self.assertEqual(raw_rows[0], 1)   # the raw series swings from 2 (the top row) ...
        self.assertGreater(smooth_rows[0], 1)  # ... its average stays below 2 after the first steps
        self.assertLess(len(smooth_rows), len(raw_rows))

    def test_help_and_compare_hint(self):
        code, out, _ = self.cli("plot", "--help")
        self.assertEqual(code, 0)
        self.assertIn("runpilot plot", out)
        self.assertIn("example:", out)
        self.assertEqual(self.cli("compare", self.a.id, self.b.id)[2], "")  # not a terminal: no hint
        err = Tty()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            self.assertEqual(runpilot.main(["compare", self.a.id, self.b.id]), 0)
        short = [runpilot.short_id(r.id) for r in (self.a, self.b)]
        self.assertEqual(err.getvalue(), f"runpilot: curves: runpilot plot {short[0]} {short[1]}\n")


# ==== the HTML page ===========================================================

class Tags(HTMLParser):
    """Every start tag with its attributes, and the text, as html.parser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def curves_per_chart(page: str) -> list[list[str]]:
    """The data-run of each curve polyline, per SVG chart, parsed as XML."""
    root = ET.fromstring(page.split("\n", 1)[1])  # after <!DOCTYPE html>
    return [[p.get("data-run") for p in svg.iter(f"{SVG}polyline") if p.get("class") == "curve"]
            for svg in root.iter(f"{SVG}svg")]


class HtmlPage(PlotHome):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.add_run("baseline", series(400, 2.0, 0.2), metric_names=["loss", "acc"],
                              config="name: baseline\nengine: local\nentrypoint: [python3, t.py]\nenv:\n  LR: 0.1\n")
        self.b = self.add_run('x"><script>alert(1)</script>\x1b', series(100, 1.0, 0.5), metric_names=["loss", "acc"],
                              config="name: b\nengine: local\nentrypoint: [python3, t.py]\nenv:\n  LR: '<b>0.3</b>'\n")

    def page(self, *flags: str) -> str:
        out = self.tmp / "page.html"
        code, stdout, err = self.cli("plot", self.a.id, self.b.id, "--html", out, *flags)
        self.assertEqual(code, 0, err)
        self.assertEqual(stdout, "")
        self.assertRegex(err, rf"^runpilot: wrote {re.escape(str(out))} \(2 chart\(s\) of 2 run\(s\), \d+ KiB\)\n$")
        return out.read_text(encoding="utf-8")

    def test_well_formed_with_one_curve_per_run_per_metric(self):
        page = self.page()
        self.assertTrue(page.startswith("<!DOCTYPE html>\n"))
        self.assertEqual(curves_per_chart(page), [[self.a.id, self.b.id]] * 2)
        parser = Tags()
        parser.feed(page)
        parser.close()
        names = [t for t, _ in parser.tags]
        self.assertEqual(names.count("svg"), 2)
        self.assertEqual(names.count("table"), 1)
        self.assertGreater(sum(1 for t, a in parser.tags if t == "circle" and a.get("class") == "pt"), 20)
        self.assertIn("title", names[names.index("svg"):])  # tooltips

    def test_nothing_is_fetched_and_run_strings_are_escaped(self):
        page = self.page()
        parser = Tags()
        parser.feed(page)
        self.assertNotIn("script", [t for t, _ in parser.tags])
        self.assertFalse([a for _, attrs in parser.tags for k, a in attrs.items()
                          if k in ("src", "href") or (a and "url(" in a)])
        self.assertEqual(re.findall(r"https?://[^\"' ]+", page), ["http://www.w3.org/2000/svg"] * 2)
        self.assertNotIn("\x1b", page)
        self.assertIn("x&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\\x1b", page)
        self.assertIn("&lt;b&gt;0.3&lt;/b&gt;", page)  # a config value that differs, escaped

    def test_the_table_of_runs(self):
        page = self.page()
        table = page[page.index("<table>"):page.index("</table>")]
        self.assertIn(">env.LR<", table)
        self.assertNotIn(">engine<", table)  # the same for both: not shown
        self.assertIn(">succeeded<", table)
        self.assertIn(">1m30s<", table)
        self.assertEqual(table.count('class="num best"'), 6)  # loss last/best: a; acc last/best: a and b tie
        self.assertIn("★ 0.2</td>", table)
        self.assertIn('<th colspan="2" class="grp">loss</th>', table)

    def test_smoothing_adds_a_faint_raw_line(self):
        page = self.page("--smooth", "0.6")
        self.assertEqual(page.count('class="raw"'), 4)
        self.assertEqual(curves_per_chart(page), [[self.a.id, self.b.id]] * 2)
        self.assertIn("smoothed 0.6", page)

    def test_the_page_does_not_grow_with_the_samples(self):
        sizes = {}
        for n in (4_000, 40_000):
            runs = [self.add_run(f"run{i}", [{"step": s, "loss": 1 + (s * 7919 % 1000) / 1000 + i} for s in range(n)])
                    for i in range(2)]
            out = self.tmp / f"page-{n}.html"
            code, _, err = self.cli("plot", *[r.id for r in runs], "--html", out)
            self.assertEqual(code, 0, err)
            sizes[n] = out.stat().st_size
            points = [len(p.get("points").split()) for p in ET.fromstring(out.read_text().split("\n", 1)[1])
                      .iter(f"{SVG}polyline")]
            self.assertEqual(len(points), 2)
            self.assertLessEqual(max(points), 2 * runpilot.SVG_WIDTH + 2)  # two per unit of width at most
        self.assertLess(sizes[40_000], sizes[4_000] * 1.2, sizes)  # bench.py: 10 runs x 100,000 steps < 1 MB

    def test_an_unwritable_path_is_one_line(self):
        self.assertCleanError(self.cli("plot", self.a.id, "--html", self.tmp / "no" / "such" / "p.html"), 1,
                                "cannot write", "choose another --html path")


# ==== end to end on real runs ===================================================

class RealRuns(PlotHome):
    def make_runs(self) -> list[str]:
        config = self.local_config(CURVES_JOB, name="curves", extra="metrics: [loss, acc]\n", LR=0.5)
        for lr in ("0.5", "0.2"):
            code, _, err = self.cli("run", config, "--set", f"env.LR={lr}")
            self.assertEqual(code, 0, err)
        return [row["id"] for row in self.db_rows()]

    def test_plot_two_real_runs_as_a_copied_file(self):
        ids = self.make_runs()
        done = self.process("plot", "-1", "-2", env={"COLUMNS": "72", "NO_COLOR": ""})
        self.assertEqual(done.returncode, 0, done.stderr)
        out = done.stdout.decode()
        self.assertEqual(done.stderr, b"")
        self.assertNotIn("\x1b", out)
        charts = out.rstrip("\n").split("\n\n")
        self.assertEqual([c.splitlines()[0] for c in charts], ["loss", "acc"])
        for chart in charts:
            lines = chart.splitlines()
            self.assertEqual(len(lines), 24)
            self.assertLessEqual(max(runpilot.text_width(line) for line in lines), 72)
            self.assertTrue(BRAILLE.search(chart))
        last = {run: self.metrics(self.home / "runs" / run)[-1] for run in ids}
        self.assertIn(f"* curves {ids[1][-6:]}  last {runpilot.fmt_value(last[ids[1]]['loss'])}", charts[0])
        self.assertIn(f"o curves {ids[0][-6:]}  last {runpilot.fmt_value(last[ids[0]]['loss'])}", charts[0])
        self.assertRegex(charts[0], r"\n +10 +20 .*60\n")

    def test_x_time_on_a_real_run(self):
        job = ("import time\nfor i in range(4):\n    print(f'METRIC step={i * 1000} loss={4 - i}', flush=True)\n"
               "    time.sleep(0.4)\n")
        self.cli("run", self.local_config(job, name="timed", extra="metrics: [loss]\n"))
        code, out, err = self.cli("plot", "latest", "--x", "time", "--width", "60", "--height", "10")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[0], "loss  (x: minutes since the start)")
        self.assertNotRegex(out, r"\b1000\b|\b3000\b")  # not the steps
        self.assertRegex(out, r"0\.0[0-9]")  # minutes: the run lasted about 1.6 s

    def test_sparse_metric_and_html_of_real_runs(self):
        ids = self.make_runs()
        code, out, err = self.cli("plot", *ids, "--metric", "val_loss", "--width", "60")
        self.assertEqual(code, 0, err)
        self.assertIn("last 0.", out)
        page = self.tmp / "real.html"
        code, _, err = self.cli("plot", *ids, "--metric", "loss", "--metric", "val_loss", "--html", page)
        self.assertEqual(code, 0, err)
        self.assertEqual(curves_per_chart(page.read_text()), [ids, ids])

    def test_follow_waits_for_the_run_and_redraws_in_place(self):
        config = self.local_config(CURVES_JOB.replace("sys.stdout.flush()", "sys.stdout.flush(); __import__('time')"
                                                      ".sleep(0.05)"), name="slow", LR=0.5, STEPS=40)
        code, out, err = self.cli("run", config, "-d")
        self.assertEqual(code, 0, err)
        run_id = out.strip()
        started = time.monotonic()
        piped = self.process("plot", run_id, "--follow", "--metric", "loss", "--width", "50", timeout=60)
        self.assertEqual(piped.returncode, 0, piped.stderr)
        self.assertEqual(self.store.get(run_id).status, "succeeded")  # it waited for the end
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertIn("last 0.3207", piped.stdout.decode())  # the last sample: 2 exp(-2) + 0.05
        self.assertNotIn(b"\x1b", piped.stdout)

        code, out, err = self.cli("run", config, "-d")
        frames = self.on_a_terminal(["plot", out.strip(), "--follow", "--metric", "loss"], {"NO_COLOR": "1"}, 40)
        self.assertIn("following 1 running run", frames)
        self.assertRegex(frames, r"\x1b\[\d+F")  # the cursor went up to redraw
        # ... over the whole picture: it fits the 24 rows with the cursor's line, so nothing scrolled away
        self.assertLessEqual(max(int(n) for n in re.findall(r"\x1b\[(\d+)F", frames)), 23)
        self.assertNotRegex(frames, r"\x1b\[[0-9;]*m")  # NO_COLOR: cursor moves only, no colour
        lines = [visible(line).rstrip("\r") for line in frames.split("\n")]
        self.assertLessEqual(max(runpilot.text_width(line) for line in lines), 40)
        final = frames[frames.rindex("\x1b[") :]
        self.assertNotIn("following", final)

    def on_a_terminal(self, args: list[str], env: dict, columns: int = 80) -> str:
        """Run runpilot with stdout on a pseudo-terminal of COLUMNS x 24; return everything it wrote there."""
        import fcntl
        import pty
        import termios
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        child = subprocess.Popen([sys.executable, str(RUNPILOT), *args], stdout=slave, stderr=subprocess.PIPE,
                                 env={**os.environ, **env})
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        self.assertEqual(child.wait(timeout=60), 0, child.stderr.read())
        child.stderr.close()
        return b"".join(chunks).decode()


# ==== the page in a real browser =================================================

def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def require_browser(test: unittest.TestCase) -> str:
    browser = find_browser()
    if browser:
        return browser
    reason = f"no browser here ({', '.join(BROWSERS)}): apt-get install chromium"
    if os.environ.get(REQUIRED_BROWSER_VAR) == "1":
        test.fail(f"{reason} (required by {REQUIRED_BROWSER_VAR}=1)")
    test.skipTest(reason)


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """Width, height, bytes per pixel and the raw pixels of an 8-bit RGB or RGBA PNG (what browsers write)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    at, idat, header = 8, [], None
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        at += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}, interlace {interlace}")
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    pixels = bytearray(stride * height)
    previous = bytearray(stride)
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = previous[i], previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        elif kind != 0:
            raise ValueError(f"unknown PNG filter {kind}")
        pixels[row * stride:(row + 1) * stride] = line
        previous = line
    return width, height, bpp, bytes(pixels)


class PngDecoder(unittest.TestCase):
    def test_every_filter_type(self):
        width, height = 5, 5
        rows = [bytes((x * 40 + y * 7) % 256 for x in range(width * 3)) for y in range(height)]
        raw = b"".join(bytes([f]) + self.filtered(f, rows[y], rows[y - 1] if y else bytes(15), 3)
                       for y, f in enumerate(range(5)))
        png = self.png(width, height, 2, raw)
        self.assertEqual(decode_png(png), (5, 5, 3, b"".join(rows)))

    @staticmethod
    def filtered(kind: int, line: bytes, prev: bytes, bpp: int) -> bytes:
        out = bytearray()
        for i, value in enumerate(line):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            out.append((value - (0, a, b, (a + b) >> 1, paeth)[kind]) & 0xFF)
        return bytes(out)

    @staticmethod
    def png(width: int, height: int, colour_type: int, raw: bytes) -> bytes:
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class Browser(PlotHome):
    RUNS = 3

    def setUp(self) -> None:
        super().setUp()
        self.browser = require_browser(self)
        self.records = [self.add_run(f"run{i}", [{"step": s, "loss": 2.0 / (1 + s * (i + 1) / 50),
                                                  "acc": 1 - 1.0 / (1 + s * (i + 1) / 50)} for s in range(300)],
                                     metric_names=["loss", "acc"]) for i in range(self.RUNS)]
        self.page = self.tmp / "page.html"
        code, _, err = self.cli("plot", *[r.id for r in self.records], "--html", self.page)
        self.assertEqual(code, 0, err)

    def chromium(self, *args: str) -> subprocess.CompletedProcess:
        profile = tempfile.mkdtemp(prefix="runpilot-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        argv = [self.browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", *args, self.page.as_uri()]
        done = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-2000:])
        return done

    def test_screenshot_shows_a_colour_per_run(self):
        shot = self.tmp / "shot.png"
        self.chromium(f"--screenshot={shot}", "--window-size=1200,900")
        width, height, bpp, pixels = decode_png(shot.read_bytes())
        self.assertEqual((width, height), (1200, 900))
        counts: dict[tuple, int] = {}
        for i in range(0, len(pixels), bpp * 2):  # every other pixel is plenty
            rgb = tuple(pixels[i:i + 3])
            counts[rgb] = counts.get(rgb, 0) + 1
        background = max(counts, key=counts.get)
        self.assertGreater(sum(counts.values()) - counts[background], len(pixels) // bpp // 2 // 20,
                           "the page is not blank")
        for i in range(self.RUNS):
            want = bytes.fromhex(runpilot.SVG_COLOURS[i][1:])
            near = sum(n for rgb, n in counts.items() if sum(abs(a - b) for a, b in zip(rgb, want)) <= 24)
            with self.subTest(run=i, colour=runpilot.SVG_COLOURS[i]):
                self.assertGreater(near, 150, f"run {i}'s colour is hardly on the screen")

    def test_dom_holds_one_curve_per_run_per_metric(self):
        dom = self.chromium("--dump-dom").stdout.decode()
        parser = Tags()
        parser.feed(dom)
        charts, current = [], None
        for tag, attrs in parser.tags:
            if tag == "svg":
                current = []
                charts.append(current)
            elif tag == "polyline" and attrs.get("class") == "curve":
                current.append(attrs.get("data-run"))
        self.assertEqual(charts, [[r.id for r in self.records]] * 2)


if __name__ == "__main__":
    unittest.main()
