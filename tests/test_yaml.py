"""The YAML subset reader and writer (section 6 of runpilot.py): tables, the yaml-test-suite,
PyYAML as a second opinion, bounded fuzzing, round trips and the config examples."""

import functools
import json
import math
import os
import random
import re
import time
import unittest
from pathlib import Path

from runpilot import ConfigError, YamlError, dump_yaml, parse_yaml, parse_yaml_located

try:
    import yaml
except ImportError:  # PyYAML is a test-only tool; the reader itself is standard library only
    yaml = None

REPO_ROOT = Path(__file__).resolve().parents[1]
FUZZ_SECONDS = 0.6  # per fuzz test: enough for thousands of inputs, small enough for a fast suite
MAX_DEPTH = 100     # the reader's documented nesting limit

SEED_CONFIG = """\
name: mnist-cnn-baseline
image: "pytorch/pytorch:2.2.0-cuda12.1-cudnn8-runtime"
entrypoint: "python train.py"
workdir: "/workspace"

env:
  EPOCHS: 10
  LR: 0.001

mounts:
  code: "./src"
  data: "./data"

resources:
  gpus: 1
  cpu: 4
  memory: "8g"

metrics:
  - "train_loss"
  - "val_accuracy"
"""

SEED_VALUE = {
    "name": "mnist-cnn-baseline",
    "image": "pytorch/pytorch:2.2.0-cuda12.1-cudnn8-runtime",
    "entrypoint": "python train.py",
    "workdir": "/workspace",
    "env": {"EPOCHS": 10, "LR": 0.001},
    "mounts": {"code": "./src", "data": "./data"},
    "resources": {"gpus": 1, "cpu": 4, "memory": "8g"},
    "metrics": ["train_loss", "val_accuracy"],
}


SUITE = REPO_ROOT / "tests" / "yaml-test-suite" / "cases.json"  # vendored, MIT (LICENSE beside it)


def find_suite() -> Path:
    """The yaml-test-suite as data: $RUNPILOT_YAML_SUITE when set, else the copy in tests/yaml-test-suite/."""
    return Path(os.environ.get("RUNPILOT_YAML_SUITE") or SUITE)


@functools.lru_cache(maxsize=1)
def suite_cases() -> list:
    """The suite's cases. The suite ships with the repository, so a missing file is an error, not a skip."""
    return json.loads(find_suite().read_text(encoding="utf-8"))


