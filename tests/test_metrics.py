"""The METRIC line protocol: parsing, scanning a byte stream in chunks, metrics.json, and the tee loop."""

import hashlib
import json
import math
import os
import random
import sys
import unittest

import runpilot
from tests.common import HomeTestCase

BIG_400 = "7" * 400
BIG_5000 = "9" * 5000


def _norm(value):
    """NaN != NaN, so spell it as a marker before comparing samples."""
    if isinstance(value, float) and math.isnan(value):
        return "<nan>"
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def reference_samples(stream: bytes) -> tuple[list[dict], int]:
    """What the whole stream holds, parsed at once line by line (the test's own reference).

    A METRIC line is `METRIC` alone or followed by a space or tab (so `METRICS x=1` is plain output).
    """
    samples, malformed = [], 0
    for line in stream.split(b"\n"):
        line = line.rstrip(b"\r")
        if not (line == b"METRIC" or line.startswith((b"METRIC ", b"METRIC\t"))):
            continue
        sample = runpilot.parse_metric_line(line.rstrip(b"\r"))
        if sample is None:
            malformed += 1
            continue
        step = sample.get("step", len(samples) + 1)
        samples.append({"step": step, **{k: v for k, v in sample.items() if k != "step"}})
    return samples, malformed


def scan(chunks, scanner=None) -> list[bytes]:
    scanner = scanner or runpilot.MetricScanner()
    found = []
    for chunk in chunks:
        if chunk:  # os.read never hands the tee an empty chunk before EOF
            found += scanner.feed(chunk)
    return found + scanner.finish()


class ParseMetricLineTest(HomeTestCase):
    def test_table(self):
        ten_thousand = "METRIC " + " ".join(f"k{i}={i}" for i in range(10_000))
        cases = [
            ("ints", "METRIC a=1 b=-3 c=+5 d=0", {"a": 1, "b": -3, "c": 5, "d": 0}),
            ("floats", "METRIC a=0.25 b=1e-3 c=.5 d=-2.5 e=1E5 f=5.", {"a": 0.25, "b": 0.001, "c": 0.5,
                                                                      "d": -2.5, "e": 100000.0, "f": 5.0}),
            ("inf", "METRIC a=inf b=-inf c=Infinity", {"a": math.inf, "b": -math.inf, "c": math.inf}),
            ("negative", "METRIC loss=-0.125", {"loss": -0.125}),
            ("400 digits", f"METRIC big={BIG_400}", {"big": int(BIG_400)}),
            ("strings", "METRIC opt=adam path=/a/b hex=0x10 ver=1.2.3", {"opt": "adam", "path": "/a/b",
                                                                         "hex": "0x10", "ver": "1.2.3"}),
            ("underscore digits stay text", "METRIC n=1_000", {"n": "1_000"}),
            ("value holding =", "METRIC expr=a=b", {"expr": "a=b"}),
            ("key characters", "METRIC train/loss=1 val.acc=2 a-b=3 _x=4",
             {"train/loss": 1, "val.acc": 2, "a-b": 3, "_x": 4}),
            ("step", "METRIC step=7 loss=0.5", {"step": 7, "loss": 0.5}),
            ("tabs", "METRIC\ta=1\tb=2", {"a": 1, "b": 2}),
            ("CRLF stripped", b"METRIC a=1 b=x\r\n", {"a": 1, "b": "x"}),
            ("invalid UTF-8 value", b"METRIC a=1 s=\xff\xfe", {"a": 1, "s": "\ufffd\ufffd"}),
            ("10,000 pairs", ten_thousand, {f"k{i}": i for i in range(10_000)}),
            ("float step", "METRIC step=1.5 a=1", None),
            ("text step", "METRIC step=abc a=1", None),
            ("exponent step", "METRIC step=1e3 a=1", None),
            ("duplicate key", "METRIC a=1 a=2", None),
            ("duplicate step", "METRIC step=1 step=2", None),
            ("no =", "METRIC a", None),
            ("one pair without =", "METRIC a=1 b", None),
            ("empty value", "METRIC a=", None),
            ("empty key", "METRIC =1", None),
            ("key starts with digit", "METRIC 1a=1", None),
            ("key with $", "METRIC a$=1", None),
            ("key with :", "METRIC a:b=1", None),
            ("invalid UTF-8 key", b"METRIC \xffa=1", None),
            ("METRIC alone", "METRIC", None),
            ("METRIC and blanks", "METRIC   \r\n", None),
            ("METRICS", "METRICS x=1", None),
            ("lower case", "metric x=1", None),
            ("empty", "", None),
        ]
        for label, line, expected in cases:
            with self.subTest(label):
                self.assertEqual(runpilot.parse_metric_line(line), expected)

    def test_nan(self):
        sample = runpilot.parse_metric_line("METRIC a=nan b=NaN")
        self.assertEqual(set(sample), {"a", "b"})
        self.assertTrue(math.isnan(sample["a"]) and math.isnan(sample["b"]))

    def test_types(self):
        sample = runpilot.parse_metric_line(f"METRIC i=3 f=3.0 s=three big={BIG_400}")
        self.assertEqual([type(v) for v in sample.values()], [int, float, str, int])

    def test_5000_digit_int_does_not_crash(self):
        for text in (BIG_5000, "-" + BIG_5000):
            with self.subTest(sign=text[0]):
                sample = runpilot.parse_metric_line(f"METRIC big={text} a=1")
                self.assertIsNotNone(sample)
                self.assertEqual(sample["a"], 1)
                self.assertIsInstance(sample["big"], (int, float))
                self.assertGreater(abs(sample["big"]), 10 ** 300)
                # ...and the sample can be written and read back
                back = json.loads(runpilot.sample_json(1, sample))
                self.assertEqual(back["a"], 1)
                self.assertGreater(abs(back["big"]), 10 ** 300)


