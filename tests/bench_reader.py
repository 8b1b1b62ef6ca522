"""Issue 22 item 4: one streaming reader of metrics.json. Times `plot`, `show`, `show --json`,
`compare`, `export` (csv, jsonl) of a run of 1,000,000 samples (2 metrics, written by MetricLog),
whole process, best of 3, and peak RSS. With several RUNPILOT_PY files (before, after) the runs
alternate between them, so that the load of a shared machine falls on both alike.

    python3 tests/bench_reader.py [RUNPILOT_PY ...]      # prints a Markdown table
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import runpilot as rp  # noqa: E402
from bench import plot_run  # noqa: E402  (the test data is written by RunPilot's own MetricLog)


def main() -> int:
    programs = [Path(p).resolve() for p in sys.argv[1:]] or [HERE.parent / "runpilot.py"]
    home = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    store = rp.RunStore(home)
    store.ensure()
    a, b = plot_run(rp, store, "big", 1_000_000, 1), plot_run(rp, store, "big2", 1_000_000, 2)
    env = dict(os.environ, RUNPILOT_HOME=str(home), COLUMNS="80", NO_COLOR="1")
    cases = {"plot ID": ["plot", a, "--no-color"], "show ID": ["show", a], "show ID --json": ["show", a, "--json"],
             "compare ID1 ID2": ["compare", a, b], "export ID (csv)": ["export", a, "-o", str(home / "x.csv")],
             "export ID --format jsonl": ["export", a, "--format", "jsonl", "-o", str(home / "x.jsonl")]}
    print(f"load average {os.getloadavg()[0]:.1f}; programs: " + ", ".join(str(p) for p in programs))
    print("| command (1,000,000 samples) | " + " | ".join(f"wall / peak RSS ({i + 1})" for i in range(len(programs)))
          + " |\n|---|" + "---|" * len(programs))
    for label, args in cases.items():
        walls: dict[Path, list[float]] = {p: [] for p in programs}
        rss: dict[Path, int] = {}
        for _ in range(3):
            for program in programs:
                start = time.perf_counter()
                rss[program] = max(rss.get(program, 0), _run(program, args, env))
                walls[program].append(time.perf_counter() - start)
        cells = [f"{min(walls[p]):.2f} s / {rss[p] / 1024:.0f} MB" for p in programs]
        print(f"| `runpilot {label}` | " + " | ".join(cells) + " |", flush=True)
    return 0


def _run(program: Path, args: list, env: dict) -> int:
    """Run it; its peak RSS in KiB (ru_maxrss of a child of a fresh Python that does nothing else)."""
    code = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.PIPE); sys.stderr.buffer.write(done.stderr[-500:] if done.returncode else b''); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, sys.executable, str(program), *args], env=env,
                          capture_output=True, text=True)
    if done.stderr:
        print(f"{program} {args[0]} failed: {done.stderr}", file=sys.stderr)
    return int(done.stdout.strip() or 0)


if __name__ == "__main__":
    sys.exit(main())