def same(a: object, b: object) -> bool:
    """Deep equality that also compares types (1, 1.0 and True differ), key order, NaN and -0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))  # type: ignore[arg-type]
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)  # type: ignore[arg-type]
        return a == b and math.copysign(1, a) == math.copysign(1, b)  # type: ignore[arg-type]
    return a == b


class StrictCase(unittest.TestCase):
    def assertSame(self, got: object, expected: object, msg: str = "") -> None:
        if not same(got, expected):
            self.fail(f"{msg}\n got:      {got!r}\n expected: {expected!r}")

    def assertYamlError(self, text: str, line: int, col: int, fragment: str) -> YamlError:
        with self.assertRaises(YamlError) as caught:
            parse_yaml(text, "config.yaml")
        err = caught.exception
        self.assertEqual((err.line, err.col), (line, col), str(err))
        self.assertIn(fragment, err.message)
        return err


# -- the subset, case by case ---------------------------------------------------------------

# (name, YAML text, expected value): every bullet of the subset.
VALID = [
    # block mappings and sequences, any depth
    ("mapping", "a: 1\nb: two\n", {"a": 1, "b": "two"}),
    ("nested mappings", "a:\n  b:\n    c: d\n  e: f\ng: h\n", {"a": {"b": {"c": "d"}, "e": "f"}, "g": "h"}),
    ("sequence", "- a\n- b\n", ["a", "b"]),
    ("sequence under a key", "k:\n  - a\n  - b\n", {"k": ["a", "b"]}),
    ("indentless sequence", "k:\n- a\n- b\nnext: 1\n", {"k": ["a", "b"], "next": 1}),
    ("sequence of mappings", "- name: a\n  x: 1\n- name: b\n  x: 2\n", [{"name": "a", "x": 1}, {"name": "b", "x": 2}]),
    ("sequence of mappings, key below dash", "-\n  name: a\n", [{"name": "a"}]),
    ("nested sequences", "- - a\n  - b\n- - c\n", [["a", "b"], ["c"]]),
    ("indentless sequence of mappings", "jobs:\n- name: a\n  gpus: 1\n- name: b\n",
     {"jobs": [{"name": "a", "gpus": 1}, {"name": "b"}]}),
    ("deeper indentation", "a:\n    b:\n        - 1\n", {"a": {"b": [1]}}),
    ("empty values", "a:\nb: ~\n- x\n" if False else "a:\nb: ~\nc:\n", {"a": None, "b": None, "c": None}),
    ("empty sequence entry", "- \n-\n- x\n", [None, None, "x"]),
    ("key with spaces before colon", "key   : v\n", {"key": "v"}),
    ("quoted keys", "'a b': 1\n\"c: d\": 2\n", {"a b": 1, "c: d": 2}),
    ("typed keys", "2: a\ntrue: b\nnull: c\n1.5: d\n", {2: "a", True: "b", None: "c", 1.5: "d"}),
    ("key with colon inside", "a:b: c\n", {"a:b": "c"}),
    # flow collections
    ("flow sequence", "metrics: [train_loss, val_accuracy]\n", {"metrics": ["train_loss", "val_accuracy"]}),
    ("flow mapping", 'env: {A: 1, B: "x"}\n', {"env": {"A": 1, "B": "x"}}),
    ("nested flow", "a: {b: [1, {c: d}], e: []}\n", {"a": {"b": [1, {"c": "d"}], "e": []}}),
    ("flow trailing comma", "a: [1, 2, ]\nb: {x: 1,}\n", {"a": [1, 2], "b": {"x": 1}}),
    ("empty flow", "a: []\nb: {}\n", {"a": [], "b": {}}),
    ("flow over lines", "a: [\n  1,\n  2  # two\n ]\n", {"a": [1, 2]}),
    ("flow key without value", "a: {x, y: 1}\n", {"a": {"x": None, "y": 1}}),
    ("flow single pair", "a: [x: 1, y]\n", {"a": [{"x": 1}, "y"]}),
    ("flow url", "a: [http://x:8080/p#f]\n", {"a": ["http://x:8080/p#f"]}),
    ("top-level flow", "[1, two, 'three']\n", [1, "two", "three"]),
    # plain scalars
    ("plain with colon and hash", "url: http://x:8080/a#b\n", {"url": "http://x:8080/a#b"}),
    ("comment after plain", "a: b # note\n", {"a": "b"}),
    ("hash without space", "a: b#c\n", {"a": "b#c"}),
    ("plain with inner spaces", "a: b  c\n", {"a": "b  c"}),
    ("multi-line plain", "a: one\n  two\n\n  three\n", {"a": "one two\nthree"}),
    ("multi-line plain below key", "a:\n  one\n  two\nb: 1\n", {"a": "one two", "b": 1}),
    ("plain with indicators inside", "a: x-y ?z [w] {v} &u *t !s\n", {"a": "x-y ?z [w] {v} &u *t !s"}),
    ("plain starting with safe indicators", "- -x\n- ?x\n- :x\n", ["-x", "?x", ":x"]),
    # single-quoted scalars
    ("single quoted", "a: 'it''s # not a comment'\n", {"a": "it's # not a comment"}),
    ("single quoted backslash", r"a: 'C:\path\n'" + "\n", {"a": "C:\\path\\n"}),
    ("single quoted folding", "a: 'one\n  two\n\n  three'\n", {"a": "one two\nthree"}),
    # double-quoted scalars
    ("double quoted escapes", r'a: "x\ny\tz\"q\\b"' + "\n", {"a": 'x\ny\tz"q\\b'}),
    ("hex and unicode escapes", r'a: "\x41\u00e9\U0001F600\0\e"' + "\n", {"a": "Aé😀\0\x1b"}),
    ("other escapes", r'a: "\a\b\v\f\r\/\ \_\N\L\P"' + "\n", {"a": "\a\b\v\f\r/ \xa0\x85\u2028\u2029"}),
    ("double quoted folding", 'a: "one\n  two\n\n  three "\n', {"a": "one two\nthree "}),
    ("escaped line break", 'a: "one\\\n  two"\n', {"a": "onetwo"}),
    ("double quoted keeps spaces", 'a: "  x  "\n', {"a": "  x  "}),
    ("quoted scalars are strings", "a: '1'\nb: \"true\"\nc: 'null'\nd: \"\"\n",
     {"a": "1", "b": "true", "c": "null", "d": ""}),
    # block scalars
    ("literal", "run: |\n  python a.py\n  python b.py\n", {"run": "python a.py\npython b.py\n"}),
    ("literal strip", "run: |-\n  x\n  y\n", {"run": "x\ny"}),
    ("literal keep", "run: |+\n  x\n\n\nb: 1\n", {"run": "x\n\n\n", "b": 1}),
    ("literal keeps indentation", "run: |\n  if x:\n      y\n", {"run": "if x:\n    y\n"}),
    ("literal explicit indent", "run: |2\n   leading space\n  x\n", {"run": " leading space\nx\n"}),
    ("literal with hash", "run: |\n  # not a comment\n  x\n", {"run": "# not a comment\nx\n"}),
    ("folded", "d: >\n  one\n  two\n\n  three\n", {"d": "one two\nthree\n"}),
    ("folded strip", "d: >-\n  one\n  two\n", {"d": "one two"}),
    ("folded keep more-indented", "d: >+\n  a\n    b\n  c\n\n", {"d": "a\n  b\nc\n\n"}),
    ("block scalar header comment", "d: |  # the script\n  x\n", {"d": "x\n"}),
    ("block scalar in sequence", "- |\n  x\n- y\n", ["x\n", "y"]),
    ("empty block scalar", "a: |\nb: 1\n", {"a": "", "b": 1}),
    ("top-level literal", "|\n  x\n", "x\n"),
    # comments, blank lines, markers, BOM, CRLF, tabs
    ("comments and blank lines", "# head\n\na: 1   # one\n\n  # indented comment\nb: 2\n# tail\n", {"a": 1, "b": 2}),
    ("document start", "---\na: 1\n", {"a": 1}),
    ("document start with comment", "--- # config\na: 1\n", {"a": 1}),
    ("document end", "a: 1\n...\n# after\n", {"a": 1}),
    ("scalar on document start line", "--- text\n", "text"),
    ("BOM", "\ufeffa: 1\n", {"a": 1}),
    ("CRLF", "a: 1\r\nb:\r\n  - x\r\nc: |\r\n  l1\r\n  l2\r\n", {"a": 1, "b": ["x"], "c": "l1\nl2\n"}),
    ("tab after colon", "a:\tb\n", {"a": "b"}),
    ("trailing tabs", "a: b\t\nc: d\t# x\n", {"a": "b", "c": "d"}),
    ("tab inside values", "a: 'x\ty'\nb: x\ty\n", {"a": "x\ty", "b": "x\ty"}),
    ("tab-only blank line", "a: 1\n\t\nb: 2\n", {"a": 1, "b": 2}),
    ("non-ASCII", "名前: 値 ☮\n", {"名前": "値 ☮"}),
    # typing: the YAML 1.2 core schema
    ("nulls", "- null\n- Null\n- NULL\n- ~\n-\n", [None] * 5),
    ("bools", "- true\n- True\n- TRUE\n- false\n- False\n- FALSE\n", [True] * 3 + [False] * 3),
    ("ints", "- 0\n- 010\n- -7\n- +3\n- 0o17\n- 0x1F\n- 0xff\n", [0, 10, -7, 3, 15, 31, 255]),
    ("huge int", "- 123456789012345678901234567890\n", [123456789012345678901234567890]),
    ("floats", "- 1.5\n- .5\n- 1e3\n- -2.5E-3\n- 1.\n- +.5\n", [1.5, 0.5, 1000.0, -0.0025, 1.0, 0.5]),
    ("special floats", "- .inf\n- -.Inf\n- +.INF\n- .nan\n- .NaN\n",
     [math.inf, -math.inf, math.inf, math.nan, math.nan]),
    ("YAML 1.1 words are strings", "- yes\n- no\n- on\n- off\n- NO\n- y\n- n\n",
     ["yes", "no", "on", "off", "NO", "y", "n"]),
    ("number-like strings", "- 1_000\n- 0b101\n- 2024-01-01\n- 1:30\n- 0o8\n- 0x\n- 1e\n- .\n- -1-\n- 1.2.3\n",
     ["1_000", "0b101", "2024-01-01", "1:30", "0o8", "0x", "1e", ".", "-1-", "1.2.3"]),
    ("case matters", "- TRue\n- nuLL\n- .INf\n", ["TRue", "nuLL", ".INf"]),
    ("empty document", "", None),
    ("only comments", "# nothing\n\n", None),
    ("top-level scalar", "42\n", 42),
]

# (name, YAML text, line, column, a fragment the message must contain)
ERRORS = [
    # outside the subset: refused by name
    ("anchor", "a: &x 1\n", 1, 4, "anchors"),
    ("anchor on a key", "&x a: 1\n", 1, 1, "anchors"),
    ("alias", "a: 1\nb: *x\n", 2, 4, "aliases"),
    ("tag", "a: !!str 1\n", 1, 4, "tags"),
    ("local tag", "- !custom x\n", 1, 3, "tags"),
    ("merge key", "base: {a: 1}\nother:\n  <<: {b: 2}\n", 3, 3, "merge keys"),
    ("merge key in flow", "a: {<<: {b: 2}}\n", 1, 5, "merge keys"),
    ("complex key", "? a\n: b\n", 1, 1, "complex mapping keys"),
    ("flow key", "[a, b]: c\n", 1, 7, "complex keys"),
    ("flow key in flow", "a: {[x]: 1}\n", 1, 5, "complex keys"),
    ("multiple documents", "a: 1\n---\nb: 2\n", 2, 1, "multiple documents"),
    ("content after end marker", "a: 1\n...\nb: 2\n", 3, 1, "multiple documents"),
    ("directive", "%YAML 1.2\n---\na: 1\n", 1, 1, "directives"),
    ("empty key", ": a\n", 1, 1, "key is missing"),
    # syntax errors, each with its place
    ("tab indentation", "a:\n\tb: 1\n", 2, 1, "tab character used for indentation"),
    ("tab after dash before a mapping", "-\tb: 1\n", 1, 3, "tab character"),
    ("duplicate key", "a: 1\nb: 2\na: 3\n", 3, 1, "duplicate key 'a' (already defined on line 1)"),
    ("duplicate key in flow", "a: {x: 1, x: 2}\n", 1, 11, "duplicate key 'x'"),
    ("duplicate typed key", "1: a\n01: b\n", 2, 1, "duplicate key 1"),
    ("bool and int keys collide", "1: a\ntrue: b\n", 2, 1, "same dict key"),
    ("unterminated double quote", 'a: "abc\n  b: 1\n', 1, 4, "unterminated quoted scalar"),
    ("unterminated single quote", "a: 'abc\n", 1, 4, "unterminated quoted scalar"),
    ("unterminated flow", "a: [1, 2\n", 1, 4, "unterminated flow collection"),
    ("missing comma in flow", 'a: ["x" "y"]\n', 1, 9, "expected ',' or ']'"),
    ("closing bracket at column 1", "a: [\n  1\n]\n", 3, 1, "bad indentation"),
    ("missing comma in flow mapping", "a: {x: 1\n  y: 2}\n", 2, 4, "expected ',' or '}'"),
    ("bad indentation", "a:\n    b: 1\n  c: 2\n", 3, 3, "bad indentation"),
    ("sequence entry under mapping", "a: 1\n- b\n", 2, 1, "found a sequence entry"),
    ("mapping after sequence", "- a\nb: 1\n", 2, 1, "expected a sequence entry"),
    ("line without colon", "a: 1\nb\n", 2, 1, "without ':'"),
    ("invalid escape", 'a: "x\\qy"\n', 1, 6, "invalid escape '\\q'"),
    ("surrogate escape", 'a: "\\ud800"\n', 1, 5, "not a Unicode character"),
    ("bad block header", "a: |0\n  x\n", 1, 5, "bad block scalar header"),
    ("text after block header", "a: > text\n  x\n", 1, 5, "bad block scalar header"),
    ("comment glued to block header", "a: |# c\n  x\n", 1, 5, "needs whitespace before '#'"),
    ("leading empty line too deep", "a: |\n     \n  x\n", 2, 6, "more spaces"),
    ("mapping on the key's line", "a: b: c\n", 1, 5, "quote the value if ': ' is part of it"),
    ("sequence on the key's line", "a: - b\n", 1, 4, "block sequence cannot start"),
    ("mapping on the --- line", "--- a: b\n", 1, 6, "'---' line"),
    ("comment without space", 'a: "x"# c\n', 1, 7, "needs whitespace before '#'"),
    ("text after quoted", 'a: "x" y\n', 1, 8, "unexpected text"),
    ("text after flow", "a: [1] x\n", 1, 8, "unexpected text"),
    ("text after end marker", "a: 1\n... x\n", 2, 5, "only a comment"),
    ("comment inside plain", "a: one # c\n  two\n", 2, 3, "interrupted by a comment"),
    ("key in multi-line plain", "a: one\n  b: two\n", 2, 4, "continues the multi-line scalar"),
    ("multi-line quoted key", '"a\n b": 1\n', 2, 4, "single line"),
    ("under-indented quoted line", 'a: "x\ny"\n', 2, 1, "bad indentation"),
    ("under-indented flow line", "a: [1,\n2]\n", 2, 1, "bad indentation"),
    ("document marker in quotes", 'a: "x\n---\n"\n', 2, 1, "document marker"),
    ("reserved @", "a: @x\n", 1, 4, "reserved"),
    ("reserved backtick", "a: `x`\n", 1, 4, "reserved"),
    ("percent starts a value", "a: %x\n", 1, 4, "'%' cannot start"),
    ("dash alone in flow", "a: [-]\n", 1, 5, "quote the value"),
    ("empty flow entry", "a: [1, , 2]\n", 1, 8, "unexpected ','"),
    ("non-printable character", "a: x\x07y\n", 1, 5, "U+0007"),
    ("C1 control character", "a: \x9b\n", 1, 4, "U+009B"),
    ("number too long", "a: " + "9" * 5000 + "\n", 1, 4, "cannot read this number"),
    ("key too long", "k" * 1025 + ": v\n", 1, 1, "longer than 1024"),
    ("indentation digit on top-level block", "--- |1\n  x\n", 1, 6, "remove it"),
    ("nesting too deep", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", 1, MAX_DEPTH + 1, "nesting deeper"),
]


class SubsetTable(StrictCase):
    def test_valid_cases(self):
        for name, text, expected in VALID:
            with self.subTest(name):
                self.assertSame(parse_yaml(text), expected, repr(text))

    def test_refused_features_and_errors(self):
        for name, text, line, col, fragment in ERRORS:
            with self.subTest(name):
                self.assertYamlError(text, line, col, fragment)

    def test_deep_block_nesting_is_refused_not_a_recursion_error(self):
        deep_map = "".join(" " * i + "k:\n" for i in range(3 * MAX_DEPTH)) + " " * (3 * MAX_DEPTH) + "v\n"
        deep_seq = "- " * (5 * MAX_DEPTH) + "x\n"
        for text in (deep_map, deep_seq, "[" * 100_000, "{a: " * 10_000):
            with self.assertRaises(YamlError) as caught:
                parse_yaml(text)
            self.assertIn("nesting deeper than", caught.exception.message)

    def test_nesting_at_the_limit_is_read(self):
        text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
        value = parse_yaml(text)
        for _ in range(MAX_DEPTH - 1):
            value = value[0]  # type: ignore[index]
        self.assertEqual(value, [])

    def test_yaml_11_and_12_differences_follow_12(self):
        # The Norway problem and friends: what YAML 1.1 (PyYAML) would turn into other types.
        text = "country: NO\nanswer: yes\nswitch: on\nmode: 010\nbig: 1_000\nbits: 0b101\nday: 2024-01-01\ntime: 1:30\n"
        self.assertSame(parse_yaml(text), {"country": "NO", "answer": "yes", "switch": "on", "mode": 10,
                                           "big": "1_000", "bits": "0b101", "day": "2024-01-01", "time": "1:30"})


class ErrorFormat(StrictCase):
    def test_message_line_and_caret(self):
        text = "name: x\nimage: y\nenv:\n  A: 1\n\n\nresources: {gpus: 1, gpus: 2}\n"
        with self.assertRaises(YamlError) as caught:
            parse_yaml(text, "config.yaml")
        err = caught.exception
        self.assertIsInstance(err, ConfigError)
        self.assertEqual((err.filename, err.line, err.col), ("config.yaml", 7, 22))
        self.assertEqual(str(err), "config.yaml:7:22: duplicate key 'gpus' (already defined on line 7)\n"
                                   "  resources: {gpus: 1, gpus: 2}\n"
                                   "                       ^")

    def test_source_line_has_no_line_break(self):
        with self.assertRaises(YamlError) as caught:
            parse_yaml("a: 1\r\nb: &x 2\r\n", "c.yaml")
        self.assertEqual(caught.exception.source_line, "b: &x 2")

    def test_default_filename(self):
        with self.assertRaises(YamlError) as caught:
            parse_yaml("a: *x\n")
        self.assertTrue(str(caught.exception).startswith("<string>:1:4: aliases"))

    def test_error_at_end_of_input_points_into_the_text(self):
        err = self.assertYamlError("a: [1,\n  2,\n", 1, 4, "unterminated")
        self.assertEqual(err.source_line, "a: [1,")


class Positions(StrictCase):
    def test_seed_config_positions(self):
        value, positions = parse_yaml_located(SEED_CONFIG, "config.yaml")
        self.assertSame(value, SEED_VALUE)
        self.assertEqual(positions[()], (1, 1))
        self.assertEqual(positions[("name",)], (1, 1))
        self.assertEqual(positions[("env",)], (6, 1))
        self.assertEqual(positions[("env", "LR")], (8, 3))
        self.assertEqual(positions[("resources", "memory")], (17, 3))
        self.assertEqual(positions[("metrics", 1)], (21, 5))

    def test_flow_empty_and_nested_positions(self):
        text = "---\na: {b: [x, y: 1], c: }\nseq:\n- \n- - z\n"
        _, positions = parse_yaml_located(text)
        self.assertEqual(positions[()], (2, 1))
        self.assertEqual(positions[("a", "b")], (2, 5))
        self.assertEqual(positions[("a", "b", 1)], (2, 12))
        self.assertEqual(positions[("a", "b", 1, "y")], (2, 12))
        self.assertEqual(positions[("a", "c")], (2, 19))
        self.assertEqual(positions[("seq", 0)], (4, 1))
        self.assertEqual(positions[("seq", 1, 0)], (5, 5))

    def test_every_node_has_a_position(self):
        value, positions = parse_yaml_located(SEED_CONFIG)

        def paths(node, path=()):
            yield path
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, child in items:
                yield from paths(child, path + (key,))
        self.assertEqual(set(paths(value)), set(positions))


# -- the yaml-test-suite ---------------------------------------------------------------------

# Valid cases outside the subset whose suite entry has no JSON value (json_docs is null), but
# which the reader accepts; expected values written by hand from the spec and the suite's events.
HAND_CHECKED = {
    "4ABK": {"unquoted": "separate", "http://foo.com": None, "omitted value": None},
}
# Cases whose in_subset flag looks wrong: none found. (Keep the reason with any id added here.)
MISLABELLED: dict[str, str] = {}


class YamlTestSuite(StrictCase):
    def setUp(self):
        self.cases = suite_cases()

    def outcome(self, case):
        try:
            return "value", parse_yaml(case["yaml"], case["id"])
        except YamlError as exc:
            return "error", exc

    def test_suite_is_complete(self):
        self.assertEqual(len(self.cases), 402)
        self.assertEqual(sum(c["in_subset"] for c in self.cases), 142)
        self.assertEqual(sum(c["error"] for c in self.cases), 94)

    def test_in_subset_cases_give_the_json_value(self):
        for case in self.cases:
            if case["in_subset"] and case["id"] not in MISLABELLED:
                with self.subTest(case["id"], name=case["name"]):
                    kind, got = self.outcome(case)
                    self.assertEqual(kind, "value", f"refused: {got}")
                    self.assertSame(got, case["json_docs"][0], repr(case["yaml"]))

    def test_error_cases_raise_yaml_error(self):
        for case in self.cases:
            if case["error"]:
                with self.subTest(case["id"], name=case["name"]):
                    kind, got = self.outcome(case)
                    self.assertEqual(kind, "error", f"accepted invalid YAML as {got!r}")

    def test_other_cases_are_refused_or_exact(self):
        for case in self.cases:
            if case["error"] or case["in_subset"]:
                continue
            with self.subTest(case["id"], name=case["name"]):
                kind, got = self.outcome(case)
                if kind == "error":
                    continue
                docs = case["json_docs"]
                if docs is None:
                    self.assertIn(case["id"], HAND_CHECKED, f"accepted as {got!r}; no JSON to check it")
                    self.assertSame(got, HAND_CHECKED[case["id"]])
                else:
                    self.assertSame(got, docs[0] if docs else None, repr(case["yaml"]))


# -- PyYAML as a second opinion --------------------------------------------------------------

def core12_loader():
    """A PyYAML SafeLoader whose implicit typing is the YAML 1.2 core schema.

    PyYAML resolves plain scalars by YAML 1.1, where yes/no/on/off are bools, 010 is octal 8,
    1_000 and 1:30 are ints, 0b101 is binary and 2024-01-01 a date. The loader below drops all
    of PyYAML's implicit resolvers (also the merge '<<' and '=' ones) and adds the core schema's
    regexes for null, bool, int (decimal, 0o, 0x) and float, with constructors that read 0o17,
    0x1F and 010 as YAML 1.2 does. Only plain-scalar typing differs from stock PyYAML.
    """
    class Core12Loader(yaml.SafeLoader):
        yaml_implicit_resolvers: dict = {}

    def construct_int(loader, node):
        text = loader.construct_scalar(node)
        return int(text[2:], 16) if text.startswith("0x") else int(text[2:], 8) if text.startswith("0o") else int(text)

    def construct_float(loader, node):
        text = loader.construct_scalar(node)
        if text.lower().lstrip("+-") == ".inf":
            return -math.inf if text.startswith("-") else math.inf
        return math.nan if text.lower() == ".nan" else float(text)

    resolvers = [
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
        ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+0123456789."),
        ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ]
    for tag, regex, first in resolvers:
        Core12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{regex})$"), list(first))
    Core12Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Core12Loader.add_constructor("tag:yaml.org,2002:float", construct_float)
    return Core12Loader


# In-subset suite cases where PyYAML 6 departs from YAML 1.2 (it errs or reads another value).
PYYAML_DEVIATIONS = {
    **dict.fromkeys(["4MUZ/00", "4MUZ/01", "4MUZ/02", "5MUD", "9SA2", "K3WX", "NJ66", "VJP3/01"],
                    "PyYAML wants a flow mapping's ':' on the line where its key ends"),
    **dict.fromkeys(["58MP", "5T43", "DBG4", "HM87/00"],
                    "PyYAML refuses a plain scalar starting with ':' inside a flow collection"),
    **dict.fromkeys(["652Z", "HM87/01"], "PyYAML reads '?x' inside a flow collection as an explicit key"),
    **dict.fromkeys(["DK3J", "FP8R"], "PyYAML refuses a top-level block scalar whose lines start at column 1"),
    **dict.fromkeys(["JEF9/02", "L24T/01"],
                    "PyYAML drops a block scalar's last line break when the input ends without one"),
}
# Table cases PyYAML reads differently, for the same reasons.
PYYAML_TABLE_DEVIATIONS = {
    "plain starting with safe indicators": "PyYAML reads '?x' in a sequence entry as an explicit key",
    **dict.fromkeys(["tab after colon", "trailing tabs", "tab inside values", "tab-only blank line"],
                    "PyYAML refuses tabs in some places YAML 1.2 allows them as separators or text"),
}


def yaml_words():
    """Strings that are valid plain scalars in both block and flow context, in both parsers."""
    return ["alpha", "beta gamma", "x:y", "http://h:80/p#f", "a#b", "ünï ☮", "train_loss", "8g", "./src",
            "-x", "a - b", "path/to", "yes", "no", "on", "Off", "1_000", "0b101", "2024-01-01", "1:30",
            "a'b", 'a"b', "it is", "C:\\dir"]


def yaml_quoted_only():
    """Strings that must be quoted to stay strings."""
    return ["10", "true", "null", "", " pad ", "a: b", "# x", "[x]", "{y}", "- z", "~", ".inf", "&a", "*a",
            "!t", "%p", "@q", "`r", "|", ">", "x #y", "tab\there", "é😀", "<<"]


# (value, spellings) for typed plain scalars, all read the same by YAML 1.2 core.
TYPED = [
    (10, ["10", "010", "+10", "0xA", "0o12"]), (-3, ["-3", "-03"]), (0, ["0", "-0", "0x0"]),
    (1.5, ["1.5", "15e-1", "0.15e1", "1.50"]), (1000.0, ["1e3", "1000.0", "1.0e+3", "1E3"]), (0.5, [".5", "+.5"]),
    (math.inf, [".inf", ".Inf", "+.INF"]), (-math.inf, ["-.inf"]), (math.nan, [".nan", ".NaN", ".NAN"]),
    (True, ["true", "True", "TRUE"]), (False, ["false", "FALSE"]), (None, ["~", "null", "Null", "NULL"]),
]


class DocumentGenerator:
    """Random YAML documents in many styles, each paired with the value it means.

    Collections are written block-style (indented by 1, 2 or 4, indentless under a key, compact
    in sequences) or flow-style; strings plain, single- or double-quoted (some with \\u escapes,
    some folded over two lines), or as literal blocks; typed scalars in their several spellings;
    with comments and blank lines in between.
    """

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.kept = False  # the last entry was a '|+' block, which would take a blank line as its own

    def document(self) -> tuple[str, object]:
        value = self.data(0)
        if isinstance(value, (dict, list)) and value and self.r.random() < 0.8:
            lines = self.block(value, 0)
        else:
            lines = [self.flow(value) if isinstance(value, (dict, list)) else self.scalar(value, True)]
        head = self.r.choice(["", "---\n", "# generated\n", "--- # start\n"])
        return head + "\n".join(lines) + "\n" + self.r.choice(["", "...\n", "# end\n"]), value

    def data(self, depth: int) -> object:
        r = self.r
        roll = r.random()
        if depth >= 4 or roll < 0.45:
            return self.leaf()
        if roll < 0.75:
            keys = r.sample(yaml_words() + yaml_quoted_only(), r.randint(0, 4))
            return {key: self.data(depth + 1) for key in keys}
        return [self.data(depth + 1) for _ in range(r.randint(0, 4))]

    def leaf(self) -> object:
        r = self.r
        roll = r.random()
        if roll < 0.4:
            return r.choice(TYPED)[0]
        if roll < 0.9:
            return r.choice(yaml_words() + yaml_quoted_only())
        return r.choice(["line one\nline two\n", "a\n  b\nc", "x\n\ny\n\n", "cmd --flag\n"])

    def scalar(self, value: object, flow: bool) -> str:
        """One-line text for a scalar, in a random style that keeps its value."""
        r = self.r
        if not isinstance(value, str):
            spellings = next(s for v, s in TYPED if same(v, value))
            return r.choice(spellings)
        styles = ["single", "double"] + (["plain"] * 3 if value in yaml_words() else [])
        style = r.choice(styles)
        if style == "plain":
            return value
        if style == "single" and "\t" not in value and "\n" not in value:
            return "'" + value.replace("'", "''") + "'"
        text = value.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace("\n", "\\n")
        if r.random() < 0.3:
            text = "".join(f"\\u{ord(c):04x}" if 0x7f < ord(c) < 0x10000 else c for c in text)
        return f'"{text}"'

    def flow(self, value: object) -> str:
        if isinstance(value, dict):
            items = [f"{self.scalar(k, True)}{self.r.choice([':', ' :'])} {self.flow(v)}" for k, v in value.items()]
            return "{" + ", ".join(items) + self.r.choice(["", ","] if items else [""]) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(self.flow(v) for v in value) + "]"
        return self.scalar(value, True)

    def block(self, value: dict | list, indent: int) -> list[str]:
        """Lines for a non-empty collection with its entries at column indent."""
        pad, r, out = " " * indent, self.r, []
        entries = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        for key, child in entries:
            head = f"{pad}-" if isinstance(value, list) else f"{pad}{self.scalar(key, False)}:"
            if r.random() < 0.15:
                out.append(pad + "# a comment" if self.kept or r.random() < 0.5 else "")
            self.kept = False
            out.extend(self.entry(head, child, indent, isinstance(value, dict)))
        return out

    def entry(self, head: str, child: object, indent: int, in_mapping: bool) -> list[str]:
        r = self.r
        if isinstance(child, (dict, list)) and child and r.random() < 0.75:
            if not in_mapping and r.random() < 0.5:  # compact: '- key: v' or '- - v'
                lines = self.block(child, indent + 2)
                first = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
                lines[first] = f"{' ' * indent}- {lines[first][indent + 2:]}"
                return [line for i, line in enumerate(lines) if i >= first]
            step = 0 if in_mapping and isinstance(child, list) and r.random() < 0.3 else r.choice([1, 2, 4])
            return [head + r.choice(["", "  # nested"])] + self.block(child, indent + step)
        if isinstance(child, (dict, list)):
            return [f"{head} {self.flow(child)}"]
        if isinstance(child, str) and "\n" in child and child.strip() and child[0] != " " and r.random() < 0.7:
            chomp = "-" if not child.endswith("\n") else "+" if child.endswith("\n\n") else ""
            self.kept = chomp == "+"
            body = child[:-1] if child.endswith("\n") else child
            return [f"{head} |{chomp}"] + [" " * (indent + 2) + line if line else "" for line in body.split("\n")]
        if child is None and r.random() < 0.3:
            return [head]
        text = self.scalar(child, False)
        if " " in text[1:-1] and text[0] in "'\"" and "  " not in text and r.random() < 0.5:
            cut = text.index(" ", 1)  # fold a quoted scalar over two lines
            return [f"{head} {text[:cut]}", " " * (indent + 2) + text[cut + 1:]]
        return [f"{head} {text}" + r.choice(["", "", "  # note"])]


@unittest.skipIf(yaml is None, "PyYAML is not installed (pip install pyyaml)")
class PyYamlDifferential(StrictCase):
    """Documents in the subset must read the same with PyYAML, once its YAML 1.1 typing of plain
    scalars is replaced by YAML 1.2 core (see core12_loader): structure and strings exactly."""

    @classmethod
    def setUpClass(cls):
        cls.loader = core12_loader()

    def pyyaml(self, text):
        return yaml.load(text, Loader=self.loader)  # noqa: S506 - a SafeLoader subclass

    def test_table_cases(self):
        for name, text, expected in VALID:
            if name not in PYYAML_TABLE_DEVIATIONS:
                with self.subTest(name):
                    self.assertSame(self.pyyaml(text), expected, repr(text))

    def test_suite_in_subset_cases(self):
        for case in suite_cases():
            if case["in_subset"] and case["id"] not in PYYAML_DEVIATIONS:
                with self.subTest(case["id"]):
                    self.assertSame(parse_yaml(case["yaml"]), self.pyyaml(case["yaml"]), repr(case["yaml"]))

    def test_pyyaml_deviations_still_deviate(self):
        for case in suite_cases():
            if case["id"] in PYYAML_DEVIATIONS:
                with self.subTest(case["id"], reason=PYYAML_DEVIATIONS[case["id"]]):
                    try:
                        theirs = self.pyyaml(case["yaml"])
                    except yaml.YAMLError:
                        continue
                    self.assertFalse(same(theirs, case["json_docs"][0]), "PyYAML now agrees: drop the entry")

    def test_generated_documents(self):
        for seed in range(400):
            text, expected = DocumentGenerator(seed).document()
            with self.subTest(seed=seed):
                self.assertSame(parse_yaml(text), expected, f"reader, seed {seed}:\n{text}")
                self.assertSame(self.pyyaml(text), expected, f"PyYAML, seed {seed}:\n{text}")

    def test_config_examples(self):
        for name, text, expected in CONFIG_EXAMPLES:
            with self.subTest(name):
                self.assertSame(self.pyyaml(text), expected)


# -- bounded fuzzing -------------------------------------------------------------------------

FUZZ_CHARS = list(":-#'\" \t\n[]{},|>&*!?%@`\\.0123456789ab~") + ["\r\n", "\ufeff", "\x85", "\u2028", "---",
                                                                  "...", "- ", ": ", " #", "  ", "\t"]


def mutate(r: random.Random, text: str) -> str:
    """Delete, insert, duplicate or swap a few characters, favouring YAML's indicators."""
    chars = list(text)
    for _ in range(r.randint(1, 4)):
        op, i = r.random(), r.randint(0, len(chars))
        if op < 0.3 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op < 0.6:
            chars.insert(i, r.choice(FUZZ_CHARS))
        elif chars:
            j = r.randrange(len(chars))
            if op < 0.8:
                chars.insert(i, chars[j])
            else:
                k = min(i, len(chars) - 1)
                chars[j], chars[k] = chars[k], chars[j]
    return "".join(chars)


