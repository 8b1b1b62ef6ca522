"""The command line's frame (issue 22, item 5): handlers stay short, each sits in its family next
to its argument builder, one table of output formats drives list, show, compare and export, and
`--help` reads exactly as it did before the section was rearranged."""

import ast
import contextlib
import io
import os
import sys
import unittest
from pathlib import Path
from unittest import mock

from tests.common import RUNPILOT, RunsHome

import runpilot

HELP = Path(__file__).resolve().parent / "fixtures" / "help"
VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
SOURCE = RUNPILOT.read_text(encoding="utf-8")


def section(number: str) -> tuple[int, int]:
    """The first and last line (1-based) of the numbered section's banner and body."""
    lines = SOURCE.splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith("# ==== ")]
    first = next(i for i in starts if lines[i - 1].startswith(f"# ==== {number}. "))
    later = [i for i in starts if i > first]
    return first, (later[0] - 1 if later else len(lines))


def top_level() -> list[ast.stmt]:
    return ast.parse(SOURCE).body


class HelpUnchanged(unittest.TestCase):
    """`runpilot --help` and every command's --help, byte for byte as saved from main before the
    rearrangement (argparse words its help differently per Python: one folder per version)."""

    def help_of(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, {"COLUMNS": "80"}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = runpilot.main([*argv, "--help"])
        self.assertEqual((code, err.getvalue()), (0, ""))
        return out.getvalue()

    def test_every_help_page_is_as_saved(self):
        saved = HELP / VERSION
        if not saved.is_dir():
            self.skipTest(f"no help pages saved for Python {VERSION} in {saved} (python{VERSION} tests/help_pages.py writes them)")
        names = sorted(p.stem for p in saved.glob("*.txt"))
        self.assertEqual(names, sorted(["runpilot"] + [c[0] for c in runpilot.COMMANDS]))
        for name in names:
            with self.subTest(name=name):
                argv = () if name == "runpilot" else (name,)
                self.assertEqual(self.help_of(*argv), (saved / f"{name}.txt").read_text(encoding="utf-8"))


class Handlers(unittest.TestCase):
    def test_no_handler_is_over_25_lines(self):
        long = {n.name: n.end_lineno - n.lineno + 1 for n in top_level()
                if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_") and n.end_lineno - n.lineno >= 25}
        self.assertEqual(long, {})

    def test_every_command_has_a_handler_named_after_it(self):
        for name, func, _, _, add_arguments in runpilot.COMMANDS + runpilot.HIDDEN_COMMANDS:
            with self.subTest(command=name):
                stem = name.strip("_").replace("-", "_")
                self.assertEqual(func.__name__, f"cmd_{stem}")
                if add_arguments is not None:
                    self.assertEqual(add_arguments.__name__, f"_{stem}_arguments")


class Families(unittest.TestCase):
    """Section 21 reads by family: each handler under the same sub-banner as its argument builder, the
    sweep's resume with the sweep, the plot's helpers with the plot."""

    def families(self) -> dict[str, str]:
        """Each top-level name of section 21 -> the `# -- ` sub-banner above it."""
        first, last = section("21")
        lines = SOURCE.splitlines()
        banners = [(i + 1, line) for i, line in enumerate(lines) if first <= i + 1 <= last and line.startswith("# -- ")]
        found = {}
        for node in top_level():
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            name = getattr(node, "name", None) or getattr(target, "id", None)
            if first <= node.lineno <= last and name:
                above = [line for number, line in banners if number < node.lineno]
                found[name] = above[-1] if above else ""
        return found

    def test_each_handler_sits_with_its_arguments(self):
        family = self.families()
        for name, func, _, _, add_arguments in runpilot.COMMANDS + runpilot.HIDDEN_COMMANDS:
            if func.__name__ in family and add_arguments is not None:
                with self.subTest(command=name):
                    self.assertNotEqual(family[func.__name__], "")
                    self.assertEqual(family[add_arguments.__name__], family[func.__name__])

    def test_helpers_sit_with_the_command_they_serve(self):
        family = self.families()
        for helper, command in [("_resume_sweep", "cmd_sweep"), ("_requeue", "cmd_sweep"),
                                ("_plot_html", "cmd_plot"), ("_plot_style", "cmd_plot"),
                                ("print_view", "FORMATS"), ("list_table", "FORMATS")]:
            with self.subTest(helper=helper):
                self.assertEqual(family[helper], family[command])

    def test_the_families_are_there(self):
        banners = set(self.families().values())
        for family in ("running", "looking", "managing", "output formats"):
            with self.subTest(family=family):
                self.assertTrue(any(b.startswith(f"# -- {family}") for b in banners), banners)


class Formats(RunsHome):
    """The FORMATS table is what list, show, compare and export print through: a format put in it is
    chosen by the spellings of today, and a new one is taken by --format at once."""

    def setUp(self):
        super().setUp()
        self.run_a = self.add_run("a", samples=[{"step": 1, "loss": 0.5}])
        self.run_b = self.add_run("b", samples=[{"step": 1, "loss": 0.25}])
        self.seen = []

    def recorder(self, label: str):
        def write(found) -> None:
            self.seen.append((label, type(found).__name__))
            runpilot.echo(f"<{label}>")
        return write

    def check(self, view: str, name: str, *argv: str) -> None:
        with mock.patch.dict(runpilot.FORMATS[view], {name: self.recorder(name)}):
            code, out, err = self.cli(*argv)
        self.assertEqual((code, out, err), (0, f"<{name}>\n", ""))
        self.assertEqual(self.seen.pop(), (name, f"{view.capitalize()}View"))

    def test_todays_spellings_pick_their_entry_of_the_table(self):
        for view, name, argv in [
                ("list", "table", ["list"]), ("list", "csv", ["list", "--format", "csv"]),
                ("list", "json", ["list", "--json"]), ("list", "json", ["list", "--json", "--format", "csv"]),
                ("list", "ids", ["list", "-q"]), ("list", "ids", ["list", "-q", "--json"]),
                ("show", "text", ["show", "latest"]), ("show", "json", ["show", "latest", "--json"]),
                ("compare", "table", ["compare", "-1", "-2"]),
                ("export", "csv", ["export", "latest"]), ("export", "jsonl", ["export", "latest", "--format", "jsonl"]),
                ("export", "tensorboard", ["export", "latest", "--format", "tensorboard"]),
                ("export", "mlflow", ["export", "latest", "--format", "mlflow"])]:
            with self.subTest(argv=argv):
                self.check(view, name, *argv)

    def test_a_new_format_is_one_entry(self):
        for view, argv in [("list", ["list"]), ("export", ["export", "latest"])]:
            with self.subTest(view=view):
                self.check(view, "yaml", *argv, "--format", "yaml")
        self.assertNotIn("yaml", runpilot.format_choices("export"))  # the patch is gone again
        code, out, err = self.cli("export", "latest", "--format", "yaml")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice: 'yaml'", err)

    def test_the_choices_of_format_come_from_the_table(self):
        self.assertEqual(runpilot.format_choices("list"), ("table", "csv"))
        self.assertEqual(runpilot.format_choices("export"), ("csv", "jsonl", "tensorboard", "mlflow"))
        self.assertEqual(list(runpilot.FORMATS["show"]), ["text", "json"])
        self.assertEqual(list(runpilot.FORMATS["compare"]), ["table"])

    def test_the_real_writers_still_print_what_they_did(self):
        code, out, _ = self.cli("list", "-q")
        self.assertEqual((code, sorted(out.split())), (0, sorted([self.run_a.id, self.run_b.id])))
        code, out, _ = self.cli("export", self.run_a.id, "--format", "jsonl")
        self.assertEqual((code, out), (0, f'{{"run_id": "{self.run_a.id}", "name": "a", "step": 1, "loss": 0.5}}\n'))


if __name__ == "__main__":
    unittest.main()
