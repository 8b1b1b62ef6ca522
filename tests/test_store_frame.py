"""Issue 22 item 4, the store's walls: the sweep folder's names are spelled only in SweepFolder, the
index's SQL runs only in the store section (section 14; the Slurm refresh's batch too, since it moved
into the Slurm backend), and metrics.json has one streaming reader that reads every file
as the readers it replaced did (their code is kept here as the reference)."""

import ast
import contextlib
import json
import math
import re
import unittest
from pathlib import Path

import runpilot
from tests.common import HomeTestCase

SOURCE = Path(runpilot.__file__).read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def section_lines(number: str) -> range:
    """The lines of section NUMBER (`# ==== 14. ...` up to the next banner)."""
    banners = [(i + 1, line) for i, line in enumerate(SOURCE.splitlines()) if line.startswith("# ==== ")]
    for (start, line), (end, _) in zip(banners, banners[1:] + [(len(SOURCE.splitlines()) + 1, "")]):
        if line.startswith(f"# ==== {number}. "):
            return range(start, end)
    raise AssertionError(f"no section {number}")


def enclosing(node_line: int, kind, name: str) -> bool:
    """Whether line NODE_LINE is inside the top-level class or function NAME."""
    for top in TREE.body:
        if isinstance(top, kind) and top.name == name and top.lineno <= node_line <= top.end_lineno:
            return True
    return False


class TheStoresWalls(unittest.TestCase):
    SWEEP_NAMES = ("sweep.json", "runs.txt", "slurm.sh", "runner.lock", "slurm-%A_%a.out")

    def test_only_sweepfolder_spells_the_sweep_folders_names(self):
        found = []
        for node in ast.walk(TREE):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    any(node.value == n or node.value.endswith("/" + n) for n in self.SWEEP_NAMES):
                found.append((node.lineno, node.value))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                    isinstance(node.right, ast.Constant) and node.right.value == "stop":
                found.append((node.lineno, "/ 'stop'"))
        self.assertTrue(found, "the guard finds the names where SweepFolder spells them")
        outside = [(line, name) for line, name in found if not enclosing(line, ast.ClassDef, "SweepFolder")
                   and not (name == "slurm.sh" and enclosing(line, ast.ClassDef, "RunFolder"))]
        self.assertEqual(outside, [], "a sweep folder's file named outside SweepFolder (runpilot.py:LINE)")

    def test_the_index_is_touched_only_in_the_store_section(self):
        store = section_lines("14")
        private = {"_UPSERT", "_transaction", "_row", "_open", "_catch_up", "_record"}
        found = []
        for node in ast.walk(TREE):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("execute", "executemany", "executescript", "db"):
                found.append((node.lineno, node.func.attr))
            elif isinstance(node, ast.Name) and node.id in private:
                found.append((node.lineno, node.id))
            elif isinstance(node, ast.Attribute) and node.attr in private:
                found.append((node.lineno, node.attr))
        self.assertTrue(any(line in store for line, _ in found), "the guard sees the store's own SQL")
        outside = [(line, what) for line, what in found if line not in store]
        self.assertEqual(outside, [], "SQL or the store's private helpers outside section 14 (runpilot.py:LINE)")

    def test_the_homes_layout_is_known_only_to_the_store(self):
        store = section_lines("14")
        found = [(node.lineno, node.attr) for node in ast.walk(TREE) if isinstance(node, ast.Attribute)
                 and node.attr in ("runs_dir", "sweeps_dir", "pending_dir", "db_path")]
        self.assertTrue(found)
        self.assertEqual([(line, attr) for line, attr in found if line not in store], [],
                         "the home's folders named outside section 14: ask a RunStore method")

    def test_sweep_folder_names_its_files(self):
        folder = runpilot.RunStore(Path("/h")).sweep_folder("sw-20261207-231500-a1b2c3")
        self.assertEqual(folder.path, Path("/h/sweeps/sw-20261207-231500-a1b2c3"))
        self.assertEqual(folder.sweep_id, "sw-20261207-231500-a1b2c3")
        self.assertEqual((folder.plan.name, folder.run_list.name, folder.batch_script.name, folder.stop_requests.name),
                         ("sweep.json", "runs.txt", "slurm.sh", "stop"))
        self.assertTrue(runpilot.SweepFolder.is_run_list(folder.run_list))
        self.assertFalse(runpilot.SweepFolder.is_run_list(folder.plan))


# -- the readers the one reader replaced, as they were (the reference) ------------------------------