class SampleJsonTest(HomeTestCase):
    def test_valid_json_step_first(self):
        sample = {"loss": 0.25, "acc": 1, "name": 'say "hi" \\ o/', "uni": "é✓\ufffd",
                  "big": int(BIG_400), "tiny": 1e-300, "neg": -3}
        text = runpilot.sample_json(5, sample)
        pairs = json.loads(text, object_pairs_hook=list)
        self.assertEqual(pairs[0], ("step", 5))
        self.assertEqual(dict(pairs), {"step": 5, **sample})
        self.assertEqual(len(pairs), 1 + len(sample))

    def test_explicit_step_written_once(self):
        sample = runpilot.parse_metric_line("METRIC loss=0.5 step=12")
        text = runpilot.sample_json(sample["step"], sample)
        pairs = json.loads(text, object_pairs_hook=list)
        self.assertEqual(pairs, [("step", 12), ("loss", 0.5)])

    def test_non_finite(self):
        back = json.loads(runpilot.sample_json(1, {"a": math.inf, "b": -math.inf, "c": math.nan}))
        self.assertEqual((back["a"], back["b"]), (math.inf, -math.inf))
        self.assertTrue(math.isnan(back["c"]))


class MetricScannerTest(HomeTestCase):
    def test_split_at_every_byte_boundary(self):
        line = b"METRIC step=3 loss=0.5 name=x"
        streams = [line + b"\n", b"epoch 1 done\n" + line + b"\nnext line\n",
                   b"progress\r50%\r100%\n" + line + b"\r\n", b"tail\n" + line]
        for stream in streams:
            for cut in range(len(stream) + 1):
                with self.subTest(stream=stream, cut=cut):
                    self.assertEqual(scan([stream[:cut], stream[cut:]]), [line])

    def test_three_or_more_chunks(self):
        line = b"METRIC a=1 b=2"
        stream = b"noise\n" + line + b"\n" + b"x METRIC not=1\n"
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                with self.subTest(i=i, j=j):
                    self.assertEqual(scan([stream[:i], stream[i:j], stream[j:]]), [line])
        with self.subTest("byte by byte"):
            self.assertEqual(scan([stream[k:k + 1] for k in range(len(stream))]), [line])

    def test_crlf(self):
        self.assertEqual(scan([b"METRIC a=1\r\nMETRIC b=2\r\n"]), [b"METRIC a=1", b"METRIC b=2"])

    def test_interleaved_ordinary_output(self):
        stream = (b"loading data\n\x1b[32mok\x1b[0m\n"
                  b"METRIC step=1 loss=1.0\n"
                  b"  10%|#         |\r  20%|##        |\r 100%|##########|\n"
                  b"log: METRIC x=1 is what we print\n"
                  b"  METRIC indented=1\n"
                  b"METRIC step=2 loss=0.5\n"
                  b"\x00\xff\xfe binary junk\n"
                  b"done\n")
        expected = [b"METRIC step=1 loss=1.0", b"METRIC step=2 loss=0.5"]
        for size in (1, 2, 3, 7, 16, 64, len(stream)):
            with self.subTest(chunk_size=size):
                self.assertEqual(scan([stream[k:k + size] for k in range(0, len(stream), size)]), expected)

    def test_metric_in_the_middle_is_not_a_metric(self):
        self.assertEqual(scan([b"epoch 3 METRIC loss=0.1\n", b"xMETRIC a=1\n"]), [])

    def test_final_line_without_newline(self):
        scanner = runpilot.MetricScanner()
        self.assertEqual(scanner.feed(b"a\nMETRIC x=1"), [])
        self.assertEqual(scanner.finish(), [b"METRIC x=1"])
        scanner = runpilot.MetricScanner()
        self.assertEqual(scanner.feed(b"METRIC y=2\r"), [])
        self.assertEqual(scanner.finish(), [b"METRIC y=2"])
        scanner = runpilot.MetricScanner()
        scanner.feed(b"METRIC a=1\nno metric at the end")
        self.assertEqual(scanner.finish(), [])

    def test_overlong_line_is_not_buffered(self):
        body = b"METRIC x=" + b"1" * (3 << 20)
        for ending in (b"", b"\nMETRIC ok=1\n"):
            with self.subTest(ending=ending):
                scanner = runpilot.MetricScanner()
                found = []
                stream = body + ending
                for k in range(0, len(stream), runpilot.READ_SIZE):
                    found += scanner.feed(stream[k:k + runpilot.READ_SIZE])
                    self.assertLessEqual(len(scanner.pending), runpilot.MAX_METRIC_LINE)
                found += scanner.finish()
                self.assertEqual(found, [b"METRIC ok=1"] if ending else [])
                self.assertEqual(scanner.overlong, 1)

    def test_overlong_line_in_one_chunk(self):
        scanner = runpilot.MetricScanner()
        self.assertEqual(scanner.feed(b"hi\nMETRIC x=" + b"2" * (3 << 20)), [])
        self.assertEqual(scanner.pending, b"")
        self.assertEqual(scanner.overlong, 1)
        self.assertEqual(scanner.feed(b"22\nMETRIC y=1\n"), [b"METRIC y=1"])

    # Was a bug: feed and _keep_tail disagreed on what starts a METRIC line, so the result depended on
    # where the reads split. Both now use runpilot.is_metric_line.
    def test_result_does_not_depend_on_read_boundaries(self):
        for line in (b"METRICS x=1", b"METRIC\x0bx=1", b"METRIC\xc2\xa0x=1", b"METRIC\x0cx=1"):
            stream = line + b"\n"
            whole = reference_samples(stream)
            for cut in range(1, len(stream)):
                with self.subTest(line=line, cut=cut):
                    log = runpilot.MetricLog(self.tmp / "m.json")
                    self.addCleanup(log.close)
                    log.add_lines(scan([stream[:cut], stream[cut:]]))
                    self.assertEqual((log.count, log.malformed), (len(whole[0]), whole[1]))