TRICKY_STRINGS = [
    "yes", "no", "on", "off", "NO", "y", "Y", "010", "0o17", "0x1F", "1_000", "0b101", "2024-01-01", "1:30",
    "12:30:45", "null", "Null", "~", "", " ", "-", "--", "---", "...", "- a", "a: b", "a:b", "# x", "a #b", "a#b",
    " lead", "trail ", "tab\there", "\t", "new\nline", "a\n", "a\n\n", "\n", "\na", "multi\nline\ntext\n",
    "x\n  indented\n", "?", "? x", ":", "[x]", "{x}", "&a", "*a", "!a", "|", ">", "'q'", '"q"', "%x", "@x", "`x",
    "<<", "=", ".inf", ".nan", "-.inf", ".5", "._", "1e3", "1.0", "+1", "-0", "true", "True", "FALSE", "ünïcödé",
    "😀", "a😀", "\x85", "\u2028", "\u2029", "\ufeff", "\x00", "\x07", "\x1b", "\x7f", "\x9f", "\ufffe", "\xa0",
    "C:\\path", "http://x:8080/a#b", "./src", "a, b", "it's", "\\", '"', "'", "line  \nnext", "\r\n", "a\rb",
    "8g", "key::", "a:", "a :b", "x\n\n\ny\n\n", "é:", "-x", "_x", "a" * 300,
]