def old_iter_metrics(path: Path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            line = raw.decode("utf-8", "replace").strip().rstrip(",").strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


def old_latest_metrics(path: Path, size: int) -> dict:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - size))
        tail = f.read(size)
    latest: dict = {}
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        line = line.rstrip(",").strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                for key, value in json.loads(line).items():
                    latest.setdefault(key, value)
    latest.pop("step", None)
    return latest


def old_metric_summary(samples) -> dict:
    summary: dict = {}
    for sample in samples:
        for key, value in sample.items():
            if key == "step":
                continue
            entry = summary.get(key)
            if entry is None:
                entry = summary[key] = {"count": 0, "first": value, "values": [], "min": None, "max": None}
            entry["count"] += 1
            entry["last"] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                entry["values"].append(value)
                if entry["min"] is None or value < entry["min"]:
                    entry["min"] = value
                if entry["max"] is None or value > entry["max"]:
                    entry["max"] = value
    return summary


def same(a, b) -> bool:
    """Equal as JSON values are, NaN equal to NaN and a float to an equal int not (types count)."""
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def written(samples: list[dict], closed: bool = True) -> bytes:
    """A metrics.json as MetricLog writes it (its own bytes: sample_json)."""
    body = ",\n".join(runpilot.sample_json(s.get("step", i + 1), s) for i, s in enumerate(samples))
    return ("[\n\n" + body + ("\n]\n" if closed else "")).encode()


TRICKY = {
    "empty file": b"",
    "only the opening": b"[\n",
    "empty list": b"[\n]\n",
    "truncated tail after a crash": written([{"step": 1, "a": 1.5}, {"step": 2, "a": 2.5}], False)[:-4],
    "a live run (last sample without its newline)": written([{"step": 1, "a": 1}, {"step": 2, "a": 2}], False),
    "NaN and infinities": written([{"step": 1, "a": math.nan, "b": math.inf}, {"step": 2, "a": -math.inf, "b": 1.0},
                                   {"step": 3, "a": 2.0, "b": math.nan}]),
    "huge ints": written([{"step": 1, "n": 10 ** 400}, {"step": 2, "n": -(10 ** 30)}, {"step": 3, "n": 5},
                          {"step": 10 ** 20, "n": 1e308}]),
    "non-ASCII names and values": written([{"step": 1, "größe": 1.0, "名前": "ß\u2028x"},
                                           {"step": 2, "größe": 0.5, "名前": "y"}]),
    "text, bools and missing metrics": written([{"step": 1, "a": "warmup"}, {"step": 2, "a": 1, "flag": True},
                                                {"step": 3, "b": 2}, {"step": 4, "a": 0.5, "b": "x"}]),
    "pretty-printed by hand": b'[\n  {\n    "step": 1,\n    "a": 1\n  },\n  {"step": 2, "a": 2}\n]\n',
    "two samples on one line": b'[\n{"step": 1, "a": 1}, {"step": 2, "a": 2},\n{"step": 3, "a": 3}\n]\n',
    "an object spread over two lines": b'[\n{"step": 1, "a":\n{"b": 1}},\n{"step": 2, "a": 2}\n]\n',
    "a continuation line": b'[\n{"step": 1, "a":\n1},\n{"step": 2, "a": 2}\n]\n',
    "indented lines": b'[\n  {"step": 1, "a": 1},\n{"step": 2, "a":\n{"x": 1}},\n  {"step": 3, "a": 3}\n]\n',
    "CRLF line ends": b'[\r\n{"step": 1, "a": 1},\r\n{"step": 2, "a": 2}\r\n]\r\n',
    "a bracket glued to a sample": b'[{"step": 1, "a": 1},\n{"step": 2, "a": 2}]\n',
    "invalid UTF-8": b'[\n{"step": 1, "a\xff": 1},\n{"step": 2, "a": "\xfe"}\n]\n',
    "a garbage line and blank lines": b'[\n\n{"step": 1, "a": 1},\nnot json\n\n{"step": 2 "a": 2},\n{"step": 3}\n]\n',
    "trailing commas and spaces": b'[\n{"step": 1, "a": 1},, \n{"step": 2, "a": 2} , \n]\n',
    "not a list at all": b'{"step": 1, "a": 1}\n5\n"x"\n[1, 2]\n{"step": 2}',
    "a line of nested brackets": b"[\n" + b"[\n" * 5000 + b'{"step": 1}\n',
    "unicode space around a sample": '[\n\u00a0{"step": 1, "a": 1}\u2003,\n\x1c{"step": 2}\n]\n'.encode(),
}