class MayHoldMetricTest(unittest.TestCase):
    def test_same_answer_as_the_substring_search(self):
        rng = random.Random(7)
        cases = [b"", b"M", b"METRI", b"METRIC", b"xMETRIC", b"MMMMMMMMMMMMETRIC", b"M" * 20 + b"METRIC",
                 b"M" * 20, b"METRI" * 9 + b"C", b"METRIX " * 9 + b"METRIC", b"x" * 1000 + b"METRIC"]
        for _ in range(3000):
            noise = bytes(rng.choice(b"METRICMx\n ") for _ in range(rng.randint(0, 60)))
            at = rng.randint(0, len(noise))
            cases.append(noise[:at] + b"METRIC" + noise[at:] if rng.random() < 0.3 else noise)
        for data in cases:
            with self.subTest(data=data):
                self.assertEqual(runpilot.may_hold_metric(data), b"METRIC" in data)
        self.assertGreater(sum(b"METRIC" in d for d in cases), 50)
        self.assertGreater(sum(d.count(b"M") > 8 and b"METRIC" in d for d in cases), 10)  # the fallback too


class MetricLogTest(HomeTestCase):
    LINES = [b"METRIC loss=1.5 opt=adam", b"METRIC loss=0.75 acc=0.5", b"METRIC bad",
             b"METRIC step=10 loss=0.5", b"METRIC a=1 a=2", b"METRIC loss=0.25 big=" + BIG_400.encode()]
    SAMPLES = [{"step": 1, "loss": 1.5, "opt": "adam"}, {"step": 2, "loss": 0.75, "acc": 0.5},
               {"step": 10, "loss": 0.5}, {"step": 4, "loss": 0.25, "big": int(BIG_400)}]

    def test_closed_file_is_json(self):
        path = self.tmp / "metrics.json"
        log = runpilot.MetricLog(path)
        log.add_lines(self.LINES[:3])
        log.add_lines([])
        log.add_lines(self.LINES[3:])
        log.close()
        log.close()  # twice is harmless
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), self.SAMPLES)
        self.assertEqual(runpilot.read_metrics(path), self.SAMPLES)
        self.assertEqual((log.count, log.malformed), (4, 2))
        self.assertEqual(log.last, {"loss": 0.25, "opt": "adam", "acc": 0.5, "big": int(BIG_400)})

    def test_empty_file_is_empty_list(self):
        path = self.tmp / "metrics.json"
        log = runpilot.MetricLog(path)
        log.close()
        self.assertEqual(json.loads(path.read_text(encoding="utf-8")), [])
        self.assertEqual(runpilot.read_metrics(path), [])
        self.assertEqual(runpilot.read_metrics(self.tmp / "missing.json"), [])

    def test_unclosed_file_keeps_complete_samples(self):
        path = self.tmp / "metrics.json"
        log = runpilot.MetricLog(path)
        log.add_lines(self.LINES)
        os.close(log.fd)  # the runner died: no closing bracket
        self.assertEqual(runpilot.read_metrics(path), self.SAMPLES)
        with self.assertRaises(ValueError):
            json.loads(path.read_text(encoding="utf-8"))
        size = path.stat().st_size
        with open(path, "r+b") as f:  # torn last write
            f.truncate(size - 5)
        self.assertEqual(runpilot.read_metrics(path), self.SAMPLES[:-1])

    def test_step_counter(self):
        path = self.tmp / "metrics.json"
        log = runpilot.MetricLog(path)
        log.add_lines([b"METRIC a=1", b"METRIC nope", b"METRIC a=2", b"METRIC step=100 a=3", b"METRIC a=4"])
        log.add_lines([b"METRIC step=0 a=5", b"METRIC a=6"])
        log.close()
        self.assertEqual([(s["step"], s["a"]) for s in runpilot.read_metrics(path)],
                         [(1, 1), (2, 2), (100, 3), (4, 4), (0, 5), (6, 6)])
        self.assertEqual((log.count, log.malformed, log.last), (6, 1, {"a": 6}))

    def test_file_mode(self):
        path = self.tmp / "metrics.json"
        runpilot.MetricLog(path).close()
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)