def random_string(r: random.Random) -> str:
    roll = r.random()
    if roll < 0.5:
        return r.choice(TRICKY_STRINGS)
    if roll < 0.75:
        return "".join(r.choice(FUZZ_CHARS + ["ü", "😀", "\x00", "é"]) for _ in range(r.randint(0, 10)))
    if roll < 0.9:
        return "".join(r.choice(TRICKY_STRINGS) for _ in range(r.randint(1, 3)))
    pools = [(0x20, 0x7e), (0, 0x1f), (0x7f, 0x9f), (0xa0, 0xd7ff), (0xe000, 0xffff), (0x10000, 0x10ffff)]
    return "".join(chr(r.randint(*r.choice(pools))) for _ in range(r.randint(0, 8)))


def random_data(r: random.Random, depth: int = 0) -> object:
    roll = r.random()
    if depth >= 5 or roll < 0.4:
        kind = r.random()
        if kind < 0.5:
            return random_string(r)
        if kind < 0.65:
            return r.choice([0, 1, -1, 7, 10**30, -(10**40), 2**63, r.randint(-10**9, 10**9)])
        if kind < 0.85:
            return r.choice([0.0, -0.0, 1.5, 1e20, 1e-7, -2.5e300, 1e16, math.inf, -math.inf, math.nan, r.random()])
        return r.choice([True, False, None])
    if roll < 0.7:
        keys = [random_string(r) if r.random() < 0.85 else r.choice([0, -5, 1.5, True, None])
                for _ in range(r.randint(0, 4))]
        return {k: random_data(r, depth + 1) for k in keys}
    return [random_data(r, depth + 1) for _ in range(r.randint(0, 4))]


