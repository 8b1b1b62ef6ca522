"""Write the saved `--help` pages that tests/test_cli_frame.py compares against, for the Python that
runs this (argparse words help differently per version): `python3.X tests/help_pages.py`.

Run it for each Python in tests/fixtures/help/ when a command's options change on purpose, and read
the diff before committing it."""

import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["COLUMNS"] = "80"

import runpilot  # noqa: E402


def page(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpilot.main([*argv, "--help"])
    return out.getvalue()


def main() -> None:
    folder = ROOT / "tests" / "fixtures" / "help" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runpilot.txt").write_text(page(), encoding="utf-8")
    for name, *_ in runpilot.COMMANDS:
        (folder / f"{name}.txt").write_text(page(name), encoding="utf-8")
    print(f"wrote {len(runpilot.COMMANDS) + 1} pages in {folder}")


if __name__ == "__main__":
    main()