class FuzzTest(HomeTestCase):
    """Random output with METRIC lines, cut into random reads, gives what a whole-stream parse gives."""

    KEYS = ["loss", "acc", "lr", "val/loss", "a.b", "x-y", "_z", "step"]
    VALUES = ["1", "-2", "0.5", ".5", "1e-3", "inf", "nan", "adam", "1_000", BIG_400, "+7", "-0", "x=y"]
    BAD = ["METRIC", "METRIC ", "METRIC a", "METRIC a=", "METRIC =1", "METRIC 9a=1", "METRIC a=1 a=2",
           "METRIC step=1.5", "METRIC step=x a=1", "METRIC a=1 b"]

    def metric_line(self, rng: random.Random) -> bytes:
        if rng.random() < 0.25:
            return rng.choice(self.BAD).encode()
        keys = rng.sample(self.KEYS, rng.randint(1, 4))
        pairs = [f"{k}={rng.randint(-5, 10**6) if k == 'step' else rng.choice(self.VALUES)}" for k in keys]
        sep = rng.choice([" ", " ", "\t", "  "])
        return ("METRIC" + sep + sep.join(pairs)).encode() + rng.choice([b"", b"\r", b" "])

    def stream(self, rng: random.Random) -> bytes:
        parts = []
        for _ in range(rng.randint(10, 80)):
            kind = rng.random()
            if kind < 0.4:
                parts.append(b"\n" + self.metric_line(rng) + b"\n")
            elif kind < 0.5:
                parts.append(b"\nxx METRIC a=1 in the middle\n")
            elif kind < 0.6:
                parts.append(b"\r 10%\r 50%\r 100%\x1b[2K")
            else:
                parts.append(rng.randbytes(rng.randint(0, 400)))
        if rng.random() < 0.5:
            parts.append(b"\n" + self.metric_line(rng))  # last line without newline
        return b"".join(parts)

    def test_fuzz(self):
        totals = [0, 0, 0]  # samples, malformed, chunks: the fuzz must exercise something
        for seed in range(500):
            rng = random.Random(seed)
            stream = self.stream(rng)
            chunks, k = [], 0
            while k < len(stream):
                size = rng.choices([1, 2, 3, 5, 8, 13, 40, 64, 100, 500, 4096, 65536],
                                    weights=[10, 10, 10, 10, 10, 10, 10, 10, 10, 6, 3, 1])[0]
                chunks.append(stream[k:k + size])
                k += size
            with self.subTest(seed=seed):
                path = self.tmp / f"m{seed}.json"
                log = runpilot.MetricLog(path)
                scanner = runpilot.MetricScanner()
                for chunk in chunks:
                    log.add_lines(scanner.feed(chunk))
                log.add_lines(scanner.finish())
                log.close()
                samples, malformed = reference_samples(stream)
                self.assertEqual(_norm(runpilot.read_metrics(path)), _norm(samples))
                with open(path, encoding="utf-8") as f:
                    self.assertEqual(_norm(json.load(f)), _norm(samples))
                self.assertEqual(log.malformed + scanner.overlong, malformed)
                self.assertEqual(log.count, len(samples))
                totals = [totals[0] + log.count, totals[1] + malformed, totals[2] + len(chunks)]
        self.assertGreater(totals[0], 2000)
        self.assertGreater(totals[1], 500)
        self.assertGreater(totals[2], 10000)


