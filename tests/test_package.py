"""The shape the product promises: one stdlib-only module for Python 3.10+, version defined once."""

import ast
import shutil
import subprocess
import sys
import unittest

from tests.common import ROOT, RUNPILOT, HomeTestCase

import runpilot


class StandardLibraryOnly(unittest.TestCase):
    def test_every_import_is_in_the_standard_library(self):
        tree = ast.parse(RUNPILOT.read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
        outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
        self.assertEqual(outside, set())
        self.assertIn("sqlite3", names)  # the walk sees the imports at all

    def test_minimum_python_is_3_10(self):
        vermin = shutil.which("vermin")
        if not vermin:
            self.skipTest("vermin is not installed (pip install vermin; .ci/run installs it)")
        done = subprocess.run([vermin, "-t=3.10-", "--no-tips", "--violations", "--eval-annotations", str(RUNPILOT)],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_every_name_is_defined(self):
        """A name used but never imported or defined (an import moved into one function, a helper
        renamed on one branch) fails only on the path that reaches it: pyflakes finds them all."""
        try:
            from pyflakes import api, reporter
        except ImportError:
            self.skipTest("pyflakes is not installed (pip install pyflakes; .ci/run installs it)")
        import io
        out = io.StringIO()
        api.check(RUNPILOT.read_text(encoding="utf-8"), str(RUNPILOT), reporter.Reporter(out, out))
        undefined = [line for line in out.getvalue().splitlines() if "undefined name" in line]
        self.assertEqual(undefined, [])
        bad = api.check("def f():\n    return tarfile\n", "sample", reporter.Reporter(io.StringIO(), io.StringIO()))
        self.assertEqual(bad, 1)  # the check sees an undefined name at all


class Packaging(unittest.TestCase):
    def test_version_is_defined_once(self):
        pyproject = (ROOT / "pyproject.toml").read_text()
        self.assertIn('version = { attr = "runpilot.__version__" }', pyproject)
        self.assertIn('runpilot = "runpilot:main"', pyproject)
        self.assertIn('py-modules = ["runpilot"]', pyproject)
        self.assertNotRegex(pyproject, r'(?m)^version\s*=\s*"')
        self.assertRegex(runpilot.__version__, r"^\d+\.\d+\.\d+$")

    def test_top_level_holds_what_was_asked(self):
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
        if tracked.returncode != 0:
            self.skipTest("not a git checkout")
        top = {path.split("/")[0] for path in tracked.stdout.split()}
        self.assertLessEqual(top, {"runpilot.py", "pyproject.toml", "README.md", "tests", "examples",
                                   "LICENSE", ".ci", ".gitignore"})

    def test_readme_test_command_is_what_ci_runs(self):
        readme = (ROOT / "README.md").read_text()
        ci = (ROOT / ".ci" / "run").read_text()
        self.assertIn("python3 -m unittest -v", readme)
        self.assertIn("python3 -m unittest -v", ci)


class ImportedAsLibrary(HomeTestCase):
    def test_import_has_no_side_effects(self):
        probe = ("import signal, threading; before = [signal.getsignal(s) for s in (2, 15, 1)]; "
                 "import runpilot; print(threading.active_count(), [signal.getsignal(s) for s in (2, 15, 1)] == before)")
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(done.stdout.split(), ["1", "True"], done.stderr)  # no thread, no signal handler
        self.assertEqual(done.stderr, "")
        self.assertFalse(self.home.exists())