WRITTEN = [label for label in TRICKY if label not in (
    "pretty-printed by hand", "two samples on one line", "an object spread over two lines", "a continuation line",
    "indented lines", "CRLF line ends", "a bracket glued to a sample", "invalid UTF-8",
    "a garbage line and blank lines", "trailing commas and spaces", "not a list at all", "a line of nested brackets",
    "unicode space around a sample")]


class OneReader(HomeTestCase):
    def file(self, data: bytes) -> Path:
        path = self.tmp / "metrics.json"
        path.write_bytes(data)
        return path

    def test_the_one_reader_gives_the_old_readers_samples_on_tricky_files(self):
        for label, data in TRICKY.items():
            with self.subTest(label):
                path = self.file(data)
                self.assertTrue(same(runpilot.read_metrics(path), list(old_iter_metrics(path))))
                # list's live values: the last of each metric as the reader reads them (which is what the old
                # tail reader found, but for a hand edit it skipped: `{...} , ` with a space after the comma)
                latest = {k: v for s in old_iter_metrics(path) for k, v in s.items() if k != "step"}
                found = runpilot.latest_metrics(path)
                self.assertTrue(same(dict(sorted(found.items())), dict(sorted(latest.items()))))
                if label in WRITTEN:
                    self.assertTrue(same(runpilot.latest_metrics(path), old_latest_metrics(path, 1 << 16)))
                new, old = runpilot.metric_summary(runpilot.iter_metrics(path)), old_metric_summary(old_iter_metrics(path))
                self.assert_same_summary(new, old)

    def test_a_missing_file_has_no_samples(self):
        self.assertEqual(runpilot.read_metrics(self.tmp / "none.json"), [])
        self.assertEqual(runpilot.metric_names_in(self.tmp / "none.json"), [])

    def test_the_layout_is_read_whole_and_odd_blocks_line_by_line(self):
        # the fast path is the one a MetricLog file takes; a block it cannot vouch for goes line by line
        plain = written([{"step": i, "a": i / 3} for i in range(1, 50)])
        blocks = list(runpilot.metric_blocks(self.file(plain)))
        with unittest.mock.patch.object(runpilot, "_samples_line_by_line", side_effect=AssertionError):
            self.assertEqual(len(runpilot.samples_in_block(blocks[0])), 49)
        self.assertEqual(runpilot.samples_in_block(b'{"a": 1}, {"a": 2}\n'), [])

    def test_many_blocks_with_odd_lines_among_them(self):
        samples = [{"step": i, "loss": i * 0.001, "name": "x" * (i % 7)} for i in range(1, 60_000)]
        data = bytearray(written(samples))
        data[len(data) // 3:len(data) // 3] = b'\n{"step": 0 "broken"},\n'   # a hand edit in the middle
        data[len(data) // 2:len(data) // 2] = b"\nnot a sample\n"
        path = self.file(bytes(data))
        self.assertGreater(len(data), 4 * runpilot.METRICS_BLOCK_BYTES)
        old = list(old_iter_metrics(path))
        self.assertTrue(same(runpilot.read_metrics(path), old))
        self.assertGreater(len(old), 59_000)
        self.assert_same_summary(runpilot.metric_summary(runpilot.iter_metrics(path)), old_metric_summary(old))
        self.assertEqual(runpilot.metric_names_in(path), ["loss", "name"])

    def test_samples_from_an_offset_follow_a_file_being_written(self):
        path = self.file(written([{"step": 1, "a": 1}], False))
        samples, offset = runpilot.read_samples_from(path, 0, 1 << 20)
        self.assertEqual(samples, [{"step": 1, "a": 1}])
        with open(path, "ab") as f:
            f.write(b',\n{"step": 2, "a"')   # the next sample, half written
        samples, again = runpilot.read_samples_from(path, offset, 1 << 20)
        self.assertEqual(samples, [])
        with open(path, "ab") as f:
            f.write(b': 2}')
        samples, end = runpilot.read_samples_from(path, again, 1 << 20)
        self.assertEqual((samples, end), ([{"step": 2, "a": 2}], path.stat().st_size))

    def assert_same_summary(self, new: dict, old: dict) -> None:
        self.assertEqual(list(new), list(old))
        for key in old:
            for field in ("count", "first", "last", "min", "max"):
                self.assertTrue(same(new[key][field], old[key][field]), (key, field, new[key][field], old[key][field]))
            finite = []
            for v in old[key]["values"]:
                with contextlib.suppress(OverflowError):
                    if math.isfinite(v):
                        finite.append(float(v))
            self.assertEqual(list(new[key]["values"]), finite, key)


if __name__ == "__main__":
    unittest.main()