class MetricLogAgainstReferenceTest(HomeTestCase):
    """metrics.json and `last` hold what a whole-stream parse gives, also for values that look like JSON."""

    VALUES = ["1", "-2", "0", "-0", "0.5", "0.500000", "1e-3", "1E5", "1e999", "12345678901234567890", "NaN",
              "Infinity", "-Infinity", "true", "false", "null", "[1]", "{}", '"x"', "1,2", "1:2", "007", ".5",
              "5.", "+1", "nan", "inf", "1_000", "adam", "a\\u0041", "x=y", BIG_400, BIG_5000]
    KEYS = ["loss", "acc", "val/loss", "a.b", "_z", "9a", "a\\u0041", "k\u00e9", ""]

    def log_of(self, lines: list[bytes]) -> tuple[list, dict, int, int]:
        path = self.tmp / "m.json"
        log = runpilot.MetricLog(path)
        log.add_lines(lines)
        log.close()
        with open(path, encoding="utf-8") as f:  # `last` as a list: its order is meta.json's
            return _norm(json.load(f)), _norm(list(log.last.items())), log.count, log.malformed

    def expected(self, lines: list[bytes]) -> tuple[list, dict, int, int]:
        samples, malformed = reference_samples(b"\n".join(lines))
        last = {}
        for sample in samples:
            last.update(sample)
        last.pop("step", None)
        return _norm(samples), _norm(list(last.items())), len(samples), malformed

    def test_blocks(self):
        cases = {
            "step first": [b"METRIC step=%d loss=%.6f acc=0.%d" % (i, 1 / (i + 1), i) for i in range(50)],
            "no step": [b"METRIC loss=%d.25 lr=1e-3" % i for i in range(50)],
            "tabs": [b"METRIC\tstep=1\tloss=0.5", b"METRIC step=2\tloss=0.25"],
            "changing keys": [b"METRIC step=1 loss=1", b"METRIC step=2 loss=0.5 val/loss=0.7", b"METRIC step=3 loss=0.25"],
            "non-finite": [b"METRIC step=1 loss=NaN", b"METRIC step=2 loss=Infinity grad=-Infinity"],
            "step only": [b"METRIC step=5"],
            "text value": [b"METRIC step=1 opt=adam"],
            "JSON true": [b"METRIC step=1 ok=true"], "JSON null": [b"METRIC step=1 x=null"],
            "JSON list": [b"METRIC step=1 x=[1]"], "JSON object": [b"METRIC step=1 x={}"],
            "JSON string": [b'METRIC step=1 x="1"'], "escape in key": [b"METRIC step=1 a\\u0041=1"],
            "leading zero": [b"METRIC step=1 a=007"], "python float": [b"METRIC step=1 a=.5"],
            "lower nan": [b"METRIC step=1 a=nan"], "plus sign": [b"METRIC step=1 a=+1"],
            "underscore": [b"METRIC step=1 a=1_000"], "value holding =": [b"METRIC step=1 a=b=1"],
            "comma": [b"METRIC step=1 a=1,2"], "5000 digits": [b"METRIC step=1 a=" + BIG_5000.encode()],
            "duplicate key": [b"METRIC step=1 a=1 a=2"], "duplicate step": [b"METRIC step=1 step=2"],
            "float step": [b"METRIC step=1.0 a=1"], "step not first": [b"METRIC a=1 step=2"],
            "mixed step": [b"METRIC step=1 a=1", b"METRIC a=2"], "bad key": [b"METRIC step=1 9a=1"],
            "empty key": [b"METRIC step=1 =1"], "non-ASCII key": ["METRIC step=1 kée=1".encode()],
            "invalid UTF-8": [b"METRIC step=1 a=\xff"], "double space": [b"METRIC step=1  a=1"],
            "trailing space": [b"METRIC step=1 a=1 "], "METRIC alone": [b"METRIC"],
            "no value": [b"METRIC step=1 a="], "no =": [b"METRIC step=1 a"],
            "carriage return inside": [b"METRIC step=1 a=\r1"],  # JSON whitespace, but float() makes it 1.0
        }
        for label, lines in cases.items():
            with self.subTest(label):
                self.assertEqual(self.log_of(lines), self.expected(lines))

    def test_numbers_are_written_as_python_writes_them(self):
        path = self.tmp / "m.json"
        log = runpilot.MetricLog(path)
        log.add_lines([b"METRIC step=3 loss=0.500000 n=1E5 k=007 big=1e999"])
        log.close()
        self.assertIn('{"step": 3, "loss": 0.5, "n": 100000.0, "k": 7, "big": Infinity}',
                      path.read_text(encoding="utf-8").splitlines())  # one sample per line
        self.assertEqual(runpilot.read_metrics(path), [{"step": 3, "loss": 0.5, "n": 100000.0, "k": 7,
                                                        "big": math.inf}])

    def test_fuzz(self):
        checked = 0
        for seed in range(1500):
            rng = random.Random(seed)
            stepped = rng.random()
            lines = []
            for i in range(rng.randint(1, 6)):
                keys = rng.sample(self.KEYS[:5] if rng.random() < 0.7 else self.KEYS, rng.randint(0, 3))
                if rng.random() < 0.15 and keys:
                    keys.append(rng.choice(keys))  # a key given twice
                values = [rng.choice(self.VALUES[:13] if rng.random() < 0.8 else self.VALUES) for _ in keys]
                pairs = [f"{k}={v}" for k, v in zip(keys, values)]
                if stepped < 0.5 or (stepped < 0.6 and rng.random() < 0.5):
                    pairs.insert(0, f"step={rng.choice([str(i), str(i * 1000), '-3', '1.5'] if rng.random() < 0.2 else [str(i)])}")
                lines.append(("METRIC " + " ".join(pairs)).encode())
            with self.subTest(seed=seed, lines=lines):
                expected = self.expected(lines)
                self.assertEqual(self.log_of(lines), expected)
                checked += expected[2]
        self.assertGreater(checked, 3000)  # the fuzz makes mostly valid samples