class Fuzz(StrictCase):
    def assert_value_or_yaml_error(self, text: str, label: str) -> None:
        try:
            parse_yaml(text)
        except YamlError:
            pass
        except Exception as exc:  # the point of the test: nothing but YamlError may escape
            self.fail(f"{label}: {type(exc).__name__}: {exc} for {text!r}")

    def test_random_bytes(self):
        deadline = time.monotonic() + FUZZ_SECONDS
        for seed in range(5000):
            if time.monotonic() > deadline:
                break
            r = random.Random(seed)
            data = bytes(r.randrange(256) for _ in range(r.randint(0, 80)))
            self.assert_value_or_yaml_error(data.decode("utf-8", errors="replace"), f"bytes seed {seed}")

    def test_mutations_of_valid_documents(self):
        corpus = [SEED_CONFIG] + [text for _, text, _ in VALID + CONFIG_EXAMPLES] + [t for _, t, *_ in ERRORS[:20]]
        corpus += [case["yaml"] for case in suite_cases()]
        deadline = time.monotonic() + FUZZ_SECONDS
        for seed in range(20000):
            if time.monotonic() > deadline:
                break
            r = random.Random(seed)
            self.assert_value_or_yaml_error(mutate(r, r.choice(corpus)), f"mutation seed {seed}")

    def test_round_trip_random_data(self):
        deadline = time.monotonic() + FUZZ_SECONDS
        for seed in range(5000):
            if time.monotonic() > deadline:
                break
            data = random_data(random.Random(seed))
            text = dump_yaml(data)
            self.assertSame(parse_yaml(text), data, f"seed {seed}:\n{text}")
            if yaml is not None:
                self.assertSame(yaml.safe_load(text), data, f"PyYAML, seed {seed}:\n{text}")