CHILD = r"""
import os, sys
out = open(sys.argv[1], "rb").read()
err = open(sys.argv[2], "rb").read()
size = int(sys.argv[3])
def put(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
i = j = 0
while i < len(out) or j < len(err):
    if i < len(out):
        put(1, out[i:i + size]); i += size
    if j < len(err):
        put(2, err[j:j + size]); j += size
"""


class RecordingTerminal(runpilot.Terminal):
    """The real Terminal, writing to two files, that also keeps each chunk of the job's output it was handed."""

    def __init__(self, stdout, stderr) -> None:
        super().__init__(stdout, stderr)
        self.seen: list[tuple[int, bytes]] = []

    def job_output(self, which: int, chunk: bytes) -> None:
        self.seen.append((which, chunk))
        super().job_output(which, chunk)


class TeeTest(HomeTestCase):
    """The real tee loop on a local child process writing a known byte pattern."""

    def payload(self, seed: int, metric_lines: int, tag: str) -> bytes:
        rng = random.Random(seed)
        parts = [rng.randbytes(200_000), b"\n\x00\x00\xff\xfe\xc3\x28 invalid utf-8\n",
                 b"\x1b[31mred\x1b[0m \x1b[2K\r",
                 b"".join(b"\r%3d%% [%-20s]" % (i, b"#" * (i // 5)) for i in range(101)), b"\n",
                 b"L" * 5_000_000, b"\n"]
        for i in range(metric_lines):
            end = b"\r\n" if i % 3 == 0 else b"\n"
            parts.append(b"METRIC step=%d %s=%.6f note=%s%s" % (i, tag.encode(), i / 7, b"\xff" if i % 97 == 0
                                                                   else b"ok", end))
            if i % 1000 == 0:
                parts.append(rng.randbytes(3000).replace(b"\n", b" ") + b"\n")
        parts.append(b"METRIC bad\nMETRIC a=1 a=1\n")  # two malformed
        parts.append(b"METRIC step=%d %s=-1" % (metric_lines, tag.encode()))  # no newline at the end
        return b"".join(parts)

    def run_child(self, out: bytes, err: bytes, write_size: int):
        (self.tmp / "out.bin").write_bytes(out)
        (self.tmp / "err.bin").write_bytes(err)
        argv = [sys.executable, "-c", CHILD, str(self.tmp / "out.bin"), str(self.tmp / "err.bin"), str(write_size)]
        log_path, metrics_path = self.tmp / "logs.txt", self.tmp / "metrics.json"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        metric_log = runpilot.MetricLog(metrics_path)
        events = []
        with open(self.tmp / "terminal.out", "wb") as out_file, open(self.tmp / "terminal.err", "wb") as err_file:
            terminal = RecordingTerminal(out_file, err_file)
            try:
                job = runpilot.Job(runpilot.Launch(argv, dict(os.environ), None, "local"), 5)
                self.addCleanup(job.proc.stdout.close)
                self.addCleanup(job.proc.stderr.close)
                result = runpilot.Tee(log_fd, metric_log, terminal, events.append, "r").run(
                    job, runpilot.StopSignals(), None)
            finally:
                os.close(log_fd)
                metric_log.close()
            self.assertTrue(terminal.drain(30))
        # what reached the terminal's two streams, byte for byte
        self.assertEqual((self.tmp / "terminal.out").read_bytes(), out)
        self.assertEqual((self.tmp / "terminal.err").read_bytes(), err)
        self.assertEqual(events, [])  # nothing to report about a job that ran and ended by itself
        return result, log_path.read_bytes(), metric_log, runpilot.read_metrics(metrics_path), terminal.seen

    def test_stdout_only_is_byte_identical(self):
        out = self.payload(1, 10_000, "loss")
        result, log, metric_log, samples, seen = self.run_child(out, b"", 65536)
        self.assertEqual(result.returncode, 0)
        self.assertIsNone(result.stop_reason)
        self.assertEqual(len(log), len(out))
        self.assertEqual(hashlib.sha256(log).hexdigest(), hashlib.sha256(out).hexdigest())
        self.assertEqual(b"".join(c for w, c in seen if w == 1), out)
        self.assertEqual([w for w, _ in seen if w == 2], [])
        expected, malformed = reference_samples(out)
        self.assertEqual(len(expected), 10_001)
        self.assertEqual((metric_log.count, metric_log.malformed), (10_001, malformed))
        self.assertEqual(malformed, 2)
        self.assertEqual(samples, expected)
        self.assertEqual(samples[97]["note"], "\ufffd")

    def test_both_streams(self):
        out = self.payload(2, 10_000, "loss")
        err = self.payload(3, 500, "warn")
        result, log, metric_log, samples, seen = self.run_child(out, err, 10_007)
        self.assertEqual(result.returncode, 0)
        self.assertEqual(b"".join(c for w, c in seen if w == 1), out)
        self.assertEqual(b"".join(c for w, c in seen if w == 2), err)
        self.assertEqual(len(log), len(out) + len(err))
        # logs.txt holds the chunks in the order they were read, the same order the terminal saw them
        self.assertEqual(hashlib.sha256(log).hexdigest(),
                         hashlib.sha256(b"".join(c for _, c in seen)).hexdigest())
        expected_out, bad_out = reference_samples(out)
        expected_err, bad_err = reference_samples(err)
        self.assertEqual((metric_log.count, metric_log.malformed), (10_001 + 501, bad_out + bad_err))
        self.assertEqual([s for s in samples if "loss" in s], expected_out)
        self.assertEqual([s for s in samples if "warn" in s], expected_err)

    def test_exit_status(self):
        argv = [sys.executable, "-c", "import sys; print('METRIC a=1'); sys.exit(3)"]
        log_fd = os.open(self.tmp / "logs.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.addCleanup(os.close, log_fd)
        metric_log = runpilot.MetricLog(self.tmp / "metrics.json")
        self.addCleanup(metric_log.close)
        job = runpilot.Job(runpilot.Launch(argv, dict(os.environ), None, "local"), 5)
        self.addCleanup(job.proc.stdout.close)
        self.addCleanup(job.proc.stderr.close)
        result = runpilot.Tee(log_fd, metric_log, None, lambda event: None, "r").run(
            job, runpilot.StopSignals(), None)
        self.assertEqual(result.returncode, 3)
        self.assertEqual((self.tmp / "logs.txt").read_bytes(), b"METRIC a=1\n")
        self.assertEqual(metric_log.last, {"a": 1})


if __name__ == "__main__":
    unittest.main()