# -- the writer ------------------------------------------------------------------------------

class Writer(StrictCase):
    def round_trip(self, data: object) -> str:
        text = dump_yaml(data)
        self.assertSame(parse_yaml(text), data, text)
        if yaml is not None:
            self.assertSame(yaml.safe_load(text), data, f"PyYAML:\n{text}")
        return text

    def test_seed_config_is_readable_block_yaml(self):
        self.assertEqual(self.round_trip(SEED_VALUE), """\
name: mnist-cnn-baseline
image: pytorch/pytorch:2.2.0-cuda12.1-cudnn8-runtime
entrypoint: python train.py
workdir: /workspace
env:
  EPOCHS: 10
  LR: 0.001
mounts:
  code: ./src
  data: ./data
resources:
  gpus: 1
  cpu: 4
  memory: "8g"
metrics:
  - train_loss
  - val_accuracy
""")

    def test_ambiguous_strings_are_quoted(self):
        for text in ["yes", "on", "010", "null", "1_000", "0b101", "2024-01-01", "1:30", "a: b", "# x", " x", "x ",
                     "", "a\tb", "\x07", "-x", "- x", "?x", "[x", "{x", "&x", "*x", "!x", "|x", ">x", "'x", '"x',
                     "%x", "@x", "`x", "~", "true", "1e3", ".inf", "...", "---", "<<", "=", "NO", "Y", "\u2028"]:
            with self.subTest(text=text):
                written = self.round_trip({"k": text})
                self.assertTrue(written.startswith('k: "'), written)

    def test_plain_strings_stay_plain(self):
        for text in ["train_loss", "python train.py", "./src", "/workspace", "http://x:8080/a#b", "a:b", "v1.2",
                     "ünï", "it's", "C:\\dir", "user@host", "a-b"]:
            with self.subTest(text=text):
                self.assertEqual(self.round_trip({"k": text}), f"k: {text}\n")

    def test_multi_line_strings(self):
        self.assertEqual(self.round_trip({"run": "set -e\npython train.py\n"}),
                         "run: |\n  set -e\n  python train.py\n")
        self.assertEqual(self.round_trip({"run": "a\n  b"}), "run: |-\n  a\n    b\n")
        self.assertEqual(self.round_trip(["a\n\n"]), "- |+\n  a\n\n")
        self.assertEqual(self.round_trip(" a\nb"), '" a\\nb"\n')  # a leading space would need a digit
        self.assertEqual(self.round_trip("x\t\ny"), '"x\\t\\ny"\n')

    def test_numbers_and_constants(self):
        self.assertEqual(self.round_trip([1.0, 1e20, 1.5e-07, -0.0, math.inf, -math.inf, 10**30, True, None]),
                         "- 1.0\n- 1.0e+20\n- 1.5e-07\n- -0.0\n- .inf\n- -.inf\n"
                         "- 1000000000000000000000000000000\n- true\n- null\n")
        self.assertEqual(dump_yaml(math.nan), ".nan\n")
        self.assertTrue(math.isnan(parse_yaml(dump_yaml(math.nan))))  # type: ignore[arg-type]

    def test_empty_collections_and_key_order(self):
        self.assertEqual(self.round_trip({}), "{}\n")
        self.assertEqual(self.round_trip([]), "[]\n")
        self.assertEqual(self.round_trip({"z": {}, "a": [], "m": [[], {}]}), "z: {}\na: []\nm:\n  - []\n  - {}\n")

    def test_non_string_keys(self):
        self.assertEqual(self.round_trip({1: "a", False: "b", None: "c", 2.5: "d", "1": "e"}),
                         '1: a\nfalse: b\nnull: c\n2.5: d\n"1": e\n')

    def test_compact_nesting(self):
        self.assertEqual(self.round_trip([{"name": "a", "x": [1, [2]]}, [3, {"b": None}]]),
                         "- name: a\n  x:\n    - 1\n    - - 2\n- - 3\n  - b: null\n")

    def test_tuples_are_written_as_lists(self):
        self.assertEqual(parse_yaml(dump_yaml({"a": (1, 2)})), {"a": [1, 2]})

    def test_refusals(self):
        for data, error in [({1, 2}, TypeError), (b"x", TypeError), ({(1,): 2}, TypeError), (object(), TypeError),
                            ("\ud800", ValueError), ({"k" * 1025: 1}, ValueError)]:
            with self.subTest(data=repr(data)[:30]):
                with self.assertRaises(error):
                    dump_yaml(data)
        deep: list = []
        for _ in range(MAX_DEPTH):
            deep = [deep]
        with self.assertRaises(ValueError):
            dump_yaml(deep)
        self.round_trip(deep[0])  # the limit itself is fine


# -- configs the product must read -----------------------------------------------------------

CONFIG_EXAMPLES = [
    ("the v0.1 brief's config", SEED_CONFIG, SEED_VALUE),
    ("the same with CRLF, a BOM and document markers", "\ufeff---\r\n" + SEED_CONFIG.replace("\n", "\r\n") + "...\r\n",
     SEED_VALUE),
    ("quickstart", """\
# The quickstart
name: quickstart
image: "runpilot-test-python:latest"
entrypoint: "python train.py"

env:
  EPOCHS: 8
  LR: 0.05

mounts:
  code: "."          # this folder, at /workspace

metrics:
  - train_loss
  - val_accuracy
""", {"name": "quickstart", "image": "runpilot-test-python:latest", "entrypoint": "python train.py",
      "env": {"EPOCHS": 8, "LR": 0.05}, "mounts": {"code": "."}, "metrics": ["train_loss", "val_accuracy"]}),
    ("flow style and a list entrypoint", """\
name: local
engine: local
entrypoint: ["python3", "train.py", --epochs, 3]
env: {EPOCHS: 8, LR: 5e-2, DEBUG: "yes", SEED: 010}
metrics: [train_loss, val_accuracy]
""", {"name": "local", "engine": "local", "entrypoint": ["python3", "train.py", "--epochs", 3],
      "env": {"EPOCHS": 8, "LR": 0.05, "DEBUG": "yes", "SEED": 10}, "metrics": ["train_loss", "val_accuracy"]}),
    ("multi-line entrypoint", """\
name: sweep
image: python:3.12-slim
entrypoint: |
  set -e
  pip install -r requirements.txt
  python train.py --lr 0.01   # a comment inside a block scalar is text
description: >-
  A sweep over learning rates,
  folded into one line.
env:
  NOTE: 'it''s "quoted"'
  URL: http://minio:9000/bucket#frag
  EMPTY:
  NORWAY: NO
resources:
  gpus: 0
  memory: 8g
""", {"name": "sweep", "image": "python:3.12-slim",
      "entrypoint": "set -e\npip install -r requirements.txt\npython train.py --lr 0.01   "
                    "# a comment inside a block scalar is text\n",
      "description": "A sweep over learning rates, folded into one line.",
      "env": {"NOTE": "it's \"quoted\"", "URL": "http://minio:9000/bucket#frag", "EMPTY": None, "NORWAY": "NO"},
      "resources": {"gpus": 0, "memory": "8g"}}),
]


class ConfigExamples(StrictCase):
    def test_examples(self):
        for name, text, expected in CONFIG_EXAMPLES:
            with self.subTest(name):
                self.assertSame(parse_yaml(text, "config.yaml"), expected)
                self.assertSame(parse_yaml(dump_yaml(expected)), expected)

    def test_typo_position_for_the_validator(self):
        text = SEED_CONFIG.replace("env:", "enviroment:")
        _, positions = parse_yaml_located(text, "config.yaml")
        self.assertEqual(positions[("enviroment",)], (6, 1))


if __name__ == "__main__":
    unittest.main()
