"""RunPilot: run a training job in a container, keep every byte it prints, remember the run.

Pipeline::

    config.yaml -> JobConfig -> engine argv -> container -> tee(logs.txt, METRIC) -> runs/<id>/ + runs.db

Examples::

    runpilot run examples/quickstart/config.yaml     # stream, record, exit with the job's status
    runpilot list                                     # newest runs first
    runpilot show latest                              # one run: files, metrics, command line

Exit status of ``runpilot run`` is the job's own status, except:

    0       the job succeeded          2    bad config or usage (nothing recorded)
    1       RunPilot error             124  the run hit its ``timeout``
    125     the engine failed to start the container (bad flag, missing image, daemon down)
    128+N   the run was stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)

The module is standard library only, Python 3.10+: copy it onto a box and run
``python runpilot.py run config.yaml``, install it (console script ``runpilot``), or import it.
"""

# ==== 2. Imports and version =================================================

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import importlib
import itertools
import json
import math
import operator
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class _LazyModule:
    """A module imported on first use, so `import runpilot` stays fast for `list` and `--help`."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self._name)
        globals()[self._name] = module  # later lookups go straight to the module
        return getattr(module, attr)


argparse = _LazyModule("argparse")
difflib = _LazyModule("difflib")
getpass = _LazyModule("getpass")
selectors = _LazyModule("selectors")
shutil = _LazyModule("shutil")
socket = _LazyModule("socket")
sqlite3 = _LazyModule("sqlite3")
subprocess = _LazyModule("subprocess")
unicodedata = _LazyModule("unicodedata")

__version__ = "0.4.0"

__all__ = [
    "ConfigError", "EngineError", "JobConfig", "Mount", "Resources", "RunPilotError",
    "RunRecord", "StoreError", "YamlError", "build_engine_argv", "dump_yaml", "load_config",
    "main", "parse_metric_line", "parse_yaml", "parse_yaml_located", "run_job",
]

# ==== 3. Constants ===========================================================

# Keys a config may have at the top level; anything else is a typo to report.
TOP_LEVEL_KEYS = ("name", "image", "entrypoint", "workdir", "env", "mounts", "resources",
                  "metrics", "engine", "timeout")
RESOURCE_KEYS = ("gpus", "cpu", "memory", "shm_size")
# What people write by habit from docker-compose and Kubernetes, for "did you mean".
KEY_SYNONYMS = {"environment": "env", "volumes": "mounts", "command": "entrypoint", "cmd": "entrypoint",
                "working_dir": "workdir", "cpus": "cpu", "gpu": "gpus", "mem": "memory", "shm": "shm_size"}
ENGINES = ("docker", "podman", "local")
# Where the mount called `code` appears when no workdir is given (the PyTorch images' WORKDIR).
DEFAULT_WORKDIR = "/workspace"
# Every other named mount appears at /mnt/<name>; top-level paths could shadow the image's own.
NAMED_MOUNT_ROOT = "/mnt"
# Label put on every container so it can always be traced back to its run.
RUN_LABEL = "runpilot.run_id"
# os.read size for the tee loop: large reads keep Python's per-byte cost negligible, and a
# METRIC-heavy read still parses within a few MB.
READ_SIZE = 256 << 10
# The pipe buffer asked for (Linux's default limit for an unprivileged pipe): the job can
# write ahead while the tee works on the previous read.
PIPE_SIZE = 1 << 20
# After a short read the tee waits this long for more: a live job is never held back by more
# than a millisecond, and a loud one is read in large chunks.
FILL_PAUSE = 0.001
# While output flows, signals, timeouts and the job's state are looked at this often.
HOUSEKEEPING_SECONDS = 0.05
# A METRIC line longer than this is not buffered whole: it is counted as malformed instead.
MAX_METRIC_LINE = 1 << 20
# How often the tee loop wakes up to look at signals and timeouts when the job is silent.
POLL_SECONDS = 0.2
# Grace period between SIGTERM and SIGKILL when a run is stopped (like `docker stop`).
DEFAULT_STOP_TIMEOUT = 10
# SQLite waits this long for a lock held by a parallel run before it gives up.
DB_TIMEOUT = 30.0
DB_SCHEMA_VERSION = 2
STATUSES = ("running", "succeeded", "failed", "interrupted", "timeout", "lost")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
METRIC_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*\Z")
RUN_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}\Z")
# How Docker ("No such image") and Podman ("image not known") say an image is not present.
IMAGE_MISSING_RE = re.compile(r"no such image|image not known|no such object|unable to find", re.IGNORECASE)
# An image reference as it may appear in a URL path unescaped: name[:tag][@digest].
DOCKER_IMAGE_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*\Z")
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\Z", re.IGNORECASE)
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?\Z", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Words in a failed run's last log lines that mean /dev/shm was too small.
SHM_HINT_RE = re.compile(rb"bus error|shared memory|/dev/shm|\bshm\b", re.IGNORECASE)

# ==== 4. Errors ==============================================================

class RunPilotError(Exception):
    """Root of every error RunPilot reports to a user; main() prints it once."""

    exit_code = 1


class ConfigError(RunPilotError):
    """A problem with a config file, located by file, line and column (1-based)."""

    exit_code = 2

    def __init__(self, message: str, filename: str | None = None,
                 line: int | None = None, col: int | None = None,
                 source_line: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.line = line
        self.col = col
        self.source_line = source_line
        self.others: list[ConfigError] = []  # further problems found in the same file

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.filename, self.line, self.col) if p is not None)
        text = f"{where}: {self.message}" if where else self.message
        if self.source_line is not None and self.col is not None:
            text += f"\n  {self.source_line}\n  {' ' * (self.col - 1)}^"
        return text


class UsageError(RunPilotError):
    """A command line that cannot be carried out as written."""

    exit_code = 2


class EngineError(RunPilotError):
    """The container engine is missing, not answering, or refused the job."""

    exit_code = 125


class GpuError(RunPilotError):
    """The GPUs asked for are not there, or the engine cannot hand them to a container."""

    exit_code = 1


class StoreError(RunPilotError):
    """The run folder or the database cannot be read or written."""

    exit_code = 1

def say(message: str) -> None:
    """RunPilot's own lines go to stderr, so stdout carries only the job's output."""
    print(f"runpilot: {message}", file=sys.stderr, flush=True)



# ==== 5. Data types ==========================================================

@dataclass(frozen=True)
class Mount:
    """A host folder bind-mounted into the job (for engine `local`: only named)."""

    source: str                 # absolute host path
    target: str                 # absolute path inside the container
    read_only: bool = False
    name: str | None = None     # key under `mounts:`; None for the "host:container" list form


@dataclass(frozen=True)
class Resources:
    """What the job may use; None means the engine's default."""

    gpus: int | str | tuple[str, ...] | None = None   # a count, "all", or device ids
    cpu: float | None = None
    memory: int | None = None                          # bytes
    shm_size: int | None = None                        # bytes


@dataclass(frozen=True)
class JobConfig:
    """A validated run config: what `runpilot run` needs, with paths made absolute."""

    name: str
    image: str | None
    entrypoint: str | tuple[str, ...]
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # values may hold ${VAR} references
    mounts: tuple[Mount, ...] = ()
    resources: Resources = Resources()
    metrics: tuple[str, ...] = ()
    engine: str | None = None
    timeout: float | None = None                        # seconds
    source: str | None = None                           # the config file it came from


@dataclass
class RunRecord:
    """One run as the index knows it (a row of runs.db, also kept in meta.json)."""

    id: str
    name: str
    status: str
    started_at: str
    path: str
    finished_at: str | None = None
    exit_code: int | None = None
    duration: float | None = None
    engine: str | None = None
    image: str | None = None
    last_metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    watched: list = field(default_factory=list)       # the metrics the config lists

# ==== 6. Files: written whole, privately, atomically =========================

def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a signal can cut a pipe write short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (logs and configs can hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace a file so that readers see the old or the new content, never a part.

    `durable` also flushes it to disk first, so a power cut cannot leave it empty.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

# ==== 7. YAML subset reader and writer =======================================
# RunPilot reads its config with this small reader so that the tool stays one
# standard-library file. The subset is what a run config needs and what people
# write by habit: block and flow collections, plain, quoted and block scalars,
# comments, one document. Anchors, aliases, tags, merge keys, complex keys,
# directives and multiple documents are refused by name with a located
# YamlError, never half-read. Plain scalars are typed by the YAML 1.2 core
# schema, so `no` stays a string and `010` is ten. dump_yaml writes block YAML
# that this reader and PyYAML's safe_load both read back to the same data.

_YAML_MAX_DEPTH = 100  # far beyond any config, and well inside Python's recursion limit
_YAML_MAX_KEY = 1024   # YAML's limit on an implicit key's length; PyYAML enforces it too

# Characters YAML allows in a stream (c-printable); others may appear only as escapes.
_YAML_NON_PRINTABLE = "[^\t\n\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_YAML_ASCII_NON_PRINTABLE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # the same, for ASCII text
_YAML_BLANK_RE = re.compile(r"[ \t]*(?:#.*)?$")      # nothing but whitespace or a comment
_YAML_WS_RE = re.compile(r"[ \t]*")
_YAML_END_RE = re.compile(r"[ \t]*$|[ \t]+#")        # what may follow a node on its line

# Plain scalars (YAML 1.2 ns-plain-first, ns-plain-char), for block and flow context. Whitespace
# is only space and tab: \s would also take NBSP and U+2028, which YAML reads as ordinary text.
_YAML_PLAIN_FIRST_BLOCK = r"(?:[^ \t\-?:,\[\]{}#&*!|>'\"%@`]|[-?:](?=[^ \t]))"
_YAML_PLAIN_CHAR_BLOCK = r"(?:[^ \t:#]|:(?=[^ \t])|(?<=[^ \t])#)"
_YAML_PLAIN_FIRST_FLOW = r"(?:[^ \t\-?:,\[\]{}#&*!|>'\"%@`]|[-?:](?=[^ \t,\[\]{}]))"
_YAML_PLAIN_CHAR_FLOW = r"(?:[^ \t:#,\[\]{}]|:(?=[^ \t,\[\]{}])|(?<=[^ \t])#)"


def _yaml_plain_pattern(first: str, char: str) -> str:
    """A one-line plain scalar: words of plain characters separated by spaces or tabs."""
    return f"{first}{char}*(?:[ \\t]+{char}+)*"


_YAML_PLAIN_BLOCK_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_FIRST_BLOCK, _YAML_PLAIN_CHAR_BLOCK))
_YAML_PLAIN_MORE_BLOCK_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_CHAR_BLOCK, _YAML_PLAIN_CHAR_BLOCK))
_YAML_PLAIN_FLOW_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_FIRST_FLOW, _YAML_PLAIN_CHAR_FLOW))
_YAML_PLAIN_MORE_FLOW_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_CHAR_FLOW, _YAML_PLAIN_CHAR_FLOW))
_YAML_PLAIN_KEY_RE = re.compile(
    f"({_yaml_plain_pattern(_YAML_PLAIN_FIRST_BLOCK, _YAML_PLAIN_CHAR_BLOCK)})[ \\t]*:(?=[ \\t]|$)")
_YAML_DQ_KEY_RE = re.compile(r'"(?:[^"\\]|\\.)*"[ \t]*:(?=[ \t]|$)')
_YAML_SQ_KEY_RE = re.compile(r"'(?:[^']|'')*'[ \t]*:(?=[ \t]|$)")
_YAML_DQ_SIMPLE_RE = re.compile(r'"([^"\\]*)"')      # one line, no escapes: the common case
_YAML_SQ_SIMPLE_RE = re.compile(r"'((?:[^']|'')*)'(?!')")  # (?!') keeps '' from closing it
_YAML_DQ_RUN_RE = re.compile(r'[^"\\ \t]+')
_YAML_SQ_RUN_RE = re.compile(r"[^' \t]+")
_YAML_HEX_RE = re.compile(r"[0-9A-Fa-f]+")
_YAML_BLOCK_HEADER_RE = re.compile(r"[|>](?:([1-9])([-+]?)|([-+])([1-9]?))?(?=[ \t]|$)")

_YAML_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
    "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
    "L": "\u2028", "P": "\u2029",
}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}

# What a node cannot start with, and why: features outside the subset are named.
_YAML_BAD_STARTS = {
    "&": "anchors (&name) are not supported; quote the value if '&' is text",
    "*": "aliases (*name) are not supported; quote the value if '*' is text",
    "!": "tags (!!str, !name) are not supported; quote the value if '!' is text",
    "%": "'%' cannot start a plain scalar; quote the value",
    "@": "'@' is reserved and cannot start a plain scalar; quote the value",
    "`": "'`' is reserved and cannot start a plain scalar; quote the value",
    ",": "unexpected ',' (an entry is missing before it)",
    "]": "unexpected ']'",
    "}": "unexpected '}'",
    "#": "'#' starts a comment only after whitespace; quote the value if it is text",
}
_YAML_BAD_STARTS_BEFORE_SPACE = {
    "?": "complex mapping keys ('? ') are not supported",
    ":": "a mapping key is missing before ':' (empty keys are not supported)",
}

# The YAML 1.2 core schema. Everything else a plain scalar can spell is a string.
_YAML_CONSTANTS: dict[str, object] = {
    "~": None, "null": None, "Null": None, "NULL": None,
    "true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
}
_YAML_INT_RE = re.compile(r"[-+]?[0-9]+")
_YAML_OCT_RE = re.compile(r"0o[0-7]+")
_YAML_HEX_INT_RE = re.compile(r"0x[0-9a-fA-F]+")
_YAML_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_YAML_INF_RE = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_YAML_NAN_RE = re.compile(r"\.(?:nan|NaN|NAN)")

# The writer's rules. A string is written plain only when it is made of these characters and
# neither YAML 1.2 nor PyYAML's YAML 1.1 would read it as anything but that same string.
_YAML_PLAIN_OK_RE = re.compile(r"[\w./](?:[\w ./:@+=,()~%^*!?<>;$\\&'#-]*[\w./@+=,()~%^*!?<>;$\\&'#-])?")
_YAML_NUMBER_LIKE_RE = re.compile(r"[-+]?(?:[0-9]|\.[0-9_])|\.(?:inf|nan)$", re.IGNORECASE)
_YAML_11_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})
_YAML_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_YAML_DQ_ESCAPE_RE = re.compile('[\\\\"\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]')
_YAML_DQ_UNESCAPES = {
    "\0": "\\0", "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f",
    "\r": "\\r", "\x1b": "\\e", '"': '\\"', "\\": "\\\\", "\x85": "\\N", "\u2028": "\\L",
    "\u2029": "\\P",
}
# Multi-line strings are written as literal blocks when every line reads back unchanged.
_YAML_LITERAL_OK = (  # no tab, and not U+0085, U+2028, U+2029: line breaks to YAML 1.1
    "[\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")
_YAML_ASCII_LITERAL_OK_RE = re.compile("[\n\x20-\x7e]*")  # the same, for ASCII text


@functools.lru_cache(maxsize=None)
def _yaml_regex(pattern: str) -> re.Pattern:
    """Compile the two large Unicode classes on first use (3.5 ms), so only for non-ASCII text."""
    return re.compile(pattern)


_YAML_TRAILING_SPACE_RE = re.compile(r" (?:\n|$)")


class YamlError(ConfigError):
    """A YAML syntax error, or a feature outside RunPilot's subset, located by file, line and column."""


def parse_yaml(text: str, filename: str = "<string>") -> object:
    """Read one YAML document of RunPilot's subset; raise YamlError for anything else."""
    return parse_yaml_located(text, filename)[0]


def parse_yaml_located(text: str, filename: str = "<string>") -> tuple[object, dict[tuple, tuple[int, int]]]:
    """Read a document and say where each node starts.

    Returns (value, positions): positions maps a node's path (the tuple of mapping keys and
    sequence indexes from the root; () is the root) to its 1-based (line, column). A mapping
    entry's path points at its key; an empty value at the '-' or key that introduces it.
    """
    parser = _YamlParser(text, filename)
    try:
        value = parser.document()
    except RecursionError as exc:  # the depth limit should prevent this; a deep caller may not leave room
        raise YamlError("document nested too deeply to read", filename) from exc
    return value, parser.positions


def _yaml_is_marker(line: str) -> bool:
    """Whether a line is a document marker: '---' or '...' alone or followed by whitespace."""
    return line[:3] in ("---", "...") and line[3:4] in ("", " ", "\t")


def _yaml_is_entry(line: str, col: int) -> bool:
    """Whether a block sequence entry ('-' then whitespace or the line's end) starts at col."""
    return line[col:col + 1] == "-" and line[col + 1:col + 2] in ("", " ", "\t")


def _yaml_resolve(text: str) -> object:
    """Type a plain scalar by the YAML 1.2 core schema: null, bool, int, float, else str."""
    if text in _YAML_CONSTANTS:
        return _YAML_CONSTANTS[text]
    if text[0] not in "0123456789+-.":
        return text
    if _YAML_INT_RE.fullmatch(text):
        return int(text)  # ValueError past Python's int digit limit; the parser reports it
    if _YAML_OCT_RE.fullmatch(text):
        return int(text[2:], 8)
    if _YAML_HEX_INT_RE.fullmatch(text):
        return int(text[2:], 16)
    if _YAML_FLOAT_RE.fullmatch(text):
        return float(text)
    if _YAML_INF_RE.fullmatch(text):
        return -math.inf if text[0] == "-" else math.inf
    if _YAML_NAN_RE.fullmatch(text):
        return math.nan
    return text


def _yaml_fold(lines: list[str | None]) -> str:
    """Join a folded block scalar's lines (None is an empty line).

    A single break between two ordinary lines becomes a space; n empty lines between them
    become n newlines. Breaks next to a more-indented line are kept as they are.
    """
    parts: list[str] = []
    blanks = 0
    prev: str | None = None
    for line in lines:
        if line is None:
            blanks += 1
            continue
        if prev is None:
            parts.append("\n" * blanks)
        elif prev[0] in " \t" or line[0] in " \t":
            parts.append("\n" * (blanks + 1))
        else:
            parts.append("\n" * blanks if blanks else " ")
        parts.append(line)
        prev, blanks = line, 0
    return "".join(parts)


def _yaml_block_text(lines: list[str | None], folded: bool, chomp: str) -> str:
    """Build a block scalar's value from its lines, then chomp: '-' strip, '' clip, '+' keep."""
    last = max((i for i, line in enumerate(lines) if line is not None), default=-1)
    body, trailing = lines[:last + 1], len(lines) - last - 1
    text = _yaml_fold(body) if folded else "\n".join(line or "" for line in body)
    if chomp == "-":
        return text
    if chomp == "+":
        return text + "\n" * (trailing + (1 if body else 0))
    return text + "\n" if body else ""


class _YamlParser:
    """Recursive descent over the document's lines with an explicit cursor (row, col).

    Block structure is read line by line from indentation; quoted scalars and flow collections
    are scanned character by character and may run over several lines. n is always the
    indentation of the parent block (-1 at the top): a node's lines must be indented more.
    """

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        if text.startswith("\ufeff"):
            text = text[1:]
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.lines = text.split("\n")
        if self.lines[-1] == "":
            self.lines.pop()
        self.blank = [_YAML_BLANK_RE.match(line) is not None for line in self.lines]
        self.row = 0
        self.col = 0
        self.depth = 0
        self.positions: dict[tuple, tuple[int, int]] = {}
        bad = (_YAML_ASCII_NON_PRINTABLE_RE if text.isascii() else _yaml_regex(_YAML_NON_PRINTABLE)).search(text)
        if bad:
            row = text.count("\n", 0, bad.start())
            col = bad.start() - (text.rfind("\n", 0, bad.start()) + 1)
            raise self.error(f"character U+{ord(bad.group()):04X} is not allowed in YAML text; "
                             "write it as an escape in a double-quoted string", row, col)

    # -- cursor and errors ----------------------------------------------------------------

    def error(self, message: str, row: int, col: int) -> YamlError:
        """A YamlError at a 0-based row and column of the text."""
        if row >= len(self.lines):
            row = max(len(self.lines) - 1, 0)
            col = len(self.lines[row]) if self.lines else 0
        source = self.lines[row] if self.lines else ""
        return YamlError(message, self.filename, row + 1, col + 1, source)

    def peek(self) -> str:
        """The character at the cursor, or '' at the end of its line."""
        line = self.lines[self.row]
        return line[self.col] if self.col < len(line) else ""

    def next_content_row(self, row: int) -> int:
        """The first row at or after row that holds more than whitespace and comments."""
        blank = self.blank
        while row < len(blank) and blank[row]:
            row += 1
        return row

    def block_indent(self, row: int) -> int:
        """The indentation of a content row in block context; -1 for a document marker."""
        line = self.lines[row]
        if _yaml_is_marker(line):
            return -1
        indent = len(line) - len(line.lstrip(" "))
        if line[indent] == "\t":
            raise self.error("tab character used for indentation; indent with spaces", row, indent)
        return indent

    def enter(self, row: int, col: int) -> None:
        """Count one more level of nesting; refuse absurd depths before Python's stack does."""
        self.depth += 1
        if self.depth > _YAML_MAX_DEPTH:
            raise self.error(f"nesting deeper than {_YAML_MAX_DEPTH} levels is not supported", row, col)

    def resolve(self, text: str, row: int, col: int) -> object:
        """Type a plain scalar, reporting a number Python cannot hold as a located error."""
        try:
            return _yaml_resolve(text)
        except ValueError as exc:
            raise self.error(f"cannot read this number: {exc}", row, col) from exc

    def check_continuation(self, row: int, n: int, what: str) -> None:
        """Check a line that continues a quoted scalar, plain scalar or flow collection."""
        line = self.lines[row]
        if _yaml_is_marker(line):
            raise self.error(f"document marker {line[:3]!r} inside a {what}", row, 0)
        indent = len(line) - len(line.lstrip(" "))
        if indent <= n and line[indent:indent + 1] == "\t":
            raise self.error("tab character used for indentation; indent with spaces", row, indent)
        if indent <= n:
            hint = ""
            if what.startswith("flow"):
                hint = (" (the closing bracket too)" if line[indent:indent + 1] in ("]", "}") else
                        "; or is its closing bracket missing?")
            raise self.error(f"bad indentation: a line that continues a {what} must be indented "
                             f"by at least {n + 1} space(s){hint}", row, indent)

    def check_node_start(self, row: int, col: int) -> None:
        """Refuse, by name, what a node may not start with in this subset."""
        line = self.lines[row]
        ch = line[col]
        message = _YAML_BAD_STARTS.get(ch)
        if line[col + 1:col + 2] in ("", " ", "\t"):
            message = _YAML_BAD_STARTS_BEFORE_SPACE.get(ch, message)
        if ch == "%" and col == 0:
            message = "directives (%YAML, %TAG) are not supported"
        if message:
            raise self.error(message, row, col)

    def end_of_line(self, colon_message: str) -> None:
        """Require nothing but whitespace or a comment after a node; move to the next row."""
        line = self.lines[self.row]
        if _YAML_END_RE.match(line, self.col) is None:
            col = _YAML_WS_RE.match(line, self.col).end()
            ch = line[col]
            if ch == "#":
                message = "a comment needs whitespace before '#'"
            elif ch == ":":
                message = colon_message
            else:
                message = f"unexpected text {line[col:col + 20]!r} after the value"
            raise self.error(message, self.row, col)
        self.row, self.col = self.row + 1, 0

    # -- document and block structure -----------------------------------------------------

    def document(self) -> object:
        """document ::= ( "---" ( sep node(-1) | comment? NL block-node(-1) ) | block-node(-1) )
        ( "..." comment? )?, with blank and comment lines anywhere around them."""
        row = self.next_content_row(0)
        self.positions[()] = (row + 1 if row < len(self.lines) else 1, 1)
        if row < len(self.lines) and self.lines[row].startswith("%"):
            raise self.error("directives (%YAML, %TAG) are not supported", row, 0)
        if row < len(self.lines) and self.lines[row].startswith("---") and _yaml_is_marker(self.lines[row]):
            value = self.entry_value(-1, (), row, 3, "doc")
        else:
            self.row = row
            value = self.block_node(-1, ())
        self.end_of_document()
        return value

    def end_of_document(self) -> None:
        """Allow only a '...' marker, blank lines and comments after the top-level value."""
        row = self.next_content_row(self.row)
        if row >= len(self.lines):
            return
        line = self.lines[row]
        ended = line.startswith("...") and _yaml_is_marker(line)
        if ended:
            if _YAML_END_RE.match(line, 3) is None:
                raise self.error("only a comment may follow the document end marker '...'", row, 4)
            row = self.next_content_row(row + 1)
            if row >= len(self.lines):
                return
            line = self.lines[row]
        if line.startswith("---") and _yaml_is_marker(line):
            raise self.error("multiple documents in one file are not supported", row, 0)
        if line.startswith("%"):
            raise self.error("directives (%YAML, %TAG) are not supported", row, 0)
        if ended:
            raise self.error("content after the document end marker '...' is not supported "
                             "(multiple documents)", row, 0)
        col = self.block_indent(row)
        raise self.error("expected the end of the document, but found more content "
                         "(check the indentation)", row, col)

    def block_node(self, n: int, path: tuple) -> object:
        """block-node(n) ::= a node on a later line indented more than n; else empty (None)."""
        row = self.next_content_row(self.row)
        self.row = row
        if row >= len(self.lines):
            return None
        indent = self.block_indent(row)
        if indent <= n:
            return None
        self.col = indent
        return self.node(n, path, "line")

    def entry_value(self, n: int, path: tuple, row: int, col: int, context: str) -> object:
        """The node after a '-', 'key:' or '---' indicator: on the same line, on the lines
        below, or empty. Only a mapping value may be an indentless sequence (at column n)."""
        line = self.lines[row]
        start = _YAML_WS_RE.match(line, col).end()
        if start < len(line) and line[start] != "#":
            if context == "seq" and "\t" in line[col:start]:
                context = "seq-tab"
            self.row, self.col = row, start
            return self.node(n, path, context)
        self.row = row + 1
        if context == "key":
            nxt = self.next_content_row(self.row)
            if nxt < len(self.lines) and self.block_indent(nxt) == n and _yaml_is_entry(self.lines[nxt], n):
                self.row, self.col = nxt, n
                self.positions[path] = (nxt + 1, n + 1)
                return self.block_sequence(n, path, indentless=True)
        value = self.block_node(n, path)
        self.positions.setdefault(path, (row + 1, col))
        return value

    def node(self, n: int, path: tuple, context: str) -> object:
        """node(n) ::= block-sequence | block-mapping | block-scalar | flow-collection
        | quoted-scalar | plain-scalar, starting at the cursor.

        context says what precedes it: 'line' (nothing), 'seq' ('- '), 'seq-tab' ('-' and a
        tab), 'key' ('key: ') or 'doc' ('--- '). Block collections may start only after
        'line' or 'seq': elsewhere their indentation would be ambiguous.
        """
        row, col = self.row, self.col
        line = self.lines[row]
        ch = line[col]
        self.positions[path] = (row + 1, col + 1)
        self.check_node_start(row, col)
        if _yaml_is_entry(line, col):
            self.check_collection_allowed(context, "sequence", row, col)
            return self.block_sequence(col, path, indentless=False)
        if ch in "|>":
            return self.block_scalar(n)
        if ch in "[{":
            value = self.flow_collection(n, path)
            self.end_of_line("flow collections cannot be mapping keys (complex keys are not supported)")
            return value
        if context in ("line", "seq", "seq-tab") and self.key_match(row, col):
            self.check_collection_allowed(context, "mapping", row, col)
            return self.block_mapping(col, path)
        if ch in "\"'":
            value = self.scan_quoted(n)
            self.end_of_line(self.colon_message(context) if self.row == row else
                             "an implicit mapping key must be on a single line")
            return value
        return self.resolve(self.plain_in_block(n, context), row, col)

    def check_collection_allowed(self, context: str, what: str, row: int, col: int) -> None:
        """Refuse a block collection that starts on the line of a 'key:', '---' or '-<tab>'."""
        if context == "seq-tab":
            raise self.error(f"tab character used for indentation: a block {what} after '-' "
                             "must be indented with spaces", row, col)
        if context == "key" and what == "sequence":
            raise self.error("a block sequence cannot start on the same line as its key; "
                             "start it on the next line", row, col)
        if context == "doc" and what == "sequence":
            raise self.error("a block sequence cannot start on the '---' line", row, col)
        if context in ("key", "doc"):
            raise self.error(self.colon_message(context), row, col)

    @staticmethod
    def colon_message(context: str) -> str:
        """Why a 'key:' may not appear where context puts it."""
        if context == "doc":
            return "a block mapping cannot start on the '---' line"
        if context == "key":
            return ("': ' after a value: quote the value if ': ' is part of it; a nested mapping "
                    "must start on the next line, indented")
        return "a ':' after a key must be followed by a space"

    def next_sibling(self, indent: int, what: str) -> bool:
        """Move to the next content row; whether it continues the block at indent."""
        row = self.next_content_row(self.row)
        self.row = row
        if row >= len(self.lines):
            return False
        found = self.block_indent(row)
        if found > indent:
            raise self.error(f"bad indentation: expected the next {what} at column {indent + 1}, "
                             "or a line indented less", row, found)
        self.col = found
        return found == indent

    def block_sequence(self, indent: int, path: tuple, indentless: bool) -> list:
        """block-sequence(i) ::= ( "-" ( sep node(i) | comment? NL block-node(i) ) )+,
        with every '-' at column i."""
        self.enter(self.row, indent)
        items: list = []
        while True:
            items.append(self.entry_value(indent, path + (len(items),), self.row, indent + 1, "seq"))
            if not self.next_sibling(indent, "sequence entry"):
                break
            if not _yaml_is_entry(self.lines[self.row], indent):
                if indentless:  # a key at the parent mapping's indentation ends the sequence
                    break
                raise self.error("expected a sequence entry ('- ') at this indentation", self.row, indent)
        self.depth -= 1
        return items

    def block_mapping(self, indent: int, path: tuple) -> dict:
        """block-mapping(i) ::= ( key ":" ( sep node(i) | comment? NL ( block-node(i)
        | block-sequence(i) ) ) )+, with every key at column i."""
        self.enter(self.row, indent)
        mapping: dict = {}
        while True:
            row = self.row
            self.check_node_start(row, indent)
            match = self.key_match(row, indent)
            if match is None:
                raise self.error(self.not_a_key(row, indent), row, indent)
            key = self.decode_key(match, row, indent)
            self.check_new_key(mapping, key, path, row, indent)
            mapping[key] = self.entry_value(indent, path + (key,), row, match.end(), "key")
            self.positions[path + (key,)] = (row + 1, indent + 1)
            if not self.next_sibling(indent, "key"):
                break
        self.depth -= 1
        return mapping

    def not_a_key(self, row: int, col: int) -> str:
        """Explain why a line in a block mapping is not a 'key: value' entry."""
        line = self.lines[row]
        if _yaml_is_entry(line, col):
            return "expected a mapping key here, found a sequence entry ('- ')"
        if line.startswith(("'", '"'), col):
            return "expected a mapping key; a quoted key must be on one line and followed by ': '"
        if ":" not in line:
            return "expected 'key: value' here, found a line without ':'"
        return "expected 'key: value' here (a ':' after a key must be followed by a space)"

    def key_match(self, row: int, col: int) -> re.Match | None:
        """Match an implicit key and its ':' (then whitespace or the line's end) at row, col."""
        line = self.lines[row]
        ch = line[col]
        regex = _YAML_DQ_KEY_RE if ch == '"' else _YAML_SQ_KEY_RE if ch == "'" else _YAML_PLAIN_KEY_RE
        return regex.match(line, col)

    def decode_key(self, match: re.Match, row: int, col: int) -> object:
        """The value of the key that key_match found; refuse merge keys and overlong keys."""
        if match.end() - 1 - col > _YAML_MAX_KEY:
            raise self.error(f"a mapping key longer than {_YAML_MAX_KEY} characters is not allowed", row, col)
        if self.lines[row][col] in "\"'":
            self.row, self.col = row, col
            return self.scan_quoted(-1)  # it fits on its line, so indentation does not matter
        self.check_merge_key(match.group(1), "plain", row, col)
        return self.resolve(match.group(1), row, col)

    def check_merge_key(self, key: object, kind: str, row: int, col: int) -> None:
        """Refuse a plain '<<' key: PyYAML would merge mappings there, this reader will not."""
        if kind == "plain" and key == "<<":
            raise self.error("merge keys (<<) are not supported; quote '<<' if it is a plain key", row, col)

    def check_new_key(self, mapping: dict, key: object, path: tuple, row: int, col: int) -> None:
        """Refuse a duplicate key (PyYAML would silently keep the last one)."""
        if key in mapping:
            first = self.positions.get(path + (key,), (0, 0))[0]
            same = next(k for k in mapping if k == key)
            note = "" if type(same) is type(key) else f" ({same!r} and {key!r} are the same dict key)"
            raise self.error(f"duplicate key {key!r} (already defined on line {first}){note}", row, col)

    # -- scalars --------------------------------------------------------------------------

    def plain_in_block(self, n: int, context: str) -> str:
        """plain(n) ::= a first line, then continuation lines indented more than n; a single
        line break folds into a space and each empty line into a newline. A comment ends it."""
        row, col = self.row, self.col
        line = self.lines[row]
        match = _YAML_PLAIN_BLOCK_RE.match(line, col)
        if match is None:
            raise self.error(f"unexpected {line[col]!r}; quote the value", row, col)
        parts = [match.group()]
        ended = self.plain_line_end(row, match.end(), context)
        last, blanks, r = row, 0, row + 1
        while not ended and r < len(self.lines):
            text = self.lines[r]
            stripped = text.lstrip(" \t")
            if not stripped:
                blanks, r = blanks + 1, r + 1
                continue
            if stripped[0] == "#":
                ended = True
                break
            if _yaml_is_marker(text) or len(text) - len(text.lstrip(" ")) <= n:
                break
            start = len(text) - len(stripped)
            match = _YAML_PLAIN_MORE_BLOCK_RE.match(text, start)
            if match is None:
                raise self.error("a ':' at the start of this line cannot continue the scalar above", r, start)
            parts.append("\n" * blanks if blanks else " ")
            parts.append(match.group())
            ended = self.plain_line_end(r, match.end(), "more")
            last, blanks, r = r, 0, r + 1
        self.row, self.col = last + 1, 0
        if ended:
            self.check_no_continuation(n)
        return "".join(parts)

    def plain_line_end(self, row: int, col: int, context: str) -> bool:
        """Check what ends a plain scalar's line: its end, a comment (True), or a bad ':'."""
        line = self.lines[row]
        match = _YAML_END_RE.match(line, col)
        if match is not None:
            return match.group().endswith("#")
        colon = _YAML_WS_RE.match(line, col).end()
        if context == "more":
            raise self.error("this line looks like a mapping key but continues the multi-line scalar "
                             "above; check its indentation", row, colon)
        raise self.error(self.colon_message(context), row, colon)

    def check_no_continuation(self, n: int) -> None:
        """After a comment ends a plain scalar, nothing may continue it on a deeper line."""
        row = self.next_content_row(self.row)
        if row < len(self.lines) and not _yaml_is_marker(self.lines[row]):
            line = self.lines[row]
            indent = len(line) - len(line.lstrip(" "))
            if indent > n:
                raise self.error("bad indentation, or a multi-line scalar interrupted by a comment "
                                 "(a comment ends a plain scalar)", row, indent)

    def scan_quoted(self, n: int) -> str:
        """quoted ::= "'" ( char | "''" )* "'" | '"' ( char | escape )* '"', at the cursor.
        It may fold over lines indented more than n, like a plain scalar."""
        line = self.lines[self.row]
        quote = line[self.col]
        simple = (_YAML_DQ_SIMPLE_RE if quote == '"' else _YAML_SQ_SIMPLE_RE).match(line, self.col)
        if simple:
            self.col = simple.end()
            return simple.group(1) if quote == '"' else simple.group(1).replace("''", "'")
        return self.scan_quoted_lines(quote, n)

    def scan_quoted_lines(self, quote: str, n: int) -> str:
        """The general case of scan_quoted: escapes, and line folding."""
        opener = (self.row, self.col)
        run_re = _YAML_DQ_RUN_RE if quote == '"' else _YAML_SQ_RUN_RE
        row, i = self.row, self.col + 1
        out: list[str] = []
        while True:
            line = self.lines[row]
            spaces = ""  # unescaped whitespace, dropped if the line ends after it
            escaped_break = False
            while i < len(line):
                ch = line[i]
                if ch in " \t":
                    spaces, i = spaces + ch, i + 1
                    continue
                if ch == quote == "'" and line[i + 1:i + 2] == "'":
                    text, i = "'", i + 2  # '' is one quote inside single quotes
                elif ch == quote:
                    out.append(spaces)
                    self.row, self.col = row, i + 1
                    return "".join(out)
                elif ch == "\\" and quote == '"':
                    if i + 1 == len(line):
                        out.append(spaces)
                        spaces, escaped_break = "", True
                        break
                    text, i = self.escape(row, i)
                else:
                    match = run_re.match(line, i)
                    text, i = match.group(), match.end()
                out.append(spaces + text)
                spaces = ""
            row, i = self.fold_quoted_break(row, n, opener, escaped_break, out)

    def fold_quoted_break(self, row: int, n: int, opener: tuple[int, int], escaped: bool,
                          out: list[str]) -> tuple[int, int]:
        """Fold the line break(s) after row inside a quoted scalar; return where text resumes."""
        blanks = 0
        row += 1
        while row < len(self.lines) and not self.lines[row].strip(" \t"):
            blanks, row = blanks + 1, row + 1
        if row >= len(self.lines):
            raise self.error("unterminated quoted scalar: no closing quote", *opener)
        self.check_continuation(row, n, "quoted scalar")
        out.append("\n" * blanks if blanks or escaped else " ")
        return row, _YAML_WS_RE.match(self.lines[row]).end()

    def escape(self, row: int, i: int) -> tuple[str, int]:
        """Decode the escape sequence at line[i] (a backslash); return its text and where it ends."""
        line = self.lines[row]
        code = line[i + 1]
        if code in _YAML_ESCAPES:
            return _YAML_ESCAPES[code], i + 2
        width = _YAML_HEX_ESCAPES.get(code, 0)
        digits = line[i + 2:i + 2 + width]
        if width and len(digits) == width and _YAML_HEX_RE.fullmatch(digits):
            point = int(digits, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise self.error(f"escape '\\{code}{digits}' is not a Unicode character", row, i)
            return chr(point), i + 2 + width
        raise self.error(f"invalid escape '\\{code}' in a double-quoted scalar", row, i)

    def block_scalar(self, n: int) -> str:
        """block-scalar(n) ::= ( "|" | ">" ) ( digit chomp? | chomp digit? )? comment? NL line*,
        with chomp '-' (strip) or '+' (keep), and every line indented at least n + digit, or
        as much as the first non-empty line when there is no digit (more than n)."""
        row, col = self.row, self.col
        line = self.lines[row]
        header = _YAML_BLOCK_HEADER_RE.match(line, col)
        if header is None or _YAML_END_RE.match(line, header.end()) is None:
            bad = header.end() if header else col + 1
            if line[bad:bad + 1] == "#":
                message = "a comment after a block scalar header needs whitespace before '#'"
            else:
                message = ("bad block scalar header: after '|' or '>' only a chomping indicator "
                           "('-' or '+'), an indentation digit 1-9 and a comment may follow")
            raise self.error(message, row, bad)
        digit = header.group(1) or header.group(4)
        chomp = header.group(2) or header.group(3) or ""
        lines = self.block_scalar_lines(row + 1, n, n + int(digit) if digit else None)
        if digit and n < 0 and any(line is not None for line in lines):
            # The grammar says column digit-1 here, libyaml and PyYAML say column digit.
            raise self.error("an indentation digit on a top-level block scalar is read differently by "
                             "different YAML parsers; remove it", row, col + 1)
        return _yaml_block_text(lines, line[col] == ">", chomp)

    def block_scalar_lines(self, row: int, n: int, indent: int | None) -> list[str | None]:
        """Collect a block scalar's lines with their indentation removed (None: empty line).
        Without an explicit indentation, the first non-empty line sets it."""
        out: list[str | None] = []
        leading = (0, row)  # the most spaces on an empty line before the first content, and where
        while row < len(self.lines):
            line = self.lines[row]
            if _yaml_is_marker(line):
                break
            stripped = line.lstrip(" ")
            spaces = len(line) - len(stripped)
            if indent is None and stripped and spaces > n:
                indent = spaces
                if leading[0] > indent:
                    raise self.error("a leading empty line of this block scalar has more spaces "
                                     "than its first content line", leading[1], leading[0])
            if indent is not None and spaces >= indent and (stripped or spaces > indent):
                out.append(line[indent:])
            elif not stripped:
                out.append(None)
                leading = max(leading, (spaces, row)) if indent is None else leading
            elif stripped[0] == "\t":
                raise self.error("tab character used for indentation in a block scalar", row, spaces)
            else:
                break
            row += 1
        self.row, self.col = row, 0
        return out

    # -- flow collections -----------------------------------------------------------------

    def flow_collection(self, n: int, path: tuple) -> object:
        """flow-collection ::= flow-sequence | flow-mapping; its lines are indented more than n."""
        self.enter(self.row, self.col)
        if self.peek() == "[":
            value: object = self.flow_sequence(n, path)
        else:
            value = self.flow_mapping(n, path)
        self.depth -= 1
        return value

    def flow_skip(self, n: int, opener: tuple[int, int]) -> None:
        """Skip spaces, tabs, comments and line breaks inside a flow collection."""
        line = self.lines[self.row]
        col = _YAML_WS_RE.match(line, self.col).end()
        while col == len(line) or (line[col] == "#" and (col == 0 or line[col - 1] in " \t")):
            self.row += 1
            if self.row >= len(self.lines):
                raise self.error("unterminated flow collection: no closing bracket for this one", *opener)
            line = self.lines[self.row]
            if not self.blank[self.row]:
                self.check_continuation(self.row, n, f"flow collection opened on line {opener[0] + 1}")
            col = _YAML_WS_RE.match(line).end()
        self.col = col

    def flow_sequence(self, n: int, path: tuple) -> list:
        """flow-sequence ::= "[" ( entry ( "," entry )* ","? )? "]",
        entry ::= flow-node | key ":" flow-node?  (a single-pair mapping)."""
        opener = (self.row, self.col)
        self.col += 1
        items: list = []
        while True:
            self.flow_skip(n, opener)
            if self.peek() == "]":
                self.col += 1
                return items
            items.append(self.flow_sequence_entry(n, path + (len(items),), opener))
            self.flow_skip(n, opener)
            if self.peek() == ",":
                self.col += 1
            elif self.peek() != "]":
                raise self.error(f"expected ',' or ']' in the flow sequence opened on line {opener[0] + 1}",
                                 self.row, self.col)

    def flow_sequence_entry(self, n: int, path: tuple, opener: tuple[int, int]) -> object:
        """One flow sequence entry; 'key: value' in a sequence is a single-pair mapping."""
        row, col = self.row, self.col
        value, kind = self.flow_node(n, path)
        end_row = self.row
        self.flow_skip(n, opener)
        if not self.at_value_indicator(kind):
            return value
        if kind == "collection":
            raise self.error("flow collections cannot be mapping keys (complex keys are not supported)", row, col)
        self.check_merge_key(value, kind, row, col)
        if end_row != row or self.row != row:
            raise self.error("an implicit key and its ':' must be on one line", row, col)
        self.col += 1
        pair = {value: self.flow_value(n, path + (value,), opener)}
        self.positions[path + (value,)] = (row + 1, col + 1)
        return pair

    def flow_mapping(self, n: int, path: tuple) -> dict:
        """flow-mapping ::= "{" ( pair ( "," pair )* ","? )? "}", pair ::= key ( ":" flow-node? )?"""
        opener = (self.row, self.col)
        self.col += 1
        mapping: dict = {}
        while True:
            self.flow_skip(n, opener)
            if self.peek() == "}":
                self.col += 1
                return mapping
            row, col = self.row, self.col
            if self.peek() in ("[", "{"):
                raise self.error("flow collections cannot be mapping keys (complex keys are not supported)", row, col)
            key, kind = self.flow_scalar(n)
            self.check_merge_key(key, kind, row, col)
            self.check_new_key(mapping, key, path, row, col)
            self.flow_skip(n, opener)
            value = None
            if self.at_value_indicator(kind):
                self.col += 1
                value = self.flow_value(n, path + (key,), opener)
            mapping[key] = value
            self.positions[path + (key,)] = (row + 1, col + 1)
            self.flow_skip(n, opener)
            if self.peek() == ",":
                self.col += 1
            elif self.peek() != "}":
                raise self.error(f"expected ',' or '}}' in the flow mapping opened on line {opener[0] + 1}",
                                 self.row, self.col)

    def at_value_indicator(self, kind: str) -> bool:
        """Whether the cursor is at a ':' that separates a flow key from its value. After a
        quoted key or a collection it may touch the value ("a":b); after a plain key not."""
        line = self.lines[self.row]
        if self.peek() != ":":
            return False
        return kind != "plain" or line[self.col + 1:self.col + 2] in ("", " ", "\t", ",", "[", "]", "{", "}")

    def flow_value(self, n: int, path: tuple, opener: tuple[int, int]) -> object:
        """The value after a ':' in a flow collection; empty (None) before ',', ']' or '}'."""
        self.flow_skip(n, opener)
        if self.peek() in (",", "]", "}"):
            self.positions[path] = (self.row + 1, self.col + 1)
            return None
        return self.flow_node(n, path)[0]

    def flow_node(self, n: int, path: tuple) -> tuple[object, str]:
        """flow-node ::= flow-collection | flow-scalar; also says which kind it was."""
        self.positions[path] = (self.row + 1, self.col + 1)
        if self.peek() in ("[", "{"):
            return self.flow_collection(n, path), "collection"
        return self.flow_scalar(n)

    def flow_scalar(self, n: int) -> tuple[object, str]:
        """flow-scalar ::= quoted-scalar | plain-scalar; also says which kind it was."""
        row, col = self.row, self.col
        if self.peek() in ("'", '"'):
            return self.scan_quoted(n), "quoted"
        self.check_node_start(row, col)
        return self.resolve(self.plain_in_flow(n), row, col), "plain"

    def plain_in_flow(self, n: int) -> str:
        """A plain scalar inside a flow collection; it may continue on lines indented more than
        n, and ends at ',', brackets, a ':' before whitespace or brackets, or a comment."""
        line = self.lines[self.row]
        match = _YAML_PLAIN_FLOW_RE.match(line, self.col)
        if match is None:
            raise self.error(f"unexpected {line[self.col]!r} in a flow collection; quote the value",
                             self.row, self.col)
        parts = [match.group()]
        self.col = match.end()
        while _YAML_WS_RE.match(line, self.col).end() == len(line):
            row, blanks = self.row + 1, 0
            while row < len(self.lines) and not self.lines[row].strip(" \t"):
                blanks, row = blanks + 1, row + 1
            if row >= len(self.lines) or _yaml_is_marker(self.lines[row]):
                break
            text = self.lines[row]
            start = _YAML_WS_RE.match(text).end()
            match = _YAML_PLAIN_MORE_FLOW_RE.match(text, start)
            if match is None or text[start] == "#" or len(text) - len(text.lstrip(" ")) <= n:
                break  # what follows is flow_skip's to judge
            parts.append("\n" * blanks if blanks else " ")
            parts.append(match.group())
            self.row, self.col, line = row, match.end(), text
        return "".join(parts)


# -- the writer ---------------------------------------------------------------------------

def dump_yaml(data: object) -> str:
    """Write data as block-style YAML that parse_yaml and PyYAML's safe_load read back equal.

    data is made of dict (keys: str, int, float, bool or None), list or tuple (read back as
    list), str, int, float, bool and None; key order is kept. Strings are written plain when
    that is unambiguous under both YAML 1.2 and YAML 1.1, as literal blocks when they are
    tidy multi-line text, else double-quoted with escapes. Raises TypeError for other types,
    ValueError for nesting deeper than the reader accepts, lone surrogates, or a key longer
    than 1024 characters once written.
    """
    out: list[str] = []
    if isinstance(data, (dict, list, tuple)) and data:
        _yaml_dump_block(data, 0, out, 1)
    else:
        _yaml_dump_entry("", data, 0, out, 0)
    return "\n".join(out) + "\n"


def _yaml_check_depth(depth: int) -> None:
    """Refuse to write what the reader would refuse to read back."""
    if depth > _YAML_MAX_DEPTH:
        raise ValueError(f"data nested deeper than {_YAML_MAX_DEPTH} levels cannot be written "
                         "(the reader refuses it)")


def _yaml_dump_block(value: dict | list | tuple, indent: int, out: list[str], depth: int) -> None:
    """Append a non-empty dict or list with its entries at column indent."""
    _yaml_check_depth(depth)
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            _yaml_dump_entry(f"{pad}{_yaml_dump_key(key)}:", item, indent, out, depth)
        return
    for item in value:
        if isinstance(item, (dict, list, tuple)) and item:  # compact: the first entry shares the '-' line
            start = len(out)
            _yaml_dump_block(item, indent + 2, out, depth + 1)
            out[start] = f"{pad}- {out[start][indent + 2:]}"
        else:
            _yaml_dump_entry(f"{pad}-", item, indent, out, depth)


def _yaml_dump_entry(head: str, value: object, indent: int, out: list[str], depth: int) -> None:
    """Append 'head value' where head is 'key:', '-' or '' (the document), indent its column."""
    sep = " " if head else ""
    if isinstance(value, (dict, list, tuple)):
        _yaml_check_depth(depth + 1)
        if value:
            out.append(head)
            _yaml_dump_block(value, indent + 2, out, depth + 1)
            return
    if isinstance(value, str) and _yaml_literal_ok(value):
        newlines = len(value) - len(value.rstrip("\n"))
        out.append(f"{head}{sep}|{'-' if newlines == 0 else '' if newlines == 1 else '+'}")
        lines = value.split("\n")
        if newlines:
            lines.pop()  # the last line break is the header's to give back
        out.extend(" " * (indent + 2) + line if line else "" for line in lines)
    else:
        out.append(f"{head}{sep}{_yaml_dump_scalar(value)}")


def _yaml_literal_ok(text: str) -> bool:
    """Whether a string reads back exactly from a literal block ('|'): multi-line, printable,
    no tabs, no trailing spaces, and a first line that sets the indentation."""
    printable = _YAML_ASCII_LITERAL_OK_RE if text.isascii() else _yaml_regex(_YAML_LITERAL_OK)
    return ("\n" in text and text[0] not in " \n" and printable.fullmatch(text) is not None
            and _YAML_TRAILING_SPACE_RE.search(text) is None)


def _yaml_dump_key(key: object) -> str:
    """A mapping key on one line; YAML limits implicit keys to 1024 characters."""
    if not (key is None or isinstance(key, (str, int, float))):
        raise TypeError(f"cannot write a mapping key of type {type(key).__name__} as YAML")
    text = _yaml_dump_scalar(key)
    if len(text) > _YAML_MAX_KEY:
        raise ValueError(f"a mapping key longer than {_YAML_MAX_KEY} characters cannot be written")
    return text


def _yaml_dump_scalar(value: object) -> str:
    """A scalar (or empty collection) on one line, read the same by YAML 1.2 core and YAML 1.1."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _yaml_dump_float(value)
    if isinstance(value, str):
        return _yaml_dump_str(value)
    if isinstance(value, (dict, list, tuple)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    raise TypeError(f"cannot write a value of type {type(value).__name__} as YAML")


def _yaml_dump_float(value: float) -> str:
    """A float that reads back as a float: YAML 1.1 wants a '.' before any exponent."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    mantissa, e, exponent = repr(value).partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _yaml_dump_str(text: str) -> str:
    """A string, plain when nothing could read it as another type or structure, else quoted."""
    if _YAML_SURROGATE_RE.search(text):
        raise ValueError("a string with a lone surrogate cannot be written as UTF-8 YAML")
    if (_YAML_PLAIN_OK_RE.fullmatch(text) and ": " not in text and " #" not in text and not text.startswith("...")
            and _YAML_NUMBER_LIKE_RE.match(text) is None and text.lower() not in _YAML_11_WORDS):
        return text
    return '"' + _YAML_DQ_ESCAPE_RE.sub(_yaml_escape_char, text) + '"'


def _yaml_escape_char(match: re.Match) -> str:
    """The double-quoted escape for one character."""
    ch = match.group()
    if ch in _YAML_DQ_UNESCAPES:
        return _YAML_DQ_UNESCAPES[ch]
    return f"\\x{ord(ch):02X}" if ord(ch) < 0x100 else f"\\u{ord(ch):04X}"


# ==== 8. Config loading and validation =======================================

def scalar_text(value: object) -> str:
    """Spell a YAML scalar as the job sees it in its environment (true, not True)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
    return str(value)


def _float_text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def parse_size(value: object) -> int:
    """Bytes from `8g`, `512m`, `8GiB`, `1.5G`, `1024` (plain bytes); ValueError if nonsense."""
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError
        return value
    match = SIZE_RE.match(str(value).strip())
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise ValueError
    number = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if number < 1:
        raise ValueError
    return int(number)


def size_text(size: int | None) -> str | int | None:
    """8589934592 -> "8g": the largest unit that divides the size exactly (parse_size reads it back)."""
    if size is None:
        return None
    for unit in "tgmk":
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return size


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d`; ValueError if nonsense."""
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = DURATION_RE.match(str(value).strip())
        if not match:
            raise ValueError
        seconds = float(match.group(1)) * DURATION_UNITS[(match.group(2) or "").lower()]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError
    return seconds


class _Checker:
    """Collects located problems while a config is validated, so all can be listed at once."""

    def __init__(self, filename: str, text: str, positions: dict) -> None:
        self.filename = filename
        self.lines = text.splitlines()
        self.positions = positions
        self.problems: list[ConfigError] = []

    def problem(self, path: tuple, message: str) -> None:
        line, col = self._locate(path)
        source = self.lines[line - 1] if line and line <= len(self.lines) else None
        self.problems.append(ConfigError(message, self.filename, line, col, source))

    def _locate(self, path: tuple) -> tuple[int | None, int | None]:
        while path not in self.positions and path:
            path = path[:-1]
        return self.positions.get(path, (None, None))

    def raise_if_any(self) -> None:
        if self.problems:
            first = self.problems[0]
            first.others = self.problems[1:]
            raise first


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    word = word.lower()
    close = [KEY_SYNONYMS[word]] if KEY_SYNONYMS.get(word) in choices else \
        difflib.get_close_matches(word, choices, n=1) or \
        [c for c in choices if word.startswith(c) or c.startswith(word)]
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(choices)})"


def _check_keys(chk: _Checker, data: dict, path: tuple, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            where = f" in {_dotted(path)}" if path else ""
            chk.problem(path + (key,), f"unknown key '{key}'{where}{_did_you_mean(str(key), allowed)}")


def _check_string(chk: _Checker, data: dict, key: str, required: bool) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            chk.problem((key,) if key in data else (), f"'{key}' is required: add a line '{key}: ...'")
        return None
    if isinstance(value, (dict, list)) or (isinstance(value, str) and not value.strip()):
        chk.problem((key,), f"'{key}' must be a non-empty text value")
        return None
    return scalar_text(value)


def _check_entrypoint(chk: _Checker, data: dict) -> str | tuple[str, ...] | None:
    value = data.get("entrypoint")
    if isinstance(value, list):
        if not value or any(isinstance(v, (dict, list)) or v is None for v in value):
            chk.problem(("entrypoint",), "'entrypoint' as a list must hold one or more plain words")
            return None
        return tuple(scalar_text(v) for v in value)
    return _check_string(chk, data, "entrypoint", required=True)


def _check_env(chk: _Checker, env: object) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        chk.problem(("env",), "'env' must be a mapping of NAME: value")
        return {}
    result = {}
    for name, value in env.items():
        path = ("env", name)
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            chk.problem(path, f"env name {str(name)!r} is not a valid variable name "
                              "(letters, digits and _, not starting with a digit)")
        elif isinstance(value, (dict, list)):
            chk.problem(path, f"env.{name} must be a single value, not a {type(value).__name__}")
        elif "\0" in scalar_text(value):
            chk.problem(path, f"env.{name} contains a NUL character, which no environment can hold")
        else:
            result[name] = scalar_text(value)
    return result


def _mount_problem(path_text: str) -> str | None:
    if not path_text:
        return "is empty"
    if ":" in path_text or "," in path_text:
        return f"contains ':' or ',' ({path_text!r}), which the engines cannot mount exactly; rename the folder"
    if "\0" in path_text or "\n" in path_text:
        return "contains a control character"
    return None


def _parse_mount_spec(spec: str) -> tuple[str, str | None, bool]:
    """Split `host[:container[:ro|rw]]` into (host, container or None, read_only)."""
    parts = spec.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) > 2:
        raise ValueError(f"{spec!r} has too many ':'; write host_path:container_path[:ro]")
    return parts[0], (parts[1] if len(parts) == 2 else None), read_only


def _check_mount(chk: _Checker, path: tuple, spec: object, name: str | None, base: Path,
                 workdir: str | None) -> Mount | None:
    if not isinstance(spec, str):
        chk.problem(path, f"mount {_dotted(path)} must be a path or 'host_path:container_path[:ro]'")
        return None
    try:
        host, target, read_only = _parse_mount_spec(spec)
    except ValueError as exc:
        chk.problem(path, f"mount {_dotted(path)}: {exc}")
        return None
    if target is None:
        if name is None:
            chk.problem(path, f"mount {spec!r} needs a container path: write '{spec}:/data'")
            return None
        target = (workdir or DEFAULT_WORKDIR) if name == "code" else f"{NAMED_MOUNT_ROOT}/{name}"
    source = str((base / os.path.expanduser(host)).resolve()) if host else ""
    problem = _mount_problem(host) or ("" if target.startswith("/") else "needs an absolute container path")
    if problem:
        chk.problem(path, f"mount {_dotted(path)} {problem}")
        return None
    if not os.path.exists(source):
        chk.problem(path, f"mount {_dotted(path)}: {source} does not exist; create it or fix the path")
        return None
    return Mount(source, target, read_only, name)


def _check_mounts(chk: _Checker, mounts: object, base: Path, workdir: str | None) -> tuple[Mount, ...]:
    if mounts is None:
        return ()
    if isinstance(mounts, dict):
        items = [(("mounts", k), v, str(k)) for k, v in mounts.items()]
        for (path, _, name) in items:
            if not re.match(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z", name):
                chk.problem(path, f"mount name {name!r} must be letters, digits, '_', '.' or '-'")
    elif isinstance(mounts, list):
        items = [(("mounts", i), v, None) for i, v in enumerate(mounts)]
    else:
        chk.problem(("mounts",), "'mounts' must be a mapping (name: path) or a list of 'host:container'")
        return ()
    found = [_check_mount(chk, path, spec, name, base, workdir) for path, spec, name in items]
    return tuple(m for m in found if m is not None)


def _check_gpus(chk: _Checker, value: object) -> int | str | tuple[str, ...] | None:
    path = ("resources", "gpus")
    if value is None or value == 0 and not isinstance(value, bool):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, list) and value and all(
            isinstance(v, (int, str)) and not isinstance(v, bool) and re.match(r"[\w-]+\Z", str(v))
            for v in value):
        return tuple(str(v) for v in value)
    chk.problem(path, "resources.gpus must be a count (1), 'all', or a list of device indices or "
                      f"UUIDs ([0, 2]); got {value!r}")
    return None


def _check_number(chk: _Checker, path: tuple, value: object, parse, what: str):
    if value is None:
        return None
    try:
        return parse(value)
    except (ValueError, OverflowError):
        chk.problem(path, f"{_dotted(path)} must be {what}; got {value!r}")
        return None


def _positive_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)  # type: ignore[arg-type]
    if not (number > 0 and math.isfinite(number)):
        raise ValueError
    return number


def _check_resources(chk: _Checker, res: object) -> Resources:
    if res is None:
        return Resources()
    if not isinstance(res, dict):
        chk.problem(("resources",), "'resources' must be a mapping (gpus, cpu, memory, shm_size)")
        return Resources()
    _check_keys(chk, res, ("resources",), RESOURCE_KEYS)
    size = "a size such as 8g, 512m, 8GiB or plain bytes"
    return Resources(
        gpus=_check_gpus(chk, res.get("gpus")),
        cpu=_check_number(chk, ("resources", "cpu"), res.get("cpu"), _positive_float, "a positive number of CPUs"),
        memory=_check_number(chk, ("resources", "memory"), res.get("memory"), parse_size, size),
        shm_size=_check_number(chk, ("resources", "shm_size"), res.get("shm_size"), parse_size, size),
    )


def _check_metrics(chk: _Checker, metrics: object) -> tuple[str, ...]:
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list):
        chk.problem(("metrics",), "'metrics' must be a list of metric names")
        return ()
    names = []
    for i, name in enumerate(metrics):
        if not isinstance(name, str) or not METRIC_KEY_RE.match(name):
            chk.problem(("metrics", i), f"metric name {name!r} must be letters, digits, '_', '.', '-' or '/'")
        else:
            names.append(name)
    return tuple(names)


def _check_engine(chk: _Checker, engine: object) -> str | None:
    if engine is None:
        return None
    if engine not in ENGINES:
        chk.problem(("engine",), f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        return None
    return str(engine)


def validate_config(data: object, filename: str, text: str = "", positions: dict | None = None,
                    base_dir: Path | None = None) -> JobConfig:
    """Turn parsed YAML into a JobConfig, or raise ConfigError listing every problem."""
    chk = _Checker(filename, text, positions or {})
    if not isinstance(data, dict):
        what = "the config is empty" if data is None else "a config must be a mapping"
        chk.problem((), f"{what}; it needs at least name, image and entrypoint (runpilot init writes a sample)")
        chk.raise_if_any()
    assert isinstance(data, dict)
    _check_keys(chk, data, (), TOP_LEVEL_KEYS)
    engine = _check_engine(chk, data.get("engine"))
    workdir = _check_string(chk, data, "workdir", required=False)
    if workdir is not None and not workdir.startswith("/"):
        chk.problem(("workdir",), f"workdir must be an absolute path inside the container; got {workdir!r}")
    base = base_dir or Path(filename).resolve().parent
    mounts = _check_mounts(chk, data.get("mounts"), base, workdir)
    if workdir is None and any(m.name == "code" for m in mounts):
        workdir = DEFAULT_WORKDIR
    config = JobConfig(
        name=_check_string(chk, data, "name", required=True) or "",
        image=_check_string(chk, data, "image", required=engine != "local"),
        entrypoint=_check_entrypoint(chk, data) or "",
        workdir=workdir,
        env=_check_env(chk, data.get("env")),
        mounts=mounts,
        resources=_check_resources(chk, data.get("resources")),
        metrics=_check_metrics(chk, data.get("metrics")),
        engine=engine,
        timeout=_check_number(chk, ("timeout",), data.get("timeout"), parse_duration,
                              "a duration such as 90s, 30m, 2h or a number of seconds"),
        source=str(Path(filename).resolve()) if filename and not filename.startswith("<") else None,
    )
    chk.raise_if_any()
    return config


def read_config_text(path: str | os.PathLike) -> str:
    """Read a config file as UTF-8, turning OS errors into one clear ConfigError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check the path (runpilot init writes a sample)")
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError("the file is not valid UTF-8; save it as UTF-8", str(path), line)


def apply_overrides(data: object, overrides: list[str]) -> object:
    """Apply `--set a.b=value` overrides (values typed like YAML scalars) to parsed config data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise UsageError(f"--set {item!r} must look like KEY=VALUE, e.g. --set env.LR=0.01")
        try:
            value = parse_yaml(raw, f"--set {key}") if raw.strip() else ""
        except YamlError as exc:
            raise UsageError(f"--set {key}: cannot read value {raw!r}: {exc.message}")
        data = _set_dotted(data, parts, value, item)
    return data


def _set_dotted(data: object, parts: list[str], value: object, item: str) -> object:
    if not isinstance(data, dict):
        raise UsageError(f"--set {item!r}: the config is not a mapping at {parts[0]!r}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UsageError(f"--set {item!r}: {part!r} holds a {type(child).__name__}, not a mapping")
        node = child
    node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read, parse, override and validate a config file (raises ConfigError, exit status 2)."""
    text = read_config_text(path)
    data, positions = parse_yaml_located(text, str(path))
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_config(data, str(path), text, positions)


def config_to_dict(config: JobConfig) -> dict:
    """The resolved config as plain data, readable again by load_config (written as config.yaml)."""
    data: dict = {"name": config.name}
    if config.engine:
        data["engine"] = config.engine
    if config.image:
        data["image"] = config.image
    data["entrypoint"] = config.entrypoint if isinstance(config.entrypoint, str) else list(config.entrypoint)
    if config.workdir:
        data["workdir"] = config.workdir
    if config.env:
        data["env"] = dict(config.env)
    if config.mounts:
        data["mounts"] = _mounts_to_data(config)
    res = config.resources
    resources = {"gpus": list(res.gpus) if isinstance(res.gpus, tuple) else res.gpus,
                 "cpu": int(res.cpu) if res.cpu is not None and res.cpu == int(res.cpu) else res.cpu,
                 "memory": size_text(res.memory), "shm_size": size_text(res.shm_size)}
    resources = {k: v for k, v in resources.items() if v is not None}
    if resources:
        data["resources"] = resources
    if config.metrics:
        data["metrics"] = list(config.metrics)
    if config.timeout:
        data["timeout"] = int(config.timeout) if config.timeout == int(config.timeout) else config.timeout
    return data


def _mounts_to_data(config: JobConfig) -> dict | list:
    def spec(m: Mount) -> str:
        default = (config.workdir or DEFAULT_WORKDIR) if m.name == "code" else f"{NAMED_MOUNT_ROOT}/{m.name}"
        if m.name is not None and m.target == default and not m.read_only:
            return m.source
        return f"{m.source}:{m.target}" + (":ro" if m.read_only else "")
    if all(m.name is not None for m in config.mounts):
        return {m.name: spec(m) for m in config.mounts}
    return [spec(m) for m in config.mounts]


def resolve_env(env: dict[str, str], environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """Replace ${VAR} references with the runner's environment values (error if unset)."""
    resolved = {}
    for name, value in env.items():
        missing = [m for m in ENV_REF_RE.findall(value) if m not in environ]
        if missing:
            raise ConfigError(f"env.{name} refers to ${{{missing[0]}}}, which is not set in your "
                              f"environment; export {missing[0]}=... before running")
        resolved[name] = ENV_REF_RE.sub(lambda m: environ[m.group(1)], value)
    return resolved

# ==== 9. Metrics: the METRIC line protocol ===================================

# METRIC lines arrive in blocks (every METRIC line of one read). A block of plain numeric
# lines is turned into JSON by a few bytes.replace calls and checked by one json.loads, all in
# C (≈ 0.8 µs per sample); any other block is parsed line by line with str methods (≈ 3.5 µs).
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_METRIC_LINE_STARTS = frozenset((b"METRIC", b"METRIC ", b"METRIC\t", b"METRIC\r"))
# Bytes that could make the replaced text valid JSON of another shape than `{"key": number, ...}`.
_NOT_IN_FAST_BLOCK = (b'"', b"\\", b"[", b"{", b"\r")
_JSON_WORDS = (b": true", b": false", b": null")  # JSON values that METRIC keeps as text


def metric_value(text: str) -> int | float | str:
    """Type one METRIC value: ints and floats become numbers, anything else stays text.

    Numbers are what float() reads (1, -2.5, 1e-3, .5, nan, inf, infinity), except spellings
    with `_` (1_000 stays text, as in YAML 1.2).
    """
    digits = text[1:] if text[:1] in "+-" else text
    try:
        if digits.isdecimal():
            return int(text)
        if "_" not in text:
            return float(text)
    except ValueError:
        if digits.isdecimal():   # more digits than int() converts: keep the magnitude
            return float(text)
    return text


@functools.lru_cache(maxsize=4096)
def _metric_key_ok(key: str) -> bool:
    return METRIC_KEY_RE.match(key) is not None


def parse_metric_line(line: bytes | str) -> dict | None:
    """Parse `METRIC k=v [k=v ...]` into {k: v}; None when the line is malformed.

    Only spaces and tabs separate pairs. Malformed: no pairs, a pair without `=` or with an
    empty value, a key that is not letters/digits/`_.-/`, a key given twice, or a `step`
    that is not an integer.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    fields = line.rstrip("\r\n").replace("\t", " ").split(" ")
    if fields[0] != "METRIC":
        return None
    sample: dict = {}
    for item in fields[1:]:
        if not item:
            continue
        key, _, raw = item.partition("=")
        if not raw or key in sample or not _metric_key_ok(key):
            return None
        sample[key] = metric_value(raw)
    if not sample or ("step" in sample and type(sample["step"]) is not int):
        return None
    return sample


def _json_number(value: int | float | str) -> str:
    kind = type(value)
    if kind is float:
        # repr is what json.dumps writes for a finite float; NaN and ±Infinity as Python's json reads them
        return repr(value) if value - value == 0.0 else "NaN" if value != value else _NON_FINITE[value]
    if kind is int:
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def json_safe(value: object) -> object:
    """Strict JSON for other tools (jq, SQLite's json_extract): NaN and ±Infinity become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sample_json(step: int, sample: dict) -> str:
    """One sample as a JSON object, `step` first; hand-written because it is on the hot path."""
    pairs = "".join([f', "{key}": {_json_number(value)}' for key, value in sample.items() if key != "step"])
    return f'{{"step": {step}{pairs}}}'


def is_metric_line(line: bytes) -> bool:
    """`METRIC` alone or followed by a space or tab: the one test of what counts as a METRIC line."""
    return line[:7] in _METRIC_LINE_STARTS


def fast_metric_block(block: bytes, first_step: int) -> tuple[bytes, list[dict]] | None:
    """metrics.json lines and samples for METRIC lines joined by newlines, done in C.

    Only for a block whose every line is `METRIC k=v k=v ...` with single spaces, plain JSON
    numbers as values, valid keys given once, and either `step=<int>` first on every line or
    no step anywhere (then FIRST_STEP, FIRST_STEP + 1, ... as parse_metric_line's caller does).
    Anything else returns None and goes line by line; both ways give the same samples.
    """
    if b"\t" in block:
        block = block.replace(b"\t", b" ")
    lines = block.count(b"\n") + 1
    if block.startswith(b"METRIC step=") and block.count(b"\nMETRIC step=") == lines - 1:
        stepped = True
    elif block.startswith(b"METRIC ") and block.count(b"\nMETRIC ") == lines - 1 and b"step=" not in block:
        stepped = False
    else:
        return None
    if any(bad in block for bad in _NOT_IN_FAST_BLOCK):
        return None
    text = (block.replace(b" ", b', "').replace(b"=", b'": ').replace(b'METRIC, "', b'{"')
            .replace(b"\n", b"},\n") + b"}")
    if any(word in text for word in _JSON_WORDS):
        return None
    try:
        samples = json.loads(b"[" + text + b"]")
    except ValueError:  # a value that is not a JSON number, bytes that are not UTF-8, ...
        return None
    # A key given twice collapses in a dict: every `=` must have become its own key.
    if sum(map(len, samples)) != block.count(b"="):
        return None
    if not all(map(_metric_key_ok, set().union(*samples))):
        return None
    if not stepped:
        numbered = [b'{"step": %d, %s' % (step, line[1:])
                    for step, line in enumerate(text.split(b"\n"), first_step)]
        return b"\n".join(numbered), samples
    if set(map(type, map(operator.itemgetter("step"), samples))) != {int}:
        return None
    return text, samples


def may_hold_metric(data: bytes) -> bool:
    """`b"METRIC" in data`, sooner: memchr finds each `M` at ≈ 100 GB/s where the substring search
    runs at ≈ 2.5 GB/s (0.4 s of CPU per GB of output), and most output has few capital Ms."""
    at = data.find(b"M")
    for _ in range(8):
        if at < 0:
            return False
        if data.startswith(b"METRIC", at):
            return True
        at = data.find(b"M", at + 1)
    return at >= 0 and data.find(b"METRIC", at) >= 0  # M-heavy output: the substring search from here


class MetricScanner:
    """Finds complete METRIC lines in one output stream's chunks, carrying a partial line over.

    Ordinary output costs one `in` test per chunk; only a line that may be a METRIC line is
    kept between reads, and never more than MAX_METRIC_LINE bytes of it.
    """

    def __init__(self) -> None:
        self.pending = b""       # start of the current line, kept only if it may be METRIC
        self.skipping = False    # inside a line known not to be (or too long to be) METRIC
        self.overlong = 0        # METRIC lines dropped for length

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return []
            self.skipping, chunk = False, chunk[newline + 1:]
        data = self.pending + chunk if self.pending else chunk
        if not may_hold_metric(data):
            self._keep_tail(data[data.rfind(b"\n") + 1:])
            return []
        lines = data.split(b"\n")
        self._keep_tail(lines.pop())
        found = list(filter(is_metric_line, lines))
        return [ln.rstrip(b"\r") for ln in found] if b"\r" in data else found

    def finish(self) -> list[bytes]:
        """The last line when the stream ended without a newline."""
        tail, self.pending = self.pending, b""
        return [tail.rstrip(b"\r")] if is_metric_line(tail) else []

    def _keep_tail(self, tail: bytes) -> None:
        if not (b"METRIC".startswith(tail) or is_metric_line(tail)):
            self.pending, self.skipping = b"", bool(tail)
        elif len(tail) > MAX_METRIC_LINE:
            self.pending, self.skipping = b"", True
            self.overlong += 1
        else:
            self.pending = tail


class MetricLog:
    """Appends samples to metrics.json as they arrive; the file is a JSON list once closed.

    One sample per line, so a reader can recover every complete sample of a run that was
    killed before close() (see read_metrics).
    """

    def __init__(self, path: Path, watched: tuple[str, ...] = ()) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.write(self.fd, b"[\n")
        self.error: OSError | None = None
        self.count = 0
        self.malformed = 0
        self.last: dict = {}
        self.watched = watched

    def add_lines(self, lines: list[bytes]) -> None:
        """Parse and append the METRIC lines of one read in a single write."""
        if not lines:
            return
        block = b"\n".join(lines)
        fast = fast_metric_block(block, self.count + 1)
        if fast is not None:
            text, samples = fast
            self._newest_values(samples)
        else:
            text, samples = self._line_by_line(block)
        if not samples:
            return
        text = (b"\n" if self.count == 0 else b",\n") + text
        self.count += len(samples)
        if self.error is None:
            try:
                write_all(self.fd, text)
            except OSError as exc:  # a full disk: the runner stops the job and says so
                self.error = exc

    def _line_by_line(self, block: bytes) -> tuple[bytes, list[dict]]:
        out, samples = [], []
        for line in block.decode("utf-8", "replace").split("\n"):  # one decode per read
            sample = parse_metric_line(line)
            if sample is None:
                self.malformed += 1
                continue
            samples.append(sample)
            out.append(sample_json(sample.get("step", self.count + len(samples)), sample))
            self.last.update(sample)
        self.last.pop("step", None)  # a position, not a metric
        return ",\n".join(out).encode("utf-8"), samples

    def _newest_values(self, samples: list[dict]) -> None:
        """`last.update(sample)` for every sample, looking only at as many as hold every key."""
        keys = dict.fromkeys(itertools.chain.from_iterable(samples))  # in order of first appearance
        keys.pop("step", None)
        wanted, newest = set(keys), {}
        for sample in reversed(samples):
            for key in wanted.intersection(sample):
                newest[key] = sample[key]
            wanted.difference_update(sample)
            if not wanted:
                break
        for key in keys:
            self.last[key] = newest[key]

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                if self.error is None:
                    os.write(self.fd, b"\n]\n")
            os.close(self.fd)
            self.fd = -1


def read_metrics(path: Path) -> list[dict]:
    """Every complete sample in a metrics.json, also one left unterminated by a crash."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    samples = []
    for line in text.splitlines():
        line = line.rstrip(",").strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                samples.append(json.loads(line))
    return samples

# ==== 10. Engines: choosing one, its command line, its images ================

def _quiet(argv: list[str], timeout: float = 30, env=None) -> subprocess.CompletedProcess:
    """Run a short helper command and capture its output; never raises for a bad status."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=None if env is None else dict(env))
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def container_name(run_id: str) -> str:
    return f"runpilot-{run_id}"


def choose_engine(flag: str | None, config: JobConfig, environ, which=None) -> str:
    """--engine, then the config's `engine`, then RUNPILOT_ENGINE, then docker if present, else podman."""
    which = which or shutil.which
    for choice, where in ((flag, "--engine"), (config.engine, "the config"),
                          (environ.get("RUNPILOT_ENGINE"), "RUNPILOT_ENGINE")):
        if choice:
            if choice not in ENGINES:
                raise UsageError(f"{where} names engine {choice!r}; choose one of {', '.join(ENGINES)}")
            return choice
    for candidate in ("docker", "podman"):
        if which(candidate):
            return candidate
    raise EngineError("neither docker nor podman is installed; install one (apt-get install docker.io "
                      "or podman), or run without a container with --engine local")


def gpu_args(engine: str, gpus: int | str | tuple[str, ...] | None) -> list[str]:
    """Docker's --gpus value, or Podman's CDI devices, for a count, 'all' or device ids."""
    if gpus is None:
        return []
    if engine == "docker":
        if isinstance(gpus, tuple):
            return ["--gpus", f'"device={",".join(gpus)}"']  # Docker parses this value as CSV
        return ["--gpus", str(gpus)]
    if gpus == "all":
        devices = ["all"]
    elif isinstance(gpus, int):
        devices = [str(i) for i in range(gpus)]
    else:
        devices = list(gpus)
    return [arg for d in devices for arg in ("--device", f"nvidia.com/gpu={d}")]


def job_environment(config: JobConfig, run_id: str, mount_paths: dict[str, str]) -> dict[str, str]:
    """What the job sees in its environment besides the image's own (values, not yet ${VAR}-resolved)."""
    env = {"PYTHONUNBUFFERED": "1", "RUNPILOT_RUN_ID": run_id}
    for name, path in mount_paths.items():
        env["RUNPILOT_MOUNT_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()] = path
    env.update(config.env)
    return env


def build_engine_argv(config: JobConfig, run_id: str, engine: str, env_names: list[str],
                      keep_engine_logs: bool = False) -> list[str]:
    """The `docker run` / `podman run` argv for a job (pure: no I/O, tested without an engine).

    Env values never appear here (anyone can read argv in `ps`): `-e NAME` makes the engine
    take each value from its own environment, which the runner sets.
    """
    argv = [engine, "run", "--rm", "--init", "--pull", "never",
            "--name", container_name(run_id), "--label", f"{RUN_LABEL}={run_id}"]
    if not keep_engine_logs:
        argv += ["--log-driver", "none"]
    for name in env_names:
        argv += ["-e", name]
    for m in config.mounts:
        argv += ["-v", f"{m.source}:{m.target}" + (":ro" if m.read_only else "")]
    if config.workdir:
        argv += ["-w", config.workdir]
    res = config.resources
    argv += gpu_args(engine, res.gpus)
    if res.cpu is not None:
        argv += ["--cpus", f"{res.cpu:g}"]
    if res.memory is not None:
        argv += ["--memory", str(res.memory)]
    if res.shm_size is not None:
        argv += ["--shm-size", str(res.shm_size)]
    if isinstance(config.entrypoint, str):
        return argv + ["--entrypoint", "/bin/sh", str(config.image), "-c", config.entrypoint]
    return argv + ["--entrypoint", config.entrypoint[0], str(config.image), *config.entrypoint[1:]]


def local_argv(config: JobConfig) -> list[str]:
    """The host command for engine `local`: a string runs through /bin/sh, a list as is."""
    if isinstance(config.entrypoint, str):
        return ["/bin/sh", "-c", config.entrypoint]
    return list(config.entrypoint)


def local_workdir(config: JobConfig) -> str:
    """Engine `local` runs in the `code` mount's folder, else in the config file's folder."""
    for m in config.mounts:
        if m.name == "code":
            return m.source
    return str(Path(config.source).parent) if config.source else os.getcwd()


def local_gpu_env(gpus: int | str | tuple[str, ...] | None) -> dict[str, str]:
    if gpus is None:
        return {"CUDA_VISIBLE_DEVICES": ""}
    if gpus == "all":
        return {}
    if isinstance(gpus, int):
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def _engine_down(engine: str, stderr: str) -> EngineError | None:
    """What the engine CLI's stderr says when it could not use its daemon, as one line with the fix."""
    text = stderr.lower()
    if "permission denied" in text and "daemon socket" in text:  # not in the docker group
        where = re.search(r"unix://(\S+?):? ", stderr)
        sock = where.group(1) if where else "the daemon's socket"
        return EngineError(f"this user may not use the {engine} engine (permission denied on {sock}); add it "
                           f"to the {engine} group ('sudo usermod -aG {engine} $USER', then log in again), "
                           "or use rootless Docker or Podman")
    if "cannot connect" in text or "is the docker daemon running" in text or "connection refused" in text:
        first = stderr.strip().splitlines()[0] if stderr.strip() else ""
        return EngineError(f"the {engine} engine is not answering ({first}); start it "
                           f"(e.g. 'sudo systemctl start {engine}' or 'sudo dockerd &') and retry")
    return None


def docker_socket(environ) -> str | None:
    """The Unix socket of the Docker daemon the CLI would use, or None when it uses another kind.

    DOCKER_HOST, DOCKER_CONTEXT or a context chosen with `docker context use` may point the CLI
    elsewhere (TCP, SSH, another daemon): then only the CLI knows, and None says so.
    """
    if environ.get("DOCKER_CONTEXT"):
        return None
    host = environ.get("DOCKER_HOST")
    if host:
        return host.removeprefix("unix://") if host.startswith("unix://") else None
    config_dir = environ.get("DOCKER_CONFIG") or os.path.join(environ.get("HOME") or "~", ".docker")
    context = read_json(Path(os.path.expanduser(config_dir)) / "config.json").get("currentContext")
    return "/var/run/docker.sock" if context in (None, "", "default") else None


def docker_api_get(sock_path: str, url: str, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """GET URL from the Docker Engine API on a Unix socket: (status, body), or None if unreachable.

    HTTP/1.0, so the daemon closes the connection after one plain (never chunked) response.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(sock_path)
            conn.sendall(f"GET {url} HTTP/1.0\r\nHost: docker\r\n\r\n".encode("ascii"))
            chunks = []
            while chunk := conn.recv(READ_SIZE):
                chunks.append(chunk)
    except OSError:  # no such socket, no permission, refused, timed out
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    return (int(status[0]), body) if status and status[0].isdigit() else None


def _docker_api_image(image: str, environ) -> tuple[bool, dict | None]:
    """`docker image inspect` asked of the daemon's socket, which takes ≈ 1 ms instead of the CLI's 20.

    (True, info) or (True, None) for an image that is not present; (False, None) when only the CLI
    can answer (another daemon, an unusual name, an error): the caller asks the CLI then.
    """
    sock_path = docker_socket(environ)
    if sock_path is None or not DOCKER_IMAGE_REF_RE.match(image):
        return False, None
    reply = docker_api_get(sock_path, f"/images/{image}/json")
    if reply is None or reply[0] not in (200, 404):
        return False, None
    if reply[0] == 404:
        return True, None
    try:
        data = json.loads(reply[1])
        return True, {"image_id": str(data["Id"]), "repo_digests": list(data.get("RepoDigests") or [])}
    except (ValueError, KeyError, TypeError):
        return False, None


def prepare_image(engine: str, image: str, pull: str, cache: Path | None = None) -> dict:
    """Make sure the image is present (pulling it as its own phase) and return its id and digests.

    CACHE (a JSON file) keeps Podman's answers while its image store is unchanged.
    """
    info = _inspect_image(engine, image, cache if pull != "always" else None)
    if info is None or pull == "always":
        if pull == "never":
            raise EngineError(f"image {image} is not present locally and --pull never was given; "
                              f"pull it ({engine} pull {image}) or build it")
        say(f"pulling {image} ...")
        sys.stderr.flush()
        try:
            status = subprocess.run([engine, "pull", image], stdin=subprocess.DEVNULL,
                                    stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno()).returncode
        except (OSError, ValueError):
            status = subprocess.run([engine, "pull", image], stdin=subprocess.DEVNULL,
                                    capture_output=True).returncode
        if status != 0:
            raise EngineError(f"could not pull image {image} ({engine} pull exited {status}); check "
                              "the name and your registry access, or build the image locally")
        info = _inspect_image(engine, image) or {}
    return info


def _inspect_image(engine: str, image: str, cache: Path | None = None) -> dict | None:
    if not shutil.which(engine):
        raise EngineError(f"{engine} is not installed (not found on PATH); install it "
                          f"(apt-get install {'docker.io' if engine == 'docker' else 'podman'}) "
                          "or choose another engine with --engine")
    if engine == "docker":
        answered, info = _docker_api_image(image, os.environ)
        if answered:
            return info
    elif cache is not None:
        known = podman_cached_image(cache, image)
        if known is not None:
            return known
    done = _quiet([engine, "image", "inspect", "--format",
                   "{{.Id}}|{{json .RepoDigests}}|{{.GraphDriver.Name}}|{{json .GraphDriver.Data}}", image])
    if done.returncode != 0:
        down = _engine_down(engine, done.stderr)
        if down:
            raise down
        if IMAGE_MISSING_RE.search(done.stderr):
            return None
        first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit status {done.returncode}"
        raise EngineError(f"{engine} could not look up image {image} ({first}); check that "
                          f"'{engine} image inspect {image}' works for this user")
    image_id, digests, driver, driver_data = (done.stdout.strip().split("|", 3) + ["", "", ""])[:4]
    try:
        info = {"image_id": image_id, "repo_digests": json.loads(digests) or []}
    except ValueError:
        info = {"image_id": image_id, "repo_digests": []}
    if engine == "podman" and cache is not None:
        podman_remember_image(cache, image, info, _podman_image_store(driver, driver_data))
    return info


# Podman has no daemon to ask: `podman image inspect` starts the whole CLI (≈ 35 ms). Its image
# store rewrites <graphroot>/<driver>-images/images.lock on every change to any image (pull, tag,
# rmi), which is how Podman itself knows to reload it; an answer recorded with the same lock
# bytes, binary and storage settings is still the answer.
def _podman_image_store(driver: str, driver_data: str) -> str | None:
    """<graphroot>/<driver>-images, from an image's layer folder <graphroot>/<driver>/<id>/diff."""
    with contextlib.suppress(ValueError, AttributeError):
        upper = Path(json.loads(driver_data).get("UpperDir") or "")
        if driver and upper.name == "diff" and upper.parent.parent.name == driver:
            return str(upper.parent.parent.parent / f"{driver}-images")
    return None


def _podman_store_state(store: str) -> str | None:
    """What must be unchanged for a remembered answer to hold: the store's lock bytes and settings."""
    try:
        lock = Path(store, "images.lock").read_bytes().hex()
    except OSError:
        return None
    return json.dumps([lock, _engine_key("podman"), os.environ.get("CONTAINERS_STORAGE_CONF"), os.getuid()])


def podman_cached_image(cache: Path, image: str) -> dict | None:
    entry = read_json(cache).get(image)
    if not isinstance(entry, dict) or not entry.get("store") or not entry.get("image_id"):
        return None
    if _podman_store_state(entry["store"]) != entry.get("state"):
        return None
    return {"image_id": entry["image_id"], "repo_digests": entry.get("repo_digests") or []}


def podman_remember_image(cache: Path, image: str, info: dict, store: str | None) -> None:
    state = _podman_store_state(store) if store else None
    if state is None:
        return
    known = {k: v for k, v in read_json(cache).items() if isinstance(v, dict) and v.get("state") == state}
    known[image] = {**info, "store": store, "state": state}  # answers of an older store state are dropped
    with contextlib.suppress(OSError):  # a parallel run may write the same answer
        write_atomic(cache, json.dumps(known).encode(), durable=False)

# ==== 11. Host facts: GPUs, git, the engine's version, the runner ============

# Where Podman looks for CDI specs (`nvidia-ctk cdi generate` writes one of these).
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
# A working-tree diff larger than this is not copied into the run folder (only noted).
GIT_DIFF_MAX = 1 << 20
NVIDIA_QUERY = "index,uuid,name,driver_version,memory.total"


def parse_gpu_csv(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,name,driver_version,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5 and cells[0].isdigit():
            memory = int(cells[4]) if cells[4].isdigit() else None
            gpus.append({"index": int(cells[0]), "uuid": cells[1], "name": cells[2], "driver": cells[3],
                         "memory_mib": memory})
    return gpus


def parse_cuda_version(banner: str) -> str | None:
    """The `CUDA Version: 12.2` of nvidia-smi's banner (the driver's CUDA, not the image's)."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return match.group(1) if match else None


def gpu_shortfall(requested: int | str | tuple[str, ...], gpus: list[dict]) -> str | None:
    """Why the GPUs found cannot satisfy the request, or None."""
    if not gpus:
        return "nvidia-smi lists no GPU on this machine"
    if isinstance(requested, int) and requested > len(gpus):
        return f"resources.gpus asks for {requested} GPUs but this machine has {len(gpus)}"
    if isinstance(requested, tuple):
        known = {str(g["index"]) for g in gpus} | {g["uuid"] for g in gpus}
        missing = [d for d in requested if d not in known]
        if missing:
            return (f"resources.gpus names {', '.join(missing)}, which this machine does not have "
                    f"(it has {', '.join(str(g['index']) for g in gpus)})")
    return None


def engine_gpu_problem(engine: str, environ) -> str | None:
    """Whether the engine is set up to hand NVIDIA GPUs to containers."""
    path = environ.get("PATH")
    if engine == "docker" and not any(shutil.which(tool, path=path) for tool in (
            "nvidia-container-runtime-hook", "nvidia-container-runtime", "nvidia-ctk")):
        return ("docker cannot reach the GPUs: the NVIDIA Container Toolkit is not installed; install "
                "nvidia-container-toolkit, run 'sudo nvidia-ctk runtime configure --runtime=docker' and restart docker")
    if engine == "podman" and not _has_nvidia_cdi_spec():
        return ("podman cannot reach the GPUs: no CDI spec for nvidia.com/gpu; run "
                "'sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml'")
    return None


def _has_nvidia_cdi_spec() -> bool:
    for folder in CDI_DIRS:
        for spec in sorted(Path(folder).glob("*.*")) if Path(folder).is_dir() else []:
            with contextlib.suppress(OSError):
                if "nvidia.com/gpu" in spec.read_text(errors="replace"):
                    return True
    return False


def query_gpus(environ) -> dict:
    """What nvidia-smi reports: {"devices", "driver", "cuda"} or {"error": why it cannot tell}."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if not smi:
        return {"error": "the NVIDIA driver is not installed here (nvidia-smi not found on PATH)"}
    done = _quiet([smi, f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"], 30, environ)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return {"error": f"nvidia-smi failed (exit {done.returncode}): {said[0] if said else 'no output'}"}
    devices = parse_gpu_csv(done.stdout)
    banner = _quiet([smi], 30, environ).stdout
    return {"devices": devices, "driver": devices[0]["driver"] if devices else None,
            "cuda": parse_cuda_version(banner)}


def gpu_facts(requested, engine: str, check: bool, environ) -> dict:
    """Check that the GPUs asked for exist (unless told not to) and describe what the run saw."""
    if requested is None:
        return {"requested": None, "devices": []}
    found = query_gpus(environ)
    if check:
        problem = found.get("error") or gpu_shortfall(requested, found["devices"])
        problem = problem or (engine_gpu_problem(engine, environ) if engine != "local" else None)
        if problem:
            raise GpuError(f"{problem}; or start anyway with --no-gpu-check")
    return {"requested": list(requested) if isinstance(requested, tuple) else requested, **found}


def git_facts(folder: str) -> dict | None:
    """Commit, branch and dirtiness of the git work tree holding a folder (None outside git)."""
    top = _quiet(["git", "-C", folder, "rev-parse", "--show-toplevel"], timeout=20)
    if top.returncode != 0:
        return None
    status = _quiet(["git", "-C", folder, "status", "--porcelain=v2", "--branch"], timeout=60).stdout
    heads = dict(line[2:].split(" ", 1) for line in status.splitlines()
                 if line.startswith("# branch.") and " " in line[2:])
    changes = [line for line in status.splitlines() if not line.startswith("#")]
    return {"root": top.stdout.strip(), "commit": heads.get("branch.oid"), "branch": heads.get("branch.head"),
            "dirty": bool(changes)}


def engine_version(engine: str, cache: Path) -> str | None:
    """The engine's (server's) version, asked once per engine binary and daemon start.

    Asking costs a round trip that competes with the container's start on a small machine, so
    the answer is kept in `cache`, keyed by the binary and (for Docker) its socket's mtime.
    """
    key = _engine_key(engine)
    known = read_json(cache).get(engine) or {}
    if key and known.get("key") == key:
        return known.get("version")
    fmt = "{{.Server.Version}}" if engine == "docker" else "{{.Client.Version}}"
    version = _quiet([engine, "version", "--format", fmt]).stdout.strip() or None
    if version and key:
        with contextlib.suppress(OSError):  # a parallel run may write the same answer
            write_atomic(cache, json.dumps({**read_json(cache), engine: {"key": key, "version": version}}).encode())
    return version


def _engine_key(engine: str) -> str | None:
    binary = shutil.which(engine)
    if not binary:
        return None
    parts = [binary, os.stat(binary).st_mtime_ns]
    if engine == "docker":
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        with contextlib.suppress(OSError):
            parts.append(os.stat(host.removeprefix("unix://")).st_mtime_ns)  # a new daemon, a new socket
    return json.dumps(parts)


class StartProbes:
    """Facts gathered in the background while the job starts: engine version, git state of mounts."""

    def __init__(self, engine: str, config: JobConfig, cache: Path) -> None:
        import threading
        self.engine = engine
        self.cache = cache
        self.folders = [m.source for m in config.mounts if os.path.isdir(m.source)]
        if engine == "local" and config.source:
            self.folders.append(local_workdir(config))
        self.facts: dict = {}
        self.thread = threading.Thread(target=self._probe, daemon=True)
        self.thread.start()

    def _probe(self) -> None:
        if self.engine != "local":
            self.facts["engine_version"] = engine_version(self.engine, self.cache)
        repos: dict[str, dict] = {}
        for folder in self.folders:
            facts = git_facts(folder)
            if facts and facts["root"] not in repos:
                repos[facts["root"]] = facts
        if repos:
            self.facts["git"] = list(repos.values())
            self.diffs = {root: _quiet(["git", "-C", root, "diff", "HEAD"], timeout=60).stdout
                          for root, f in repos.items() if f["dirty"]}

    def collect(self, run_dir: Path) -> dict:
        """Wait for the probes (briefly) and write git.diff when the changes are small."""
        self.thread.join(timeout=60)
        diffs = getattr(self, "diffs", {})
        text = "".join(f"# {root}\n{diff}" for root, diff in diffs.items() if diff)
        if text and len(text) <= GIT_DIFF_MAX:
            with contextlib.suppress(OSError):
                write_private(run_dir / "git.diff", text.encode("utf-8", "replace"))
        for repo in self.facts.get("git", []):
            repo["diff_saved"] = bool(text) and len(text) <= GIT_DIFF_MAX and repo["dirty"]
        return dict(self.facts)

def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (tells a reused PID apart)."""
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    return None


def hostname() -> str:
    """socket.gethostname() without importing socket: both read the kernel's node name."""
    return os.uname().nodename


def runner_identity() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": hostname(), "boot_id": _boot_id(),
            "start": _process_start(pid)}


def runner_alive(runner: dict) -> bool | None:
    """Whether the process that runs a run still exists; None when it cannot be told from here."""
    if not runner or runner.get("host") != hostname():
        return None
    if runner.get("boot_id") and runner.get("boot_id") != _boot_id():
        return False  # the machine rebooted since
    pid = runner.get("pid")
    if not isinstance(pid, int):
        return None
    if runner.get("start") is not None and Path("/proc").is_dir():
        return _process_start(pid) == runner["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

# ==== 12. Process I/O: the tee loop, signals, stopping the job ===============

@dataclass
class Launch:
    """How to start one job: the argv, its full environment, and how to stop it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    engine: str
    container: str | None = None      # container name; None for engine `local`


def _grow_pipe(fd: int) -> None:
    """Ask Linux for a PIPE_SIZE pipe buffer (fewer wake-ups for a loud job); fine if refused."""
    import fcntl
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class Job:
    """A started job: the engine CLI (or the local process) in its own process group."""

    def __init__(self, launch: Launch, stop_timeout: float) -> None:
        self.launch = launch
        self.stop_timeout = stop_timeout
        self.helpers: list[subprocess.Popen] = []
        self.kill_at: float | None = None
        self.first_stop = 0.0
        self.last_stop = 0.0
        self.proc = subprocess.Popen(
            launch.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=launch.env, cwd=launch.cwd, start_new_session=True)  # our signals, not the tty's
        for pipe in (self.proc.stdout, self.proc.stderr):
            _grow_pipe(pipe.fileno())

    def request_stop(self, force: bool) -> None:
        """SIGTERM through the engine, SIGKILL after the grace period (or at once if force)."""
        self.last_stop = time.monotonic()
        self.first_stop = self.first_stop or self.last_stop
        if self.launch.container is None:
            self._signal_group(signal.SIGKILL if force else signal.SIGTERM)
            self.kill_at = self.last_stop if force else self.last_stop + self.stop_timeout
            return
        engine, name = self.launch.engine, self.launch.container
        argv = [engine, "kill", name] if force else [engine, "stop", "-t", str(int(self.stop_timeout)), name]
        self.helpers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True))

    def tick(self) -> None:
        """Escalate a stop that the job ignores; retry one sent before the container existed."""
        now = time.monotonic()
        if self.launch.container is None:
            if self.kill_at is not None and now >= self.kill_at and self.proc.poll() is None:
                self._signal_group(signal.SIGKILL)
                self.kill_at = None
        elif self.last_stop and self.proc.poll() is None and now - self.last_stop > 2 and \
                all(h.poll() is not None for h in self.helpers):
            self.request_stop(force=now - self.first_stop > self.stop_timeout + 5)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def reap_helpers(self) -> None:
        for helper in self.helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(timeout=self.stop_timeout + 15)

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


class StopSignals:
    """Records SIGINT/SIGTERM/SIGHUP while a run is live; the loop acts on them."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if sys.platform == "win32" or not _in_main_thread():
            return self
        for sig in self.HANDLED:
            old = signal.getsignal(sig)
            if sig == signal.SIGHUP and old == signal.SIG_IGN:
                continue  # started under nohup: the user asked the run to survive a hang-up
            self.previous[sig] = old
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


@dataclass
class TeeResult:
    """What happened while the job ran."""

    returncode: int
    stop_reason: str | None = None      # "interrupted" or "timeout"
    stop_signal: int | None = None
    log_error: OSError | None = None


class Tee:
    """Copies the job's stdout/stderr to the terminal and logs.txt and feeds METRIC lines on.

    The loop follows subprocess.Popen._communicate: a selector over both pipes, os.read of
    large chunks, bytes all the way, unregister on EOF.
    """

    def __init__(self, log_fd: int, metrics: MetricLog, terminal: dict) -> None:
        self.log_fd = log_fd
        self.metrics = metrics
        self.term = dict(terminal)   # 1 and 2 -> a function writing bytes, or None
        self.log_error: OSError | None = None

    def run(self, job: Job, signals: StopSignals, timeout: float | None) -> TeeResult:
        """Tee until both pipes close and the job has exited; act on signals, timeout, full disk."""
        self.job, self.signals, self.result = job, signals, TeeResult(returncode=0)
        self.deadline = time.monotonic() + timeout if timeout else None
        self.handled, self.exited_at = 0, None
        sel = selectors.DefaultSelector()
        scanners = {}
        for which, pipe in ((1, job.proc.stdout), (2, job.proc.stderr)):
            scanners[pipe.fileno()] = (which, MetricScanner())
            sel.register(pipe.fileno(), selectors.EVENT_READ)
        next_check = 0.0
        while sel.get_map():
            events = sel.select(POLL_SECONDS)
            for key, _ in events:
                self._pump(sel, key.fd, *scanners[key.fd])
            now = time.monotonic()
            if events and now < next_check and len(signals.received) == self.handled:
                continue  # output is flowing: look after the rest a few times a second, not per read
            next_check = now + HOUSEKEEPING_SECONDS
            self._look_after(sel, now)
        for _, scanner in scanners.values():
            self.metrics.add_lines(scanner.finish())
            self.metrics.malformed += scanner.overlong
        while True:  # both pipes closed; the engine CLI is finishing (docker's --rm, podman's cleanup)
            try:  # Popen.wait polls from 0.5 ms up: the exit is seen at once, not up to 50 ms late
                job.proc.wait(timeout=POLL_SECONDS / 4)
                break
            except subprocess.TimeoutExpired:
                self._on_signals()
                job.tick()
        self.result.returncode = job.proc.returncode
        self.result.log_error = self.log_error
        return self.result

    def _look_after(self, sel, now: float) -> None:
        """Signals, the timeout, a full disk, an ignored stop, pipes held by an orphan."""
        job, result = self.job, self.result
        self._on_signals()
        if self.deadline and result.stop_reason is None and now > self.deadline:
            result.stop_reason = "timeout"
            job.request_stop(force=False)
        self.log_error = self.log_error or self.metrics.error
        if self.log_error and result.stop_reason is None:
            result.stop_reason = "failed"
            job.request_stop(force=False)
        job.tick()
        self._drop_orphan_pipes(sel)

    def _pump(self, sel, fd: int, which: int, scanner: MetricScanner) -> None:
        chunk = os.read(fd, READ_SIZE)
        if not chunk:
            sel.unregister(fd)
            return
        self._to_terminal(which, chunk)
        self._to_log(chunk)
        lines = scanner.feed(chunk)
        if lines:
            self.metrics.add_lines(lines)
        if len(chunk) < READ_SIZE // 4:
            time.sleep(FILL_PAUSE)  # let the pipe fill: fewer, larger reads cost less CPU per byte

    def _to_terminal(self, which: int, chunk: bytes) -> None:
        write = self.term.get(which)
        if write is None:
            return
        try:
            write(chunk)
        except OSError:  # the reader went away (a closed pipe): keep logging, stop echoing
            self.term[which] = None

    def _to_log(self, chunk: bytes) -> None:
        if self.log_error is None:
            try:
                write_all(self.log_fd, chunk)
            except OSError as exc:
                self.log_error = exc

    def _on_signals(self) -> None:
        """The first signal stops the job gracefully, any further one kills it."""
        for signum in self.signals.received[self.handled:]:
            if self.result.stop_signal is None:
                self.result.stop_reason, self.result.stop_signal = "interrupted", signum
                self.job.request_stop(force=False)
            else:
                self.job.request_stop(force=True)
        self.handled = len(self.signals.received)

    def _drop_orphan_pipes(self, sel) -> None:
        """A background child of a local job can hold the pipes open after the job exits."""
        if self.job.proc.poll() is None:
            return
        self.exited_at = self.exited_at or time.monotonic()
        if time.monotonic() - self.exited_at > 2:
            self.job._signal_group(signal.SIGKILL)
            for fd in list(sel.get_map()):
                sel.unregister(fd)

def terminal_writer(stream) -> Callable[[bytes], object] | None:
    """Write raw bytes to a text stream's file descriptor (or decoded, for an in-memory stream)."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return lambda chunk: stream.write(chunk.decode("utf-8", "replace"))
    stream.flush()
    return lambda chunk: write_all(fd, chunk)

# ==== 13. The run store: run folders and the sqlite index ===================

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    exit_code    INTEGER,
    path         TEXT NOT NULL,
    duration     REAL,
    engine       TEXT,
    image        TEXT,
    last_metrics TEXT NOT NULL DEFAULT '{}',
    tags         TEXT NOT NULL DEFAULT '{}',
    watched      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS runs_by_duration ON runs(duration);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs(started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status, started_at);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs(name, started_at);
"""
RUN_COLUMNS = ("id", "name", "status", "started_at", "finished_at", "exit_code", "path",
               "duration", "engine", "image", "last_metrics", "tags", "watched")
JSON_COLUMNS = ("last_metrics", "tags", "watched")


def iso_utc(when: _dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds (`2026-11-28T22:47:05.123Z`); sorts as text in time order."""
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(_dt.datetime.now(_dt.timezone.utc))


def parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_run_id(now: _dt.datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS-xxxxxx`: sorts by start time; 24 random bits tell parallel starts apart."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{os.urandom(3).hex()}"


def _record_from_row(row: tuple) -> RunRecord:
    values = dict(zip(RUN_COLUMNS, row))
    for column in JSON_COLUMNS:
        values[column] = json.loads(values[column])
    return RunRecord(**values)


def record_from_meta(meta: dict, path: Path) -> RunRecord | None:
    """The index row for a run folder, rebuilt from its meta.json (None if unusable)."""
    try:
        return RunRecord(
            id=meta["run_id"], name=str(meta.get("name", "")), status=meta.get("status", "lost"),
            started_at=meta["started_at"], path=str(path), finished_at=meta.get("finished_at"),
            exit_code=meta.get("exit_code"), duration=meta.get("duration"), engine=meta.get("engine"),
            image=meta.get("image"), last_metrics=meta.get("last_metrics") or {},
            tags=meta.get("tags") or {}, watched=meta.get("watched") or [])
    except (KeyError, TypeError):
        return None


class RunStore:
    """`<home>/runs/<id>/` folders (the truth) and `<home>/runs.db` (an index rebuilt from them)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runs_dir = home / "runs"
        self.db_path = home / "runs.db"

    @classmethod
    def default(cls, environ=os.environ) -> "RunStore":
        home = environ.get("RUNPILOT_HOME") or os.path.join(os.path.expanduser("~"), ".runpilot")
        return cls(Path(home).absolute())

    # -- folders ------------------------------------------------------------
    def ensure(self) -> None:
        try:
            for folder in (self.home, self.runs_dir):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {exc.filename or self.home}: {exc.strerror}; "
                             "set RUNPILOT_HOME to a writable folder") from exc

    def create_run_dir(self, wanted: str | None = None) -> tuple[str, Path]:
        """A fresh, exclusively created folder and its id (safe under parallel starts)."""
        self.ensure()
        for _ in range(100):
            run_id = wanted or new_run_id()
            path = self.runs_dir / run_id
            try:
                path.mkdir(mode=0o700)
                return run_id, path
            except FileExistsError:
                if wanted:
                    raise StoreError(f"run {wanted} exists already") from None
                continue
            except OSError as exc:
                raise StoreError(f"cannot create run folder {path}: {exc.strerror}") from exc
        raise StoreError("could not find a free run id after 100 tries")

    # -- database -----------------------------------------------------------
    @contextlib.contextmanager
    def db(self, read_only: bool = False):
        """A connection with the schema in place; a damaged index is set aside and rebuilt.

        A reader on a full or read-only disk still gets the last checkpointed rows.
        """
        self.ensure()
        try:
            conn = self._open()
        except sqlite3.OperationalError as exc:  # locked past the timeout, unwritable, full disk
            if not (read_only and self.db_path.exists()):
                raise StoreError(f"cannot use {self.db_path}: {exc}") from exc
            conn = sqlite3.connect(f"{self.db_path.as_uri()}?immutable=1", uri=True)
            if conn.execute("PRAGMA user_version").fetchone()[0] != DB_SCHEMA_VERSION:
                conn.close()
                raise StoreError(f"cannot use {self.db_path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:     # not a database, or a malformed one
            conn = self._rebuild_damaged(exc)
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: {exc}; 'runpilot reindex' rebuilds it from the run folders") from exc
        finally:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        fresh = not self.db_path.exists()
        if fresh:
            os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.db_path, timeout=DB_TIMEOUT, isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                _while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != DB_SCHEMA_VERSION and self._migrate(conn):
                self._index_folders(conn)
            return conn
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> bool:
        """Create the schema; an index of another version is dropped and rebuilt from the folders."""
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == DB_SCHEMA_VERSION:
                return False  # a parallel process got here first
            if version:
                conn.execute("DROP TABLE IF EXISTS runs")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={DB_SCHEMA_VERSION}")
        return True

    def _rebuild_damaged(self, exc: Exception) -> sqlite3.Connection:
        aside = self.db_path.with_name(f"runs.db.damaged-{int(time.time())}")
        print(f"runpilot: {self.db_path} is damaged ({exc}); moved it to {aside.name} and "
              "rebuilt the index from the run folders", file=sys.stderr)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.db_path}{suffix}", f"{aside}{suffix}")
        try:
            return self._open()
        except sqlite3.DatabaseError as again:
            raise StoreError(f"cannot open {self.db_path}: {again}") from again

    def _index_folders(self, conn: sqlite3.Connection) -> int:
        """Insert a row for every run folder that has none (used on creation and by reindex)."""
        known = {row[0] for row in conn.execute("SELECT id FROM runs")}
        records = []
        for path in sorted(self.runs_dir.glob("*/meta.json")):
            if path.parent.name not in known and RUN_ID_RE.match(path.parent.name):
                record = record_from_meta(read_json(path), path.parent)
                if record:
                    records.append(record)
        with _transaction(conn):
            for record in records:
                conn.execute(_upsert_sql(), _row(record))
        return len(records)

    def reindex(self) -> int:
        """Rebuild runs.db from the run folders; returns the number of runs indexed."""
        self.ensure()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{self.db_path}{suffix}")
        with self.db() as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    def delete(self, record: RunRecord) -> None:
        """Remove a run's folder, then its row (a folder left by a crash comes back on reindex)."""
        path = Path(record.path)
        if path.parent != self.runs_dir or not RUN_ID_RE.match(path.name):
            raise StoreError(f"refusing to delete {path}: not a run folder of {self.runs_dir}")
        trash = self.runs_dir / f".deleting-{path.name}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        with self.db() as conn, _transaction(conn):
            conn.execute("DELETE FROM runs WHERE id = ?", (record.id,))

    def save(self, record: RunRecord) -> None:
        with self.db() as conn, _transaction(conn):
            conn.execute(_upsert_sql(), _row(record))

    def get(self, run_id: str) -> RunRecord | None:
        with self.db(read_only=True) as conn:
            row = conn.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _record_from_row(row) if row else None

    def query(self, where: str = "", params: tuple = (), order: str = "started_at DESC",
              limit: int | None = None) -> list[RunRecord]:
        sql = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.db(read_only=True) as conn:
            return [_record_from_row(row) for row in conn.execute(sql, params)]

    def resolve(self, ref: str) -> RunRecord:
        """A run by full id, unique id prefix, `latest` or `-N` (N-th newest)."""
        if ref in ("latest", "last") or re.fullmatch(r"-\d+", ref):
            offset = 0 if not ref.startswith("-") else int(ref[1:]) - 1
            rows = self.query(limit=1 if offset < 0 else offset + 1)
            if len(rows) <= max(offset, 0):
                raise StoreError(f"there is no run {ref!r} yet; start one with runpilot run CONFIG")
            return rows[max(offset, 0)]
        if not re.fullmatch(r"[0-9a-f-]{1,22}", ref):
            raise UsageError(f"{ref!r} is not a run id; run ids look like 20261128-224705-a3f9c1 "
                             "(see runpilot list)")
        rows = self.query("id >= ? AND id < ?", (ref, ref + "\x7f"), order="id", limit=6)
        if not rows:
            raise StoreError(f"no run matches {ref!r}; see runpilot list")
        if len(rows) > 1 and rows[0].id != ref:
            ids = ", ".join(r.id for r in rows[:5])
            raise StoreError(f"{ref!r} matches several runs ({ids}{', ...' if len(rows) > 5 else ''}); "
                             "give more of the id")
        return rows[0]


def _while_locked(action):
    """Retry what SQLite refuses at once with 'database is locked' (switching to WAL does) until DB_TIMEOUT."""
    deadline = time.monotonic() + DB_TIMEOUT
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE waits for a parallel writer instead of failing with 'database is locked'."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _upsert_sql() -> str:
    return (f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in RUN_COLUMNS)})")


def _row(record: RunRecord) -> tuple:
    values = dataclasses.asdict(record)
    for column in JSON_COLUMNS:
        values[column] = json.dumps(json_safe(values[column]), sort_keys=True)
    return tuple(values[c] for c in RUN_COLUMNS)


# ==== 14. Orchestration: run_job and the life of a run =======================

@dataclass
class RunOptions:
    """Choices made on the command line rather than in the config."""

    engine: str | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    keep_engine_logs: bool = False
    pull: str = "missing"                         # always | missing | never
    tags: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    gpu_check: bool = True
    rerun_of: str | None = None
    previous: dict = field(default_factory=dict)  # meta.json of the run being rerun
    run_id: str | None = None                     # chosen by the parent of a detached run


@dataclass
class RunOutcome:
    record: RunRecord
    exit_code: int
    meta: dict


def make_launch(config: JobConfig, run_id: str, engine: str, env: dict[str, str],
                options: RunOptions, environ) -> Launch:
    """Argv, environment and folder of the job for its engine."""
    child_env = dict(environ)
    if engine == "local":
        child_env.update(local_gpu_env(config.resources.gpus))
        child_env.update(env)
        return Launch(local_argv(config), child_env, local_workdir(config), engine)
    child_env.update(env)
    argv = build_engine_argv(config, run_id, engine, list(env), options.keep_engine_logs)
    return Launch(argv, child_env, None, engine, container_name(run_id))


def base_meta(config: JobConfig, run_id: str, engine: str, launch: Launch, options: RunOptions) -> dict:
    return {
        "run_id": run_id, "name": config.name, "status": "running", "started_at": utc_now(),
        "finished_at": None, "duration": None, "exit_code": None,
        "engine": engine, "engine_version": None, "image": config.image,
        "command": launch.argv, "command_line": shlex.join(launch.argv), "container": launch.container,
        "workdir": launch.cwd if engine == "local" else config.workdir,
        "host": hostname(), "user": _user(), "runpilot_version": __version__,
        "python": ".".join(map(str, sys.version_info[:3])), "os": _os_name(), "runner": runner_identity(),
        "config_file": config.source, "tags": options.tags, "overrides": options.overrides,
        "rerun_of": options.rerun_of, "metrics": {"count": 0, "malformed": 0}, "watched": list(config.metrics),
        "config": config_to_dict(config),
        "last_metrics": {}, "warnings": [],
    }


def _os_name() -> str:
    """`Linux-6.1.0-amd64-x86_64`, like platform.platform() without its 6 ms of probing."""
    u = os.uname()
    return f"{u.sysname}-{u.release}-{u.machine}"


def _user() -> str | None:
    with contextlib.suppress(KeyError, OSError):  # no name for this uid (containers, LDAP outages)
        return getpass.getuser()
    return None


def record_of(meta: dict, path: Path) -> RunRecord:
    record = record_from_meta(meta, path)
    assert record is not None
    return record


def record_start(store: RunStore, config: JobConfig, path: Path, meta: dict) -> None:
    """Write config.yaml and meta.json and insert the `running` row; on failure leave nothing."""
    try:
        write_private(path / "config.yaml", dump_yaml(config_to_dict(config)).encode("utf-8"))
        write_atomic(path / "meta.json", _meta_bytes(meta), durable=False)  # the final write is durable
        store.save(record_of(meta, path))
    except (OSError, sqlite3.Error) as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise StoreError(f"cannot record the run in {store.home}: {exc}; free some space or set "
                         "RUNPILOT_HOME to a writable folder") from exc


def _meta_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def job_exit_code(returncode: int) -> int:
    """A shell's spelling of how the job ended: a local process killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def finish_status(result: TeeResult) -> tuple[str, int]:
    """The run's status and RunPilot's exit status from how the job ended."""
    if result.stop_reason == "interrupted":
        return "interrupted", 128 + (result.stop_signal or signal.SIGINT)
    if result.stop_reason == "timeout":
        return "timeout", 124
    code = job_exit_code(result.returncode)
    if result.log_error is not None:
        return "failed", code or 1
    return ("succeeded" if code == 0 else "failed"), code


def run_job(config: JobConfig, options: RunOptions, store: RunStore, terminal: dict | None = None,
            environ=None) -> RunOutcome:
    """Run one job end to end: check, record `running`, tee its output, record how it ended."""
    environ = os.environ if environ is None else environ
    engine = choose_engine(options.engine, config, environ)
    config = dataclasses.replace(config, engine=engine)  # the stored config says where it ran
    env = resolve_env(job_environment(config, "", _mount_env(config, engine)), environ)
    facts = check_host(config, engine, options, environ, store)  # raises before anything is recorded
    run_id, path = store.create_run_dir(options.run_id)
    env["RUNPILOT_RUN_ID"] = run_id
    launch = make_launch(config, run_id, engine, env, options, environ)
    meta = {**base_meta(config, run_id, engine, launch, options), **facts}
    with StopSignals() as signals:  # from here on, Ctrl-C is recorded, never a half-written run
        record_start(store, config, path, meta)
        _announce(config, run_id, engine, path)
        probes = StartProbes(engine, config, store.home / "engines.json")
        result = _supervise(launch, options, config, path, meta, terminal, signals)
        meta.update(probes.collect(path))
        return _finish(store, config, path, meta, result, options.previous)


def check_host(config: JobConfig, engine: str, options: RunOptions, environ, store: RunStore) -> dict:
    """Fail fast on what would stop the job from starting; return the facts learnt for meta.json."""
    facts: dict = {}
    if engine == "local":
        program = local_argv(config)[0]
        found = program if "/" in program else shutil.which(program, path=environ.get("PATH"))
        if not found:
            raise ConfigError(f"{program} (the entrypoint) is not found on PATH for engine local", config.source)
        facts["executable"] = os.path.abspath(found)
    else:
        facts.update(prepare_image(engine, str(config.image), options.pull, store.home / "podman-images.json"))
    facts["gpus"] = gpu_facts(config.resources.gpus, engine, options.gpu_check, environ)
    return facts


def _mount_env(config: JobConfig, engine: str) -> dict[str, str]:
    """RUNPILOT_MOUNT_<NAME> for each named mount: its path as the job sees it."""
    return {m.name: (m.source if engine == "local" else m.target) for m in config.mounts if m.name}


def _announce(config: JobConfig, run_id: str, engine: str, path: Path) -> None:
    what = f"{config.image} on {engine}" if engine != "local" else "on this host (engine local)"
    say(f"run {run_id} ({config.name}) starting: {what}")
    if engine == "local":
        ignored = [k for k, v in (("workdir", config.workdir), ("image", config.image)) if v]
        if ignored:
            say(f"engine local ignores {' and '.join(ignored)}: the job runs in {local_workdir(config)}")
        if config.resources.cpu or config.resources.memory or config.resources.shm_size:
            say("engine local does not enforce resources.cpu, memory or shm_size")


def _supervise(launch: Launch, options: RunOptions, config: JobConfig, path: Path, meta: dict,
               terminal: dict | None, signals: StopSignals) -> TeeResult:
    """Start the job and tee it until it ends; after a stop, make sure nothing of it is left."""
    if terminal is None:
        terminal = {1: terminal_writer(sys.stdout), 2: terminal_writer(sys.stderr)}
    metrics = MetricLog(path / "metrics.json", config.metrics)
    log_fd = os.open(path / "logs.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if signals.received:  # stopped while the run was being recorded: never start the job
            return TeeResult(128 + signals.received[0], "interrupted", signals.received[0])
        try:
            job = Job(launch, options.stop_timeout)
        except OSError as exc:  # recorded as failed like a shell's "command not found"
            say(f"cannot start {launch.argv[0]}: {exc.strerror}")
            return TeeResult(127)
        if launch.container is None:  # so `stop` can end a local job whose runner died
            meta["job"] = {"pgid": job.proc.pid, "start": _process_start(job.proc.pid)}
            with contextlib.suppress(OSError):
                write_atomic(path / "meta.json", _meta_bytes(meta))
        try:
            result = Tee(log_fd, metrics, terminal).run(job, signals, config.timeout)
        except BaseException:  # a bug in the loop must not leave a job running behind the user's back
            job.request_stop(force=True)
            job.reap_helpers()
            _remove_container(launch)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.proc.wait(timeout=job.stop_timeout + 15)
            raise
        finally:
            job.close_pipes()
        if result.stop_reason:
            job.reap_helpers()
            _remove_container(launch)
    finally:
        os.close(log_fd)
        metrics.close()
        meta["metrics"] = {"count": metrics.count, "malformed": metrics.malformed}
        meta["last_metrics"] = metrics.last
    return result


def _remove_container(launch: Launch) -> None:
    """After a stop, make sure no container of the run is left (podman's --rm needs its CLI alive)."""
    if launch.container:
        _quiet([launch.engine, "rm", "-f", launch.container], timeout=60)


def _finish(store: RunStore, config: JobConfig, path: Path, meta: dict, result: TeeResult,
            previous: dict) -> RunOutcome:
    status, exit_code = finish_status(result)
    finished = utc_now()
    meta.update(status=status, exit_code=exit_code if status not in ("interrupted", "timeout") else
                job_exit_code(result.returncode), finished_at=finished,
                duration=round((parse_time(finished) - parse_time(meta["started_at"])).total_seconds(), 3))
    meta["warnings"] = run_warnings(config, meta, path, status, previous)
    record = record_of(meta, path)
    unsaved = []
    for what, save in (("meta.json", lambda: write_atomic(path / "meta.json", _meta_bytes(meta))),
                       ("runs.db", lambda: store.save(record))):
        try:
            save()
        except (OSError, StoreError) as exc:  # each is tried: the row may land when the file cannot
            unsaved.append(f"{what} ({getattr(exc, 'strerror', None) or exc})")
    recorded = f"not recorded in {', '.join(unsaved)}" if unsaved else "recorded as failed"
    if result.log_error is not None:
        raise StoreError(f"cannot write the run's files in {path} ({result.log_error.strerror}); the job was "
                         f"stopped and {recorded}. Free some space or set RUNPILOT_HOME to a writable folder")
    if unsaved:
        raise StoreError(f"the job ended ({status}) but its record was {recorded}")
    return RunOutcome(record, exit_code, meta)


def rerun_changes(meta: dict, previous: dict) -> list[str]:
    """What differs from the run being rerun: the image behind the tag, or a mount's git commit."""
    if not previous:
        return []
    changes = []
    if previous.get("image_id") and meta.get("image_id") and previous["image_id"] != meta["image_id"]:
        changes.append(f"image {meta.get('image')} is now {meta['image_id'][:19]}, was {previous['image_id'][:19]} "
                       f"in run {previous.get('run_id')}")
    before = {g["root"]: g.get("commit") for g in previous.get("git") or []}
    for repo in meta.get("git") or []:
        if repo["root"] in before and before[repo["root"]] != repo.get("commit"):
            changes.append(f"{repo['root']} is at commit {str(repo.get('commit'))[:12]}, was "
                           f"{str(before[repo['root']])[:12]} in run {previous.get('run_id')}")
    return changes


def run_warnings(config: JobConfig, meta: dict, path: Path, status: str, previous: dict) -> list[str]:
    """Things the user should hear about once the run is over."""
    warnings = []
    missing = [m for m in config.metrics if m not in meta["last_metrics"]]
    if missing:
        warnings.append(f"metric {', '.join(missing)} listed in the config never appeared "
                        "(a METRIC line is: METRIC name=value)")
    if meta["metrics"]["malformed"]:
        warnings.append(f"{meta['metrics']['malformed']} METRIC line(s) were malformed and skipped "
                        "(expected: METRIC name=value [name=value ...])")
    warnings += rerun_changes(meta, previous)
    if status == "failed" and _log_tail_has(path / "logs.txt", SHM_HINT_RE):
        warnings.append("the log mentions a bus error or shared memory: PyTorch DataLoader workers "
                        "need more /dev/shm; set resources.shm_size (e.g. 8g)")
    return warnings


def _log_tail_has(path: Path, pattern: re.Pattern, size: int = 8192) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            tail = f.read()
    except OSError:
        return False
    return pattern.search(tail) is not None


def mark_lost_runs(store: RunStore, records: list[RunRecord]) -> list[RunRecord]:
    """Store `lost` for runs whose runner died (SIGKILL, reboot); say if a container lives on."""
    for record in records:
        if record.status != "running":
            continue
        meta_path = Path(record.path) / "meta.json"
        meta = read_json(meta_path)
        if runner_alive(meta.get("runner") or {}) is not False:
            continue
        meta.update(status="lost", lost_at=utc_now())
        with contextlib.suppress(OSError):
            write_atomic(meta_path, _meta_bytes(meta))
        record.status = "lost"
        with contextlib.suppress(StoreError):  # a full disk: shown as lost now, stored next time
            store.save(record)
        if _leftover_job(record, meta):
            what = "process group" if record.engine == "local" else "container"
            say(f"run {record.id} lost its runner but its {what} is still running; "
                f"'runpilot stop {record.id}' removes it")
    return records


def _leftover_job(record: RunRecord, meta: dict) -> bool:
    """Whether the job of a run whose runner died is still alive (container or process group)."""
    if record.engine in ("docker", "podman"):
        return bool(_containers_of(record.engine, record.id))
    job = meta.get("job") or {}
    return bool(job.get("pgid")) and _process_start(job["pgid"]) == job.get("start")


def _containers_of(engine: str, run_id: str) -> list[str]:
    if not shutil.which(engine):
        return []
    done = _quiet([engine, "ps", "-a", "-q", "--filter", f"label={RUN_LABEL}={run_id}"])
    return done.stdout.split() if done.returncode == 0 else []


def stop_run(store: RunStore, record: RunRecord, wait: float) -> RunRecord:
    """Stop a run from another terminal: signal its runner, or remove its orphaned container."""
    meta = read_json(Path(record.path) / "meta.json")
    runner = meta.get("runner") or {}
    alive = runner_alive(runner)
    if alive:
        os.kill(runner["pid"], signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            current = store.get(record.id)
            if current and current.status != "running":
                return current
            time.sleep(0.2)
        raise RunPilotError(f"run {record.id} did not stop within {wait:.0f}s; try again, "
                            f"or kill its runner (pid {runner['pid']})")
    if alive is None and record.status == "running":
        raise RunPilotError(f"run {record.id} runs on host {runner.get('host')}; stop it there")
    if record.engine in ("docker", "podman"):
        for container in _containers_of(record.engine, record.id):
            _quiet([record.engine, "rm", "-f", container], timeout=60)
    elif _leftover_job(record, meta):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(meta["job"]["pgid"], signal.SIGKILL)
    mark_lost_runs(store, [record])
    return store.get(record.id) or record

# ==== 15. Presentation: tables, durations, sparklines ========================

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-=+*#@"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_ago(iso: str | None, now: _dt.datetime | None = None) -> str:
    if not iso:
        return "-"
    now = now or _dt.datetime.now(_dt.timezone.utc)
    seconds = max(0.0, (now - parse_time(iso)).total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def fmt_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def printable(text: str) -> str:
    """A name safe to print: control characters shown as escapes, never sent to the terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def text_width(text: str) -> int:
    """Columns a string takes on a terminal: wide (CJK) characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def format_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(),
                 width: int | None = None, min_columns: int = 1, paint=None) -> str:
    """Aligned columns; columns past `min_columns` are dropped whole (never cut) to fit `width`.

    `paint(column, padded_text, row)` may decorate a body cell (colour) after alignment.
    """
    widths = [max([text_width(h)] + [text_width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    keep = len(headers)
    while width and keep > min_columns and sum(widths[:keep]) + 2 * (keep - 1) > width:
        keep -= 1

    def line(cells: list[str], row: list[str] | None) -> str:
        pads = [" " * (widths[i] - text_width(c)) for i, c in enumerate(cells[:keep])]
        parts = [pad + c if i in right else c + pad for i, (c, pad) in enumerate(zip(cells, pads))]
        if paint and row is not None:
            parts = [paint(i, p, row) for i, p in enumerate(parts)]
        return "  ".join(parts).rstrip()
    return "\n".join([line(headers, None)] + [line(r, r) for r in rows])


def sparkline(values: list[float], width: int = 40, ascii_only: bool = False) -> str:
    """The shape of a series in block characters, resampled to at most `width` points."""
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return ""
    if len(numbers) > width:
        step = len(numbers) / width
        numbers = [numbers[int(i * step)] for i in range(width - 1)] + [numbers[-1]]
    blocks = SPARK_ASCII if ascii_only else SPARK_BLOCKS
    low, high = min(numbers), max(numbers)
    span = (high - low) or 1.0
    return "".join(blocks[min(len(blocks) - 1, int((v - low) / span * (len(blocks) - 1) + 0.5))]
                   for v in numbers)


def metric_summary(samples: list[dict]) -> dict[str, dict]:
    """count, first, last, min, max and the series of every metric in a run."""
    summary: dict[str, dict] = {}
    for sample in samples:
        for key, value in sample.items():
            if key == "step":
                continue
            entry = summary.setdefault(key, {"count": 0, "first": value, "values": []})
            entry["count"] += 1
            entry["last"] = value
            entry["values"].append(value)
    for entry in summary.values():
        numbers = [v for v in entry["values"] if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not (isinstance(v, float) and math.isnan(v))]
        entry["min"] = min(numbers) if numbers else None
        entry["max"] = max(numbers) if numbers else None
    return summary


def run_table(records: list[RunRecord], metrics: list[str], absolute: bool,
              width: int | None, colour: bool = False) -> str:
    headers = ["ID", "NAME", "STATUS", "STARTED", "DURATION", "EXIT"] + [m.upper() for m in metrics]
    rows = list_rows(records, metrics, absolute)
    paint = (lambda col, text, row: colour_status(text, row[2]) if col == 2 else text) if colour else None
    return format_table(headers, rows, {4, 5} | set(range(6, 6 + len(metrics))), width, min_columns=6,
                        paint=paint)


STATUS_COLOURS = {"succeeded": "32", "failed": "31", "interrupted": "33", "timeout": "33",
                  "running": "36", "lost": "35"}
# Metrics whose name says lower is better; every other metric is better higher.
LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|rmse|perplexity|ppl|wer|cer|time|latency", re.IGNORECASE)


def colour_status(text: str, status: str) -> str:
    """Wrap an already padded cell in the status's ANSI colour."""
    return f"\x1b[{STATUS_COLOURS[status]}m{text}\x1b[0m" if status in STATUS_COLOURS else text


def list_columns(records: list[RunRecord]) -> list[str]:
    """The metrics the runs' configs list, in first-seen order (all metrics if none is listed)."""
    names = list(dict.fromkeys(m for r in records for m in r.watched))
    return names or sorted({m for r in records for m in r.last_metrics})[:6]


def list_rows(records: list[RunRecord], metrics: list[str], absolute: bool) -> list[list[str]]:
    rows = []
    for r in records:
        started = r.started_at if absolute else fmt_ago(r.started_at)
        row = [r.id, printable(r.name)[:40], r.status, started, fmt_duration(r.duration),
               "-" if r.exit_code is None else str(r.exit_code)]
        rows.append(row + [fmt_value(r.last_metrics.get(m)) for m in metrics])
    return rows


def csv_text(header: list[str], rows: list[list]) -> str:
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def flatten(data: object, prefix: str = "") -> dict[str, object]:
    """{"env": {"LR": 1}} -> {"env.LR": 1}; lists stay whole values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, object] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def best_of(name: str, values: list) -> object:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if not numbers:
        return None
    return min(numbers) if LOWER_IS_BETTER.search(name) else max(numbers)


def compare_rows(runs: list[tuple[RunRecord, dict, dict]]) -> list[list[str]]:
    """Rows of `compare`: differing config values, status, duration, each metric's last and best.

    `runs` holds (record, flattened config, metric summary); the best value of a row gets a `*`.
    """
    rows = []
    keys = sorted({k for _, flat, _ in runs for k in flat})
    for key in keys:
        values = [flat.get(key) for _, flat, _ in runs]
        if any(v != values[0] for v in values):
            rows.append([key] + [_cell(v) for v in values])
    rows.append(["status"] + [r.status for r, _, _ in runs])
    rows.append(["duration"] + [fmt_duration(r.duration) for r, _, _ in runs])
    for metric in dict.fromkeys(m for _, _, summary in runs for m in summary):
        entries = [summary.get(metric) for _, _, summary in runs]
        for label, pick in (("last", lambda e: e["last"]), ("best", lambda e: best_of(metric, e["values"]))):
            values = [pick(e) if e else None for e in entries]
            winner = best_of(metric, values)
            cells = [fmt_value(v) + ("*" if winner is not None and v == winner and len(runs) > 1 else "")
                     for v in values]
            rows.append([f"{metric} ({label})"] + cells)
    return rows


def _cell(value: object) -> str:
    if isinstance(value, list):
        return ",".join(scalar_text(v) for v in value)
    return "-" if value is None else scalar_text(value)


def export_rows(runs: list[tuple[RunRecord, list[dict]]]) -> tuple[list[str], list[list]]:
    """One row per sample of every run: run_id, name, step, then every metric (empty if absent)."""
    metrics = list(dict.fromkeys(k for _, samples in runs for s in samples for k in s if k != "step"))
    rows = [[r.id, r.name, s.get("step")] + [s.get(m, "") for m in metrics] for r, samples in runs for s in samples]
    return ["run_id", "name", "step"] + metrics, rows


def summary_lines(outcome: RunOutcome) -> list[str]:
    r, meta = outcome.record, outcome.meta
    lines = [f"run {r.id} {r.status} in {fmt_duration(r.duration)} (exit code {outcome.exit_code})"]
    if r.last_metrics:
        lines.append("  " + "  ".join(f"{k}={fmt_value(v)}" for k, v in sorted(r.last_metrics.items())[:12]))
    lines += [f"  folder: {r.path}"] + [f"warning: {w}" for w in meta.get("warnings", [])]
    return lines


def show_text(record: RunRecord, meta: dict, samples: list[dict], ascii_only: bool) -> str:
    path = Path(record.path)
    out = [f"run        {record.id}", f"name       {printable(record.name)}",
           f"status     {record.status}" + ("" if record.exit_code is None else f" (exit code {record.exit_code})"),
           f"started    {record.started_at}", f"finished   {record.finished_at or '-'}",
           f"duration   {fmt_duration(record.duration)}",
           f"engine     {meta.get('engine') or '-'} {meta.get('engine_version') or ''}".rstrip(),
           f"image      {meta.get('image') or '-'}" + (f"  ({meta['image_id']})" if meta.get("image_id") else ""),
           *[f"digest     {digest}" for digest in meta.get("repo_digests") or []],
           f"command    {meta.get('command_line') or '-'}",
           f"host       {meta.get('host') or '-'}", f"folder     {path}"]
    if record.tags:
        out.append("tags       " + " ".join(f"{k}={v}" for k, v in sorted(record.tags.items())))
    if meta.get("rerun_of"):
        out.append(f"rerun of   {meta['rerun_of']}")
    for repo in meta.get("git") or []:
        out.append(f"git        {repo['root']} {repo.get('branch')} {str(repo.get('commit'))[:12]}"
                   + (" (uncommitted changes)" if repo.get("dirty") else ""))
    out.append("files")
    for f in sorted(path.iterdir()) if path.is_dir() else []:
        if not f.name.startswith("."):
            out.append(f"  {f.name:<14} {_size_text(f.stat().st_size):>10}")
    out += _metrics_block(samples, ascii_only)
    out += [f"warning    {w}" for w in meta.get("warnings", [])]
    config = path / "config.yaml"
    if config.is_file():
        out.append("config")
        out += ["  " + line for line in config.read_text(encoding="utf-8", errors="replace").splitlines()]
    return "\n".join(out)


def _metrics_block(samples: list[dict], ascii_only: bool) -> list[str]:
    summary = metric_summary(samples)
    if not summary:
        return ["metrics    none"]
    rows = [[name, str(e["count"]), fmt_value(e["first"]), fmt_value(e["last"]), fmt_value(e["min"]),
             fmt_value(e["max"]), sparkline(e["values"], ascii_only=ascii_only)]
            for name, e in summary.items()]
    table = format_table(["metric", "count", "first", "last", "min", "max", "trend"], rows, right={1, 2, 3, 4, 5})
    return ["metrics"] + ["  " + line for line in table.splitlines()]


def _size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)

# ==== 15b. Plots: braille charts and the HTML page ===========================
# `runpilot plot` reads metrics.json in blocks, one regex pass per metric, and folds each series into at
# most PLOT_BUCKETS min/max buckets as it reads, so memory stays flat however long a run is. Everything
# after the reader is pure: points in, lines of text or one HTML page out.

# Braille dot bits by [row][column] within a cell of 2 x 4 dots (dots 1-2-3-7 left, 4-5-6-8 right).
BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
BRAILLE_BASE = 0x2800
# One marker per run where colour cannot tell runs apart; with --ascii the curve is drawn with it.
PLOT_MARKERS = "*o+x#@%&=$~^"
# ANSI colours per run (normal, then bright); the raw series under a smoothed one is drawn faint (SGR 2).
PLOT_COLOURS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")
# The page's colours per run (Tableau 10): told apart on screen and on paper.
SVG_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
               "#9c755f", "#bab0ac")
# Buckets a series keeps while it is read (two points each): more than any chart has pixel columns.
PLOT_BUCKETS = 1024
# metrics.json is read in blocks this big (about 5,000 samples): few Python steps per sample, a few MB.
PLOT_READ_SIZE = 1 << 18
# Below this a chart has no room for its axis labels and a legend.
PLOT_MIN_WIDTH = 20
PLOT_MIN_HEIGHT = 6
# --follow redraws this often at most (re-reading a long run costs more; the pause grows with it).
FOLLOW_SECONDS = 1.0
# The SVG's drawing area in user units (the page scales it to its width).
SVG_WIDTH = 960
SVG_PLOT_HEIGHT = 260
# A sample line as MetricLog writes it starts with its step; the regexes below rely on that layout.
_SAMPLE_STEP_RE = re.compile(rb'\{"step": (-?\d+)[,}]')
_SAMPLE_KEY_RE = re.compile(rb'"([A-Za-z_][A-Za-z0-9_.\-/]*)": ')


@functools.lru_cache(maxsize=256)
def _value_re(key: str) -> re.Pattern:
    """`"key": VALUE` in sample lines (a quote inside a JSON string is escaped, so only keys match)."""
    return re.compile(rb'"' + re.escape(key.encode()) + rb'": ([^,}\n]*)')


@functools.lru_cache(maxsize=256)
def _step_value_re(key: str) -> re.Pattern:
    """The step and the value of KEY on each sample line that has KEY."""
    return re.compile(rb'\{"step": (-?\d+),[^\n]*?"' + re.escape(key.encode()) + rb'": ([^,}\n]*)')


# -- series, folded as they are read -------------------------------------------

def ema(values, weight: float, state: tuple[float, float] = (0.0, 1.0)) -> tuple[list[float], tuple]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start.

    WEIGHT 0 gives the values back; 0.99 is very smooth. STATE (the running average and weight**n)
    carries one call over to the next, so a series can be smoothed block by block.
    """
    average, decay = state
    keep = 1.0 - weight
    out = list(itertools.accumulate(values, lambda a, v: a * weight + keep * v, initial=average))[1:]
    state = (out[-1] if out else average, decay * weight ** len(out))
    done = 0
    while done < len(out) and decay > 1e-17:  # debiasing matters until weight**n is lost in a double
        decay *= weight
        out[done] /= 1.0 - decay
        done += 1
    return out, state


def _extremes(points: tuple) -> tuple:
    """The lowest and the highest of some (x, y) points in their order; the first and last if all are level."""
    low = min(range(len(points)), key=lambda i: points[i][1])
    high = max(range(len(points)), key=lambda i: points[i][1])
    if low == high:
        return points[:1] if len(points) == 1 else (points[0], points[-1])
    return (points[low], points[high]) if low < high else (points[high], points[low])


def _bucket(ys, x_at: Callable[[int], float], start: int, end: int) -> tuple:
    """_extremes of the samples START..END of a block, found by C's min and max, not per sample in Python."""
    seg = ys[start:end]
    low, high = min(seg), max(seg)
    i, j = seg.index(low), seg.index(high)
    if i == j:
        return ((x_at(start), seg[0]),) if end - start == 1 else ((x_at(start), seg[0]), (x_at(end - 1), seg[-1]))
    a, b = (i, j) if i < j else (j, i)
    return (x_at(start + a), seg[a]), (x_at(start + b), seg[b])


class SeriesDigest:
    """A series folded as it arrives: count, first, last, lowest and highest, and at most CAPACITY
    buckets of consecutive samples, each keeping its lowest and highest point so that spikes survive.

    Whenever the buckets are full, neighbours merge and each bucket covers twice as many samples.
    Blocks come as values and a function giving the x of a value by its index, so that only the
    x values of the points kept are ever worked out.
    """

    def __init__(self, capacity: int = PLOT_BUCKETS) -> None:
        self.capacity = capacity
        self.per = 1                                   # samples per bucket
        self.buckets: list[tuple] = []                 # each: one or two (x, y) in arrival order
        self.pending: tuple = ()                       # first, lowest, highest, last of an unfinished bucket
        self.pending_count = 0
        self.count = 0
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None
        self.low: tuple[float, float] | None = None    # (x, y) of the lowest value
        self.high: tuple[float, float] | None = None

    def add(self, ys, x_at: Callable[[int], float]) -> None:
        """Fold in a block of finite floats (a list or an array); X_AT(i) is the x of ys[i]."""
        n = len(ys)
        if not n:
            return
        self._stats(ys, x_at)
        while len(self.buckets) + (self.pending_count + n) // self.per > self.capacity:
            self._merge()
        start = min(n, self.per - self.pending_count) if self.pending_count else 0
        if start:
            self._pend(ys, x_at, 0, start)
        full = start + (n - start) // self.per * self.per
        self.buckets += [_bucket(ys, x_at, a, a + self.per) for a in range(start, full, self.per)]
        if full < n:
            self._pend(ys, x_at, full, n)

    def _pend(self, ys, x_at: Callable[[int], float], start: int, end: int) -> None:
        """Add samples START..END to the unfinished bucket (kept as its first, extremes and last)."""
        seg = ys[start:end]
        marks = sorted({0, seg.index(min(seg)), seg.index(max(seg)), len(seg) - 1})
        self.pending += tuple((x_at(start + k), seg[k]) for k in marks)
        self.pending_count += end - start
        if self.pending_count == self.per:
            self.buckets.append(_extremes(self.pending))
            self.pending, self.pending_count = (), 0

    def _stats(self, ys, x_at: Callable[[int], float]) -> None:
        self.count += len(ys)
        if self.first is None:
            self.first = (x_at(0), ys[0])
        self.last = (x_at(len(ys) - 1), ys[-1])
        low, high = min(ys), max(ys)
        if self.low is None or low < self.low[1]:
            self.low = (x_at(ys.index(low)), low)
        if self.high is None or high > self.high[1]:
            self.high = (x_at(ys.index(high)), high)

    def _merge(self) -> None:
        pairs = [_extremes(a + b) for a, b in zip(self.buckets[0::2], self.buckets[1::2])]
        self.buckets = pairs + self.buckets[len(pairs) * 2:]
        self.per *= 2

    def points(self) -> list[tuple[float, float]]:
        """The kept points in arrival order, from the first sample to the last."""
        kept = [point for bucket in self.buckets for point in bucket]
        if self.pending:
            kept += _extremes(self.pending)
        if self.first is not None and (not kept or kept[0] != self.first):
            kept.insert(0, self.first)
        if self.last is not None and kept[-1] != self.last:
            kept.append(self.last)
        return kept


class MetricSeries:
    """One metric of one run: the raw series and, with smoothing, its moving average, both digested."""

    def __init__(self, smooth: float | None = None) -> None:
        self.raw = SeriesDigest()
        self.weight = smooth or 0.0
        self.smoothed = SeriesDigest() if smooth else None
        self._ema_state = (0.0, 1.0)

    def add(self, ys, x_at: Callable[[int], float]) -> None:
        self.raw.add(ys, x_at)
        if self.smoothed is not None and len(ys):
            values, self._ema_state = ema(ys, self.weight, self._ema_state)
            self.smoothed.add(values, x_at)


# -- reading metrics.json as a stream -----------------------------------------

def read_metric_series(path: Path, names: list[str] | None,
                       smooth: float | None = None) -> dict[str, MetricSeries]:
    """The numeric samples of NAMES (None: every metric) in a metrics.json, read block by block.

    Never holds more than a block of the file: each series is digested as it is read. Text values,
    NaN and infinities are left out. A last line cut short by a crash is skipped, as read_metrics does.
    """
    series: dict[str, MetricSeries] = {}
    try:
        with open(path, "rb") as f:
            rest = b""
            while chunk := f.read(PLOT_READ_SIZE):
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                _fold_block(data[:cut], names, series, smooth)
    except FileNotFoundError:
        return series
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    _fold_lines([rest], names, series, smooth)  # the line after the last newline, if whole
    return series


def _fold_block(block: bytes, names: list[str] | None, series: dict, smooth: float | None) -> None:
    """Fold in whole sample lines: one regex pass per metric; a JSON parse only for an unusual layout."""
    count = block.count(b"\n{") + block.startswith(b"{")
    if not count:
        return
    lines = block.split(b"\n")
    if block.count(b'{"step": ') != count:  # not MetricLog's layout: parse line by line
        _fold_lines(lines, names, series, smooth)
        return
    lines.pop()  # the block ends with a newline
    if len(lines) != count:  # the opening `[` or closing `]` of the list
        lines = [line for line in lines if line.startswith(b"{")]
    keys = names if names is not None else sorted({k.decode() for k in _SAMPLE_KEY_RE.findall(block)})
    for key in keys:
        values = _value_re(key).findall(block) if key != "step" else []
        if len(values) == count:
            ys, kept = _finite(values)
            x_at = _line_step_reader(lines if kept is None else [lines[i] for i in kept])
        elif values:  # only some samples have it
            pairs = _step_value_re(key).findall(block)
            ys, kept = _finite([value for _, value in pairs])
            steps = [step for step, _ in pairs] if kept is None else [pairs[i][0] for i in kept]
            x_at = _float_reader(steps)
        else:
            continue
        if len(ys):
            series.setdefault(key, MetricSeries(smooth)).add(ys, x_at)


def _line_step_reader(lines: list[bytes]) -> Callable[[int], float]:
    return lambda i: float(_SAMPLE_STEP_RE.match(lines[i])[1])


def _float_reader(values: list) -> Callable[[int], float]:
    return lambda i: float(values[i])


def _fold_lines(lines: list[bytes], names: list[str] | None, series: dict, smooth: float | None) -> None:
    """Fold in sample lines parsed one by one as JSON; a line that does not parse is skipped."""
    found: dict[str, tuple[list, list]] = {}
    for number, line in enumerate(lines):
        line = line.strip().rstrip(b",")
        if not line.startswith(b"{"):
            continue
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        x = sample.get("step", number) if isinstance(sample, dict) else None
        if not _is_number(x):
            continue
        for key, value in sample.items():
            if key != "step" and (names is None or key in names) and _is_number(value):
                xs, ys = found.setdefault(key, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    for key, (xs, ys) in found.items():
        series.setdefault(key, MetricSeries(smooth)).add(ys, xs.__getitem__)


def _is_number(value: object) -> bool:
    """A number a float holds (not a bool, not text, not NaN, not infinite, not a 400-digit int)."""
    if type(value) is int:
        return abs(value) < 1 << 1023
    return type(value) is float and value - value == 0.0


def _finite(values: list) -> tuple:
    """The finite numbers among VALUES (JSON text as bytes) as floats, and the indexes kept (None: all)."""
    from array import array
    try:
        ys = array("d", map(float, values))
    except (ValueError, OverflowError):  # a text value among them
        ys = array("d", [_float_or_nan(v) for v in values])
    total = sum(ys)
    if total - total == 0.0:
        return ys, None
    kept = [i for i, y in enumerate(ys) if y - y == 0.0]  # drops NaN and ±inf
    return array("d", [ys[i] for i in kept]), kept


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (ValueError, OverflowError):
        return math.nan


# -- what a chart shows ------------------------------------------------------

class Curve:
    """One run's series of one metric, ready to draw.

    The plot types are plain classes: a dataclass costs a few tenths of a millisecond at import.
    """

    __slots__ = ("run", "name", "run_id", "points", "smoothed", "last", "best", "best_x", "low", "count",
                 "running")

    def __init__(self, run: int, name: str, run_id: str, points: list, smoothed: list | None = None,
                 last: float | None = None, best: float | None = None, best_x: float | None = None,
                 low: float | None = None, count: int = 0, running: bool = False) -> None:
        self.run = run                      # position among the runs shown: its colour and marker
        self.name = name                    # the run's name, as recorded (escape it to show it)
        self.run_id = run_id
        self.points = points                # (x, y) in arrival order, decimated
        self.smoothed = smoothed or []      # the moving average, decimated (empty: no smoothing)
        self.last, self.best, self.best_x = last, best, best_x
        self.low = low                      # the lowest value (a log axis needs it above zero)
        self.count = count
        self.running = running

    @property
    def short_id(self) -> str:
        return self.run_id[-6:]


class Chart:
    """One metric and one Curve per run shown, in the runs' order."""

    __slots__ = ("metric", "curves")

    def __init__(self, metric: str, curves: list[Curve]) -> None:
        self.metric, self.curves = metric, curves


class PlotStyle:
    """How to draw: braille or ASCII, colours or markers, a log axis, smoothing."""

    __slots__ = ("braille", "colour", "log", "smooth", "x_label")

    def __init__(self, braille: bool = True, colour: bool = False, log: bool = False,
                 smooth: float | None = None, x_label: str = "step") -> None:
        self.braille, self.colour, self.log, self.smooth, self.x_label = braille, colour, log, smooth, x_label


def lower_is_better(metric: str) -> bool:
    return LOWER_IS_BETTER.search(metric) is not None


def make_curve(run: int, record: RunRecord, metric: str, series: MetricSeries | None) -> Curve:
    """A chart's view of a run's series (an empty curve where the run has no such samples)."""
    curve = Curve(run, record.name, record.id, [], running=record.status == "running")
    if series is None or not series.raw.count:
        return curve
    digest = series.raw
    best = digest.low if lower_is_better(metric) else digest.high
    curve.points = digest.points()
    curve.smoothed = series.smoothed.points() if series.smoothed is not None else []
    curve.last, curve.count = digest.last[1], digest.count
    curve.best_x, curve.best = best
    curve.low = digest.low[1]
    return curve


def decimate(points: list, columns: int, x_lo: float, x_hi: float) -> list:
    """At most two points per column of x (its lowest and highest), in their order, plus the first
    and the last point: a line through them has every spike a full series would show."""
    if len(points) <= 2 * columns + 2:
        return list(points)
    span = (x_hi - x_lo) or 1.0
    lows: dict[int, int] = {}
    highs: dict[int, int] = {}
    for i, (x, y) in enumerate(points):
        column = int((x - x_lo) / span * (columns - 1) + 0.5)
        if column not in lows or y < points[lows[column]][1]:
            lows[column] = i
        if column not in highs or y > points[highs[column]][1]:
            highs[column] = i
    keep = sorted({0, len(points) - 1, *lows.values(), *highs.values()})
    return [points[i] for i in keep]


# -- axes ---------------------------------------------------------------------

def _widen(lo: float, hi: float) -> tuple[float, float]:
    """A range to draw a flat series in: around the value (±10 %, or ±1 around zero)."""
    if hi > lo:
        return lo, hi
    margin = abs(lo) * 0.1 or 1.0
    return lo - margin, hi + margin


def nice_ticks(lo: float, hi: float, max_count: int, extend: bool = False) -> tuple[list[float], float, float, float]:
    """Ticks at round numbers (1, 2, 2.5 or 5 times a power of ten) for the range LO..HI.

    Returns (ticks, axis_lo, axis_hi, step): at most MAX_COUNT ticks. EXTEND widens the range out to
    the ticks around it (a y axis that starts and ends on a label); otherwise the ticks lie inside it.
    """
    lo, hi = _widen(min(lo, hi), max(lo, hi))
    rough = (hi - lo) / max(1, max_count - 1)
    exponent = math.floor(math.log10(rough))
    for exp in (exponent, exponent + 1, exponent + 2):
        for mantissa in (1, 2, 2.5, 5):
            step = mantissa * 10.0 ** exp if exp >= 0 else mantissa / 10.0 ** -exp
            first = math.floor(lo / step + 1e-9) if extend else math.ceil(lo / step - 1e-9)
            last = math.ceil(hi / step - 1e-9) if extend else math.floor(hi / step + 1e-9)
            if last - first + 1 <= max_count:
                ticks = [_tick_value(k, mantissa, exp) for k in range(first, last + 1)]
                return (ticks, ticks[0], ticks[-1], step) if extend else (ticks, lo, hi, step)
    return [lo, hi], lo, hi, hi - lo


def _tick_value(k: int, mantissa: float, exp: int) -> float:
    """k steps of mantissa * 10**exp, computed so that 3 x 0.1 is 0.3."""
    scaled = k * mantissa
    return float(scaled * 10 ** exp) if exp >= 0 else scaled / 10.0 ** -exp


def log_ticks(lo: float, hi: float, max_count: int) -> tuple[list[float], float, float]:
    """Ticks at powers of ten spanning LO..HI (both > 0), with 2 and 5 between them over one decade."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last == first:
        last += 1
    stride = max(1, math.ceil((last - first) / max(1, max_count - 1)))
    last = first + stride * math.ceil((last - first) / stride)
    ticks = [10.0 ** e for e in range(first, last + 1, stride)]
    if last - first == 1 and max_count >= 4:
        ticks = sorted(ticks + [2 * ticks[0], 5 * ticks[0]])
    return ticks, 10.0 ** first, 10.0 ** last


def tick_text(value: float, step: float) -> str:
    """A tick label with the digits its step needs: 0.25, 1.5k, 2M, 1e-07."""
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 1e4 and step >= 1:
        for divisor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if size >= divisor:
                text = f"{value / divisor:.{_decimals(step / divisor)}f}"
                return (text.rstrip("0").rstrip(".") if "." in text else text) + suffix
    decimals = _decimals(step)
    if decimals <= 6:
        return f"{value:.{decimals}f}"
    digits = max(1, math.floor(math.log10(size)) - math.floor(math.log10(step)) + 1)
    return f"{value:.{digits - 1}e}"


def _decimals(step: float) -> int:
    """The fewest decimals that write STEP exactly (0.25 → 2)."""
    for decimals in range(13):
        if abs(round(step, decimals) - step) <= abs(step) * 1e-6:
            return decimals
    return 13


def _log_text(value: float) -> str:
    return f"{value:g}"


class _Axes:
    """Where values land: the ranges, the y ticks and their labels."""

    __slots__ = ("x_lo", "x_hi", "y_lo", "y_hi", "y_ticks", "log")

    def __init__(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float, y_ticks: list, log: bool) -> None:
        self.x_lo, self.x_hi = x_lo, x_hi
        self.y_lo, self.y_hi = y_lo, y_hi    # in log10 when the axis is logarithmic
        self.y_ticks = y_ticks               # (value, label)
        self.log = log

    def y(self, value: float) -> float:
        """Height of a value as a fraction, 0 at the bottom."""
        value = math.log10(value) if self.log else value
        return (value - self.y_lo) / ((self.y_hi - self.y_lo) or 1.0)

    def x(self, value: float) -> float:
        return (value - self.x_lo) / ((self.x_hi - self.x_lo) or 1.0)


def chart_axes(chart: Chart, log: bool, max_y_ticks: int) -> _Axes | None:
    """The ranges of a chart and its y ticks (None when no curve has a point)."""
    points = [p for c in chart.curves for p in itertools.chain(c.points, c.smoothed)]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = (min(xs), max(xs)) if min(xs) < max(xs) else (xs[0] - 1, xs[0] + 1)  # one step: around it
    if log:
        ticks, lo, hi = log_ticks(min(ys), max(ys), max_y_ticks)
        labelled = [(t, _log_text(t)) for t in ticks]
        return _Axes(x_lo, x_hi, math.log10(lo), math.log10(hi), labelled, True)
    ticks, lo, hi, step = nice_ticks(min(ys), max(ys), max_y_ticks, extend=True)
    return _Axes(x_lo, x_hi, lo, hi, [(t, tick_text(t, step)) for t in ticks], False)


def x_tick_labels(lo: float, hi: float, columns: int, place: Callable[[float], int]) -> list[tuple[int, str, int]]:
    """(where the label starts, label, the tick's column) of round x ticks, as many as fit side by side
    in COLUMNS without touching."""
    for count in range(max(2, columns // 10), 1, -1):
        ticks, _, _, step = nice_ticks(lo, hi, count)
        labels = [(min(columns - 1, max(0, place(t))), tick_text(t, step)) for t in ticks]
        spans = [(max(0, min(columns - len(text), col - len(text) // 2)), text, col) for col, text in labels]
        if all(a[0] + len(a[1]) < b[0] for a, b in zip(spans, spans[1:])):
            return spans
    return [(0, tick_text(lo, hi - lo or 1.0), 0)]


# -- the terminal chart -------------------------------------------------------

class BrailleCanvas:
    """A grid of character cells drawn in dots: 2 x 4 per cell in braille, 1 x 1 in ASCII.

    Each cell remembers the last owner (run, faint) that drew in it, for its colour or marker.
    """

    def __init__(self, cols: int, rows: int, braille: bool = True) -> None:
        self.cols, self.rows, self.braille = cols, rows, braille
        self.sx, self.sy = (2, 4) if braille else (1, 1)
        self.width, self.height = cols * self.sx, rows * self.sy
        self.dots = [0] * (cols * rows)
        self.owner: list = [None] * (cols * rows)
        self.trail: dict[int, dict[int, set]] = {}    # run -> column -> rows its main curve touched

    def dot(self, x: int, y: int, owner: tuple[int, bool]) -> None:
        if not (0 <= x < self.width and 0 <= y < self.height):
            return
        col, row = x // self.sx, y // self.sy
        cell = row * self.cols + col
        self.dots[cell] |= BRAILLE_BITS[y % 4][x % 2] if self.braille else 1
        self.owner[cell] = owner
        if not owner[1]:
            self.trail.setdefault(owner[0], {}).setdefault(col, set()).add(row)

    def line(self, x0: int, y0: int, x1: int, y1: int, owner: tuple[int, bool]) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0))
        if steps == 0:
            self.dot(x0, y0, owner)
            return
        for i in range(steps + 1):
            self.dot(int(x0 + (x1 - x0) * i / steps + 0.5), int(y0 + (y1 - y0) * i / steps + 0.5), owner)

    def polyline(self, points: list, owner: tuple[int, bool], to_dots: Callable) -> None:
        previous = None
        for point in points:
            current = to_dots(point)
            if previous is None:
                self.dot(*current, owner)
            else:
                self.line(*previous, *current, owner)
            previous = current

    def marker_cells(self, runs: list[int], gap: int) -> dict[int, int]:
        """Cells where each run's marker goes: every GAP columns along its curve, staggered per run."""
        cells: dict[int, int] = {}
        for order, run in enumerate(runs):
            columns = self.trail.get(run, {})
            offset = (order * gap) // max(1, len(runs))
            chosen = [c for c in sorted(columns) if (c - offset) % gap == 0] + ([max(columns)] if columns else [])
            for col in chosen:
                rows = sorted(columns[col])
                cell = rows[len(rows) // 2] * self.cols + col
                cells.setdefault(cell, run)
        return cells

    def row_text(self, row: int, style: PlotStyle, markers: dict[int, int]) -> str:
        """One row of cells as text, coloured by owner when STYLE says so."""
        parts: list[str] = []
        current = None
        for col in range(self.cols):
            cell = row * self.cols + col
            owner, dots = self.owner[cell], self.dots[cell]
            if cell in markers:
                text, owner = PLOT_MARKERS[markers[cell] % len(PLOT_MARKERS)], (markers[cell], False)
            elif not dots:
                text, owner = " ", None
            elif self.braille:
                text = chr(BRAILLE_BASE + dots)
            else:
                text = "." if owner[1] else PLOT_MARKERS[owner[0] % len(PLOT_MARKERS)]
            if style.colour and owner != current:
                parts.append("\x1b[0m" if owner is None else _sgr(owner))
                current = owner
            parts.append(text)
        if style.colour and current is not None:
            parts.append("\x1b[0m")
        return "".join(parts)


def _sgr(owner: tuple[int, bool]) -> str:
    colour = PLOT_COLOURS[owner[0] % len(PLOT_COLOURS)]
    return f"\x1b[0;2;{colour}m" if owner[1] else f"\x1b[0;{colour}m"


def fit_text(text: str, width: int, ellipsis: str = "…") -> str:
    """TEXT cut to WIDTH terminal columns (wide characters count two), ending in ELLIPSIS if cut."""
    if text_width(text) <= width:
        return text
    room = width - text_width(ellipsis)
    out, used = [], 0
    for ch in text:
        w = text_width(ch)
        if used + w > room:
            break
        out.append(ch)
        used += w
    return "".join(out) + ellipsis if width > 0 else ""


def legend_line(curve: Curve, width: int, style: PlotStyle) -> str:
    """`* name 3f9c1a  last 0.012  best 0.011`, cut to WIDTH; the marker in the run's colour."""
    marker = PLOT_MARKERS[curve.run % len(PLOT_MARKERS)]
    ellipsis = "…" if style.braille else "~"
    name = printable(curve.name)
    state = " (running)" if curve.running else ""
    if curve.count:
        forms = [f"  last {fmt_value(curve.last)}  best {fmt_value(curve.best)}",
                 f" last {fmt_value(curve.last)} best {fmt_value(curve.best)}"]
    else:
        forms = ["  no samples", " -"]
    for tail, with_id in ((forms[0], True), (forms[1], True), (forms[1], False)):
        head = f" {curve.short_id}{state}" if with_id else ""
        room = width - 2 - text_width(head + tail)
        if room >= min(8, text_width(name)):
            text = fit_text(name, room, ellipsis) + head + tail
            break
    else:
        text = fit_text(name + f" {curve.short_id}" + forms[1], width - 2, ellipsis)
    sign = _sgr((curve.run, False)) + marker + "\x1b[0m" if style.colour else marker
    return f"{sign} {text}"


def chart_title(metric: str, style: PlotStyle) -> str:
    notes = ([f"smoothed {style.smooth:g}"] if style.smooth else []) + (["log scale"] if style.log else [])
    return printable(metric) + "".join(f"  ({note})" for note in notes)


def chart_lines(chart: Chart, width: int, height: int, style: PlotStyle) -> list[str]:
    """One metric as a terminal chart: title, plot with y ticks, x axis and ticks, a legend line per run.

    Takes HEIGHT lines where it can (at least three plot rows) and never a line wider than WIDTH.
    """
    ellipsis = "…" if style.braille else "~"
    title = fit_text(chart_title(chart.metric, style), width, ellipsis)
    legend = [legend_line(c, width, style) for c in chart.curves]
    rows = max(3, height - 3 - len(legend))
    axes = chart_axes(chart, style.log, max(2, min(8, (rows + 1) // 2)))
    if axes is None:
        return [title, fit_text("  no numeric samples in these runs", width, ellipsis)]
    label_width = max(len(label) for _, label in axes.y_ticks)
    cols = width - label_width - 2
    if cols < 4:  # labels too long for the width: keep the plot
        label_width, cols = 0, width - 2
    canvas = BrailleCanvas(cols, rows, style.braille)
    _draw_curves(canvas, chart, axes, style)
    drawn = [c.run for c in chart.curves if c.points]
    markers = {} if style.colour or not style.braille or len(drawn) < 2 else \
        canvas.marker_cells(drawn, max(3, cols // 6))
    tick_rows = {}
    for value, label in axes.y_ticks:
        row = int((1 - axes.y(value)) * (canvas.height - 1) + 0.5) // canvas.sy
        tick_rows.setdefault(min(rows - 1, max(0, row)), label)
    bar, tee, corner, dash, down = ("│", "┤", "└", "─", "┬") if style.braille else ("|", "+", "+", "-", "+")
    lines = [title]
    for row in range(rows):
        label = tick_rows.get(row, "")[:label_width]
        lines.append((f"{label:>{label_width}} {tee if row in tick_rows else bar}"
                      + canvas.row_text(row, style, markers)).rstrip())
    ticks = x_tick_labels(axes.x_lo, axes.x_hi, cols,
                          lambda t: int(axes.x(t) * (canvas.width - 1) + 0.5) // canvas.sx)
    axis = [dash] * cols
    for _, _, col in ticks:
        axis[col] = down
    lines.append(" " * label_width + " " + corner + "".join(axis))
    lines.append(_x_label_line(ticks, label_width, cols, style.x_label))
    return lines + legend


def _draw_curves(canvas: BrailleCanvas, chart: Chart, axes: _Axes, style: PlotStyle) -> None:
    """Faint raw series first (under smoothing, where colour or --ascii can show them), then the curves."""
    def to_dots(point: tuple[float, float]) -> tuple[int, int]:
        return (int(axes.x(point[0]) * (canvas.width - 1) + 0.5),
                int((1 - axes.y(point[1])) * (canvas.height - 1) + 0.5))

    smoothing = any(c.smoothed for c in chart.curves)
    if smoothing and (style.colour or not style.braille):
        for curve in chart.curves:
            canvas.polyline(decimate(curve.points, canvas.width, axes.x_lo, axes.x_hi), (curve.run, True), to_dots)
    for curve in chart.curves:
        points = curve.smoothed if smoothing else curve.points
        canvas.polyline(decimate(points, canvas.width, axes.x_lo, axes.x_hi), (curve.run, False), to_dots)


def _x_label_line(ticks: list[tuple[int, str, int]], label_width: int, cols: int, x_label: str) -> str:
    line = [" "] * cols
    for start, text, _ in ticks:
        line[start:start + len(text)] = text
    prefix = x_label.rjust(label_width + 1) + " " if len(x_label) <= label_width else " " * (label_width + 2)
    return (prefix + "".join(line[:cols])).rstrip()


def plot_text(charts: list[Chart], width: int, height: int, style: PlotStyle) -> str:
    """Every chart, one after the other, separated by a blank line."""
    if not charts:
        return "no numeric samples yet"
    return "\n\n".join("\n".join(chart_lines(c, width, height, style)) for c in charts)


# -- the HTML page ------------------------------------------------------------

_PAGE_STYLE = """\
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f6f7f9;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,\
"Helvetica Neue",Arial,sans-serif}
main{max-width:1040px;margin:0 auto;padding:28px 20px 40px}
h1{font-size:22px;margin:0 0 2px;font-weight:650}
.sub{color:#59636e;margin:0 0 20px}
h2{font-size:15px;margin:0 0 4px;font-weight:600}
.card{background:#fff;border:1px solid #d8dee4;border-radius:10px;padding:14px 16px 10px;margin:0 0 16px;\
break-inside:avoid;page-break-inside:avoid}
svg{display:block;width:100%;height:auto}
.pt{fill-opacity:0}
.pt:hover{fill-opacity:1}
.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:13px}
th,td{padding:6px 8px;border-bottom:1px solid #eaeef2;text-align:left;white-space:nowrap;vertical-align:top}
th{font-weight:600;color:#59636e;font-size:12px}
td.num,th.num{text-align:right}
th.grp{text-align:center;border-bottom-color:#d8dee4}
td.best{font-weight:650;color:#1a7f37}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11px;color:#59636e;margin-left:16px}
.st-succeeded{color:#1a7f37}.st-failed,.st-lost{color:#cf222e}.st-running{color:#0969da}
.st-interrupted,.st-timeout{color:#9a6700}
footer{color:#8c959f;font-size:12px;margin-top:8px}
@media print{body{background:#fff}main{max-width:none;padding:0}.card{border-color:#ccc}.wrap{overflow:visible}}
"""


def _h(value: object) -> str:
    """A run-provided value made safe for HTML and XML: control characters spelled out, markup escaped."""
    import html
    return html.escape(printable(str(value)), quote=True)


def _num(value: float) -> str:
    """An SVG coordinate: one decimal, no trailing zero."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def html_page(charts: list[Chart], runs: list[tuple[RunRecord, dict]], style: PlotStyle,
              generated: str, refresh: int | None = None) -> str:
    """One self-contained page: an SVG chart per metric and a table of the runs; nothing fetched.

    RUNS holds each run's record and flattened config. REFRESH (seconds) makes the page reload itself
    while runs are still running (--follow).
    """
    names = ", ".join(dict.fromkeys(r.name for r, _ in runs))
    head = [f'<meta http-equiv="refresh" content="{refresh}"/>'] if refresh else []
    notes = ([f"{len(runs)} run(s)", f"x: {style.x_label}"] + ([f"smoothed {style.smooth:g}"] if style.smooth else [])
             + (["log scale"] if style.log else [])
             + [f"made {generated[:16].replace('T', ' ')} UTC by RunPilot {__version__}"])
    body = [f"<h1>Learning curves: {_h(fit_text(names, 80))}</h1>", f'<p class="sub">{_h(" · ".join(notes))}</p>']
    body += [f'<section class="card"><h2>{_h(c.metric)}</h2>{svg_chart(c, style)}</section>' for c in charts]
    body.append(f'<section class="card"><h2>Runs</h2><div class="wrap">{runs_table(charts, runs)}</div></section>')
    body.append('<footer>Hover a point for its value. Made by <code>runpilot plot --html</code>.</footer>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            + "".join(line + "\n" for line in head)
            + f"<title>RunPilot: {_h(fit_text(names, 80))}</title>\n<style>\n{_PAGE_STYLE}</style>\n</head>\n"
            + "<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def svg_chart(chart: Chart, style: PlotStyle) -> str:
    """An inline SVG: grid, axes with round ticks, one polyline per run (raw faint under smoothing),
    points with <title> tooltips, the best value marked, and a legend."""
    axes = chart_axes(chart, style.log, 6)
    legend_rows = (len(chart.curves) + 1) // 2 if len(chart.curves) > 3 else len(chart.curves)
    if axes is None:
        return '<p class="sub">No numeric samples in these runs.</p>'
    labels = [label for _, label in axes.y_ticks]
    left, top, right = 14 + 7 * max(map(len, labels)), 10, 16
    plot_w, plot_h = SVG_WIDTH - left - right, SVG_PLOT_HEIGHT
    height = top + plot_h + 48 + 20 * legend_rows

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return left + axes.x(point[0]) * plot_w, top + (1 - axes.y(point[1])) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {SVG_WIDTH} {height}" role="img" '
           f'font-family="system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif" font-size="12" '
           f'aria-label="{_h(chart.metric)}">']
    out += _svg_axes(axes, left, top, plot_w, plot_h, style)
    for curve in chart.curves:
        out += _svg_curve(curve, chart.metric, at, plot_w, axes)
    out += _svg_legend(chart.curves, left, top + plot_h + 44)
    out.append("</svg>")
    return "\n".join(out)


def _svg_axes(axes: _Axes, left: float, top: float, plot_w: float, plot_h: float, style: PlotStyle) -> list[str]:
    out = []
    for value, label in axes.y_ticks:
        y = _num(top + (1 - axes.y(value)) * plot_h)
        out.append(f'<line x1="{_num(left)}" y1="{y}" x2="{_num(left + plot_w)}" y2="{y}" stroke="#eaeef2"/>')
        out.append(f'<text x="{_num(left - 6)}" y="{y}" dy="4" text-anchor="end" fill="#59636e">{_h(label)}</text>')
    bottom = top + plot_h
    for value, text in _svg_x_ticks(axes):
        x = _num(left + axes.x(value) * plot_w)
        out.append(f'<line x1="{x}" y1="{_num(bottom)}" x2="{x}" y2="{_num(bottom + 5)}" stroke="#8c959f"/>')
        out.append(f'<text x="{x}" y="{_num(bottom + 18)}" text-anchor="middle" fill="#59636e">{_h(text)}</text>')
    out.append(f'<line x1="{_num(left)}" y1="{_num(bottom)}" x2="{_num(left + plot_w)}" y2="{_num(bottom)}" '
               f'stroke="#8c959f"/>')
    out.append(f'<line x1="{_num(left)}" y1="{_num(top)}" x2="{_num(left)}" y2="{_num(bottom)}" stroke="#8c959f"/>')
    out.append(f'<text x="{_num(left + plot_w)}" y="{_num(bottom + 34)}" text-anchor="end" fill="#59636e">'
               f'{_h(style.x_label)}</text>')
    return out


def _svg_x_ticks(axes: _Axes) -> list[tuple[float, str]]:
    ticks, _, _, step = nice_ticks(axes.x_lo, axes.x_hi, 9)
    return [(t, tick_text(t, step)) for t in ticks]


def _svg_points(points: list, at: Callable, plot_w: float, axes: _Axes) -> str:
    """The polyline's points, at most two per unit of width, repeated positions dropped."""
    out, previous = [], None
    for point in decimate(points, int(plot_w), axes.x_lo, axes.x_hi):
        x, y = at(point)
        text = f"{_num(x)},{_num(y)}"
        if text != previous:
            out.append(text)
            previous = text
    return " ".join(out)


def _svg_curve(curve: Curve, metric: str, at: Callable, plot_w: float, axes: _Axes) -> list[str]:
    if not curve.points:
        return []
    colour = SVG_COLOURS[curve.run % len(SVG_COLOURS)]
    who = f"{curve.name} ({curve.run_id})"
    out = [f'<g data-run="{_h(curve.run_id)}">']
    main = curve.smoothed or curve.points
    if curve.smoothed:
        out.append(f'<polyline class="raw" points="{_svg_points(curve.points, at, plot_w, axes)}" fill="none" '
                   f'stroke="{colour}" stroke-opacity="0.28" stroke-width="1"/>')
    out.append(f'<polyline class="curve" data-run="{_h(curve.run_id)}" points="{_svg_points(main, at, plot_w, axes)}"'
               f' fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round">'
               f'<title>{_h(who)}</title></polyline>')
    for point in _tooltip_points(curve.points):
        x, y = at(point)
        out.append(f'<circle class="pt" cx="{_num(x)}" cy="{_num(y)}" r="4" fill="{colour}">'
                   f'<title>{_h(who)}&#10;step {_step_text(point[0])}: {_h(f"{point[1]:.6g}")}</title></circle>')
    if curve.best is not None:
        x, y = at((curve.best_x, curve.best))
        out.append(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="3.5" fill="#fff" stroke="{colour}" stroke-width="2">'
                   f'<title>{_h(who)}&#10;best {_h(metric)}: {_h(f"{curve.best:.6g}")} at step '
                   f'{_step_text(curve.best_x)}</title></circle>')
    out.append("</g>")
    return out


def _step_text(step: float) -> str:
    return str(int(step)) if step.is_integer() else f"{step:g}"


def _tooltip_points(points: list, count: int = 24) -> list:
    """About COUNT points spread along a series, and its last one."""
    if len(points) <= count:
        return list(points)
    return [points[i * (len(points) - 1) // (count - 1)] for i in range(count)]


def _svg_legend(curves: list[Curve], left: float, top: float) -> list[str]:
    two = len(curves) > 3
    column = (SVG_WIDTH - left) / 2 if two else SVG_WIDTH - left
    out = []
    for i, curve in enumerate(curves):
        x, y = left + (i % 2) * column if two else left, top + (i // 2 if two else i) * 20
        colour = SVG_COLOURS[curve.run % len(SVG_COLOURS)]
        values = (f"last {fmt_value(curve.last)} · best {fmt_value(curve.best)}" if curve.count
                  else "no samples")
        name = fit_text(printable(curve.name), 34 if two else 60)
        out.append(f'<rect x="{_num(x)}" y="{_num(y - 9)}" width="12" height="12" rx="2" fill="{colour}"/>')
        out.append(f'<text x="{_num(x + 18)}" y="{_num(y + 1)}" fill="#1f2328">{_h(name)}'
                   f'<tspan dx="6" fill="#8c959f">{_h(curve.short_id)}</tspan>'
                   f'<tspan dx="10" fill="#59636e">{_h(values)}</tspan></text>')
    return out


def runs_table(charts: list[Chart], runs: list[tuple[RunRecord, dict]]) -> str:
    """The runs: colour, name and id, status, start, duration, the config values that differ, and each
    metric's last and best value, the best of each column marked."""
    keys = sorted({k for _, flat in runs for k in flat} - {"name"})  # the name has its own column
    differing = [k for k in keys if any(flat.get(k) != runs[0][1].get(k) for _, flat in runs)]
    top = ["run", "status", "started", "duration"] + differing
    head = "".join(f'<th rowspan="2" class="num">{_h(h)}</th>' if h == "duration" else f'<th rowspan="2">{_h(h)}</th>'
                   for h in top)
    head += "".join(f'<th colspan="2" class="grp">{_h(c.metric)}</th>' for c in charts)
    sub = '<th class="num">last</th><th class="num">best</th>' * len(charts)
    columns = []
    for chart in charts:
        for pick in (lambda c: c.last, lambda c: c.best):
            values = [pick(c) if c.count else None for c in chart.curves]
            winner = best_of(chart.metric, values)
            columns.append([_value_cell(v, v is not None and v == winner and len(runs) > 1) for v in values])
    rows = []
    for i, (record, flat) in enumerate(runs):
        cells = [f'<td><span class="sw" style="background:{SVG_COLOURS[i % len(SVG_COLOURS)]}"></span>'
                 f'{_h(record.name)}<br/><span class="id">{_h(record.id)}</span></td>',
                 f'<td class="st-{_h(record.status)}">{_h(record.status)}</td>',
                 f'<td>{_h(record.started_at[:16].replace("T", " "))}</td>',
                 f'<td class="num">{_h(fmt_duration(record.duration))}</td>']
        cells += [f"<td>{_h(_cell(flat.get(k)))}</td>" for k in differing]
        rows.append("<tr>" + "".join(cells + [column[i] for column in columns]) + "</tr>")
    return (f"<table>\n<thead><tr>{head}</tr><tr>{sub}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody>\n</table>")


def _value_cell(value: float | None, best: bool) -> str:
    if value is None:
        return '<td class="num">-</td>'
    if best:
        return f'<td class="num best" title="best of these runs">★ {_h(fmt_value(value))}</td>'
    return f'<td class="num">{_h(fmt_value(value))}</td>'

# ==== 16. Command line =======================================================

SAMPLE_CONFIG = """\
# RunPilot run config: `runpilot run config.yaml` (see `runpilot run --help`).
name: sample-training            # shown by `runpilot list`; any text
image: "python:3.12-slim"        # the container image the job runs in
entrypoint: "python train.py"    # a string runs through the image's /bin/sh; a list runs as is
# engine: docker                 # docker, podman or local (no container); default: docker if present

env:                             # passed to the job; ${VAR} takes VAR from your environment
  EPOCHS: 5
  LR: 0.01

mounts:                          # host folders, relative to this file
  code: "."                      # `code` is mounted at the workdir (/workspace) and the job starts there
  # data: "./data"               # any other name appears at /mnt/<name> (and in $RUNPILOT_MOUNT_<NAME>)
  # extra: "./cache:/cache:ro"   # or give the container path yourself

resources:
  gpus: 0                        # a count, all, or device ids such as [0, 2]
  # cpu: 4
  # memory: 8g
  # shm_size: 2g                 # PyTorch DataLoader workers need more than the default 64 MB

metrics:                         # the job prints lines such as: METRIC loss=0.25 accuracy=0.91
  - loss
  - accuracy
"""

SAMPLE_TRAIN = '''\
"""A tiny stand-in for a training script: prints METRIC lines that RunPilot records."""
import math
import operator
import os

epochs = int(os.environ.get("EPOCHS", "5"))
lr = float(os.environ.get("LR", "0.01"))
for epoch in range(1, epochs + 1):
    loss = math.exp(-lr * 40 * epoch)
    print(f"epoch {epoch}/{epochs}: training...")
    print(f"METRIC step={epoch} loss={loss:.4f} accuracy={1 - loss / 2:.4f}")
print("done")
'''


def _tags(items: list[str]) -> dict:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {item!r} must look like KEY=VALUE, e.g. --tag try=3")
        tags[key] = value
    return tags


def _run_options(args, **more) -> RunOptions:
    return RunOptions(engine=args.engine, stop_timeout=args.stop_timeout, keep_engine_logs=args.engine_logs,
                      pull=args.pull, tags=_tags(args.tag), overrides=args.set, gpu_check=not args.no_gpu_check,
                      run_id=args.run_id, **more)


def cmd_run(args) -> int:
    config = load_config(args.config, args.set)
    if args.name:
        config = dataclasses.replace(config, name=args.name)
    options = _run_options(args)
    if args.dry_run:
        print(dry_run_text(config, options))
        return 0
    return _launch(args, config, options)


def cmd_rerun(args) -> int:
    store = RunStore.default()
    old = _resolve(store, args.run)
    old_meta = read_json(Path(old.path) / "meta.json")
    config = load_config(Path(old.path) / "config.yaml", args.set)
    config = dataclasses.replace(config, name=args.name or config.name, source=old_meta.get("config_file"))
    tags = {**old.tags, **_tags(args.tag)}
    options = dataclasses.replace(_run_options(args, rerun_of=old.id, previous=old_meta), tags=tags)
    return _launch(args, config, options)


def _launch(args, config: JobConfig, options: RunOptions) -> int:
    if args.detach:
        return detach(args.argv, RunStore.default())
    outcome = run_job(config, options, RunStore.default())
    for line in summary_lines(outcome):
        say(line)
    return outcome.exit_code


def detach(argv: list[str], store: RunStore) -> int:
    """Start the same command in the background, in its own session; print the run id once recorded."""
    run_id = new_run_id()
    store.ensure()
    errors = store.home / f".detach-{run_id}.err"
    child_argv = [a for a in argv if a not in ("-d", "--detach")] + ["--run-id", run_id]
    with open(os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as err:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *child_argv],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True)
    try:
        while store.get(run_id) is None:  # the child may be pulling an image first
            if child.poll() is not None:
                sys.stderr.write(errors.read_text(errors="replace"))
                return child.returncode or 1
            time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):
            errors.unlink()
    print(run_id)
    return 0


def dry_run_text(config: JobConfig, options: RunOptions) -> str:
    engine = choose_engine(options.engine, config, os.environ)
    run_id = new_run_id()
    env = job_environment(config, run_id, _mount_env(config, engine))
    launch = make_launch(config, run_id, engine, env, options, {})
    where = f"# in {launch.cwd}\n" if launch.cwd else ""
    return (f"# resolved config\n{dump_yaml(config_to_dict(config))}\n# command ({engine})\n"
            f"{where}{shlex.join(launch.argv)}")


def since_cutoff(text: str, now: _dt.datetime | None = None) -> str:
    """ISO time from `2d`, `12h`, `30m` (ago) or a date `2026-11-01` / time `2026-11-01T08:00`."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    with contextlib.suppress(ValueError):
        return iso_utc(now - _dt.timedelta(seconds=parse_duration(text)))
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: give an age (2d, 12h, 30m) or a date (2026-11-01)") from None
    return iso_utc(when.replace(tzinfo=when.tzinfo or _dt.timezone.utc))


def list_query(args) -> tuple[str, tuple, str]:
    """WHERE, parameters and ORDER BY of `list` (filtering and sorting happen in SQL)."""
    where, params = [], []
    for column, value in (("status = ?", args.status), ("name GLOB ?", args.name)):
        if value:
            where.append(column)
            params.append(value)
    if args.since:
        where.append("started_at >= ?")
        params.append(since_cutoff(args.since))
    for key, value in _tags(args.tag).items():
        where.append("json_extract(tags, ?) = ?")
        params += [f'$."{key}"', value]
    direction = "ASC" if args.ascending else "DESC"
    if args.sort == "started":
        order = f"started_at {direction}"
    elif args.sort == "duration":
        order = f"duration IS NULL, duration {direction}, started_at DESC"
    elif METRIC_KEY_RE.match(args.sort):
        expr = "json_extract(last_metrics, ?)"
        order = f"{expr} IS NULL, {expr} {direction}, started_at DESC"
        params += [f'$."{args.sort}"'] * 2
    else:
        raise UsageError(f"--sort {args.sort!r}: use started, duration or a metric name")
    return " AND ".join(where), tuple(params), order


def cmd_list(args) -> int:
    store = RunStore.default()
    where, params, order = list_query(args)
    tty = sys.stdout.isatty()
    limit = None if args.all else args.limit or (max(5, shutil.get_terminal_size().lines - 3) if tty else 20)
    records = mark_lost_runs(store, store.query(where, params, order, limit))
    metrics = list_columns(records)
    if args.quiet:
        print("\n".join(r.id for r in records))
    elif args.json:
        print(json.dumps(json_safe([dataclasses.asdict(r) for r in records]), indent=2, sort_keys=True))
    elif args.format == "csv":
        header = ["id", "name", "status", "started_at", "finished_at", "duration", "exit_code"] + metrics
        print(csv_text(header, [[r.id, r.name, r.status, r.started_at, r.finished_at, r.duration, r.exit_code]
                                + [r.last_metrics.get(m) for m in metrics] for r in records]), end="")
    elif not records:
        print("no runs yet; start one with: runpilot run CONFIG" if not where else "no run matches")
    else:
        colour = tty and not args.no_color and not os.environ.get("NO_COLOR")
        width = shutil.get_terminal_size().columns if tty else None
        print(run_table(records, metrics, args.absolute, width, colour))
    return 0


def _resolve(store: RunStore, ref: str) -> RunRecord:
    record = store.resolve(ref)
    return mark_lost_runs(store, [record])[0]


def _run_details(store: RunStore, ref: str) -> tuple[RunRecord, dict, list[dict]]:
    """A run with its meta.json and its samples."""
    record = _resolve(store, ref)
    return record, read_json(Path(record.path) / "meta.json"), read_metrics(Path(record.path) / "metrics.json")


def cmd_show(args) -> int:
    record, meta, samples = _run_details(RunStore.default(), args.run)
    if args.json:
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "values"} for k, v in metric_summary(samples).items()}
        print(json.dumps(json_safe({"run": dataclasses.asdict(record), "meta": meta, "metrics": summary,
                                    "files": _files(Path(record.path))}), indent=2, sort_keys=True))
    else:
        print(show_text(record, meta, samples, args.ascii or not _can_encode(SPARK_BLOCKS)))
    return 0


def _files(path: Path) -> dict:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if not f.name.startswith(".")} \
        if path.is_dir() else {}


def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def cmd_logs(args) -> int:
    store = RunStore.default()
    record = _resolve(store, args.run)
    path = Path(record.path) / "logs.txt"
    out = terminal_writer(sys.stdout)
    offset = _print_log(path, out, args.tail)
    while args.follow:
        current = store.get(record.id)
        running = current is not None and current.status == "running" and \
            mark_lost_runs(store, [current])[0].status == "running"
        offset = _copy_from(path, out, offset)
        if not running:
            break
        time.sleep(POLL_SECONDS)
    return 0


def _print_log(path: Path, out, tail: int | None) -> int:
    """Print the log (or its last `tail` lines, however long they are); return the offset reached."""
    if tail is None or not path.exists():
        return _copy_from(path, out, 0)
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = _tail_start(f, size, tail)
    _copy_from(path, out, start, size)
    return size


def _tail_start(f, size: int, lines: int) -> int:
    """Offset of the first of the last `lines` lines, reading backwards block by block."""
    if lines <= 0:
        return size
    end, found = size, 0
    f.seek(size - 1 if size else 0)
    if size and f.read(1) == b"\n":
        end -= 1  # the final newline ends the last line; it does not start a new one
    position = end
    while position > 0:
        block = min(READ_SIZE, position)
        position -= block
        f.seek(position)
        data = f.read(block)
        index = len(data)
        while (index := data.rfind(b"\n", 0, index)) >= 0:
            found += 1
            if found == lines:
                return position + index + 1
    return 0


def _copy_from(path: Path, out, offset: int, end: int | None = None) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(READ_SIZE if end is None else min(READ_SIZE, end - offset)):
                out(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return offset


def cmd_stop(args) -> int:
    store = RunStore.default()
    record = _resolve(store, args.run)
    if record.status != "running" and not (record.status == "lost" and _leftover_job(
            record, read_json(Path(record.path) / "meta.json"))):
        print(f"run {record.id} is not running ({record.status})")
        return 0
    record = stop_run(store, record, args.wait)
    print(f"run {record.id} {record.status}")
    return 0


def cmd_compare(args) -> int:
    store = RunStore.default()
    runs = []
    for ref in args.runs:
        record, _, samples = _run_details(store, ref)
        config = Path(record.path) / "config.yaml"
        data = parse_yaml(config.read_text(encoding="utf-8")) if config.is_file() else {}
        runs.append((record, flatten(data), metric_summary(samples)))
    header = [""] + [r.id for r, _, _ in runs]
    print(format_table(header, compare_rows(runs), set(range(1, len(runs) + 1))))
    if sys.stderr.isatty():
        say(f"curves: runpilot plot {' '.join(dict.fromkeys(r.id for r, _, _ in runs))}")
    return 0


def cmd_export(args) -> int:
    store = RunStore.default()
    runs = [(record, samples) for record, _, samples in (_run_details(store, ref) for ref in args.runs)]
    if args.format == "csv":
        text = csv_text(*export_rows(runs))
    else:
        text = "".join(json.dumps(json_safe({"run_id": r.id, "name": r.name, **s})) + "\n"
                       for r, samples in runs for s in samples)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise RunPilotError(f"cannot write {args.output}: {exc.strerror}; choose another -o path") from exc
        print(f"wrote {sum(len(s) for _, s in runs)} sample(s) of {len(runs)} run(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise UsageError(f"{question} needs a confirmation; pass -y to confirm without a terminal")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def delete_runs(store: RunStore, records: list[RunRecord], yes: bool) -> int:
    busy = [r.id for r in mark_lost_runs(store, records) if r.status == "running"]
    if busy:
        raise UsageError(f"run {', '.join(busy)} is still running; stop it first (runpilot stop ID)")
    if not records:
        print("nothing to delete")
        return 0
    if not _confirm(f"delete {len(records)} run(s) and their files?", yes):
        print("nothing deleted")
        return 1
    for record in records:
        store.delete(record)
        print(f"deleted {record.id} ({printable(record.name)})")
    return 0


def cmd_rm(args) -> int:
    store = RunStore.default()
    records = list({r.id: r for r in (_resolve(store, ref) for ref in args.runs)}.values())
    return delete_runs(store, records, args.yes)


def cmd_gc(args) -> int:
    if args.keep is None and args.older_than is None:
        raise UsageError("gc needs --keep N and/or --older-than AGE")
    store = RunStore.default()
    where, params = ["status != 'running'"], []
    if args.older_than:
        where.append("started_at < ?")
        params.append(since_cutoff(args.older_than))
    if args.keep is not None:
        where.append("id NOT IN (SELECT id FROM runs ORDER BY started_at DESC LIMIT ?)")
        params.append(max(0, args.keep))
    records = store.query(" AND ".join(where), tuple(params), "started_at")
    if args.dry_run:
        for record in records:
            print(f"would delete {record.id} ({printable(record.name)}, {record.status}, {record.started_at})")
        print(f"{len(records)} run(s) would be deleted")
        return 0
    return delete_runs(store, records, args.yes)


def cmd_validate(args) -> int:
    config = load_config(args.config, args.set)
    print(f"{args.config}: ok ({config.name}, image {config.image or '-'}, "
          f"{len(config.mounts)} mount(s), {len(config.env)} env value(s))")
    return 0


def cmd_init(args) -> int:
    files = {Path("config.yaml"): SAMPLE_CONFIG, Path("train.py"): SAMPLE_TRAIN}
    existing = [str(p) for p in files if p.exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist(s) here; use --force to overwrite")
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    print("next: runpilot run config.yaml")
    return 0


def cmd_reindex(args) -> int:
    count = RunStore.default().reindex()
    print(f"indexed {count} run(s)")
    return 0


def cmd_plot(args) -> int:
    style = _plot_style(args)
    store = RunStore.default()
    records = _plot_records(store, args)
    names = list(dict.fromkeys(args.metric)) or list(dict.fromkeys(m for r in records for m in r.watched)) or None
    if args.html:
        return _plot_html(store, records, names, style, args)
    out = sys.stdout
    tty = out.isatty()

    def draw(current: list[RunRecord], status: str = "") -> str:
        charts = plot_charts(current, names, style, explicit=bool(args.metric))
        width, height = _plot_size(args, out, len(charts) if args.follow and tty else 0)
        return plot_text(charts, width, height, style) + (f"\n{fit_text(status, width)}" if status else "")

    if not args.follow:
        print(draw(records))
    elif tty:
        _follow_on_terminal(store, records, draw, out)
    else:  # a file or a pipe gets the final picture once, without cursor moves
        print(draw(_wait_for_runs(store, records)))
    return 0


def _plot_style(args) -> PlotStyle:
    """The drawing choices of the command line, checked."""
    if args.x == "time":
        raise UsageError("--x time: metrics.json records no time for its samples (only steps), so minutes "
                         "since the start cannot be drawn without guessing; plot by step (the default)")
    if not 0 <= args.smooth < 1:
        raise UsageError(f"--smooth {args.smooth:g}: give a weight from 0 (no smoothing) to below 1, "
                         "e.g. --smooth 0.6")
    colour = sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR") and not args.html
    braille = not args.ascii and _can_encode("⣿│┤└─┬…")
    return PlotStyle(braille=braille, colour=bool(colour), log=args.log, smooth=args.smooth or None)


def _plot_records(store: RunStore, args) -> list[RunRecord]:
    """The runs to plot, each once, in the order given."""
    refs = list(args.runs)
    # TODO(sweeps): `--sweep ID` adds the runs of sweep ID to refs here (the lead adds sweeps).
    records: dict[str, RunRecord] = {}
    for ref in refs:
        record = _resolve(store, ref)
        records.setdefault(record.id, record)
    return list(records.values())


def plot_charts(records: list[RunRecord], names: list[str] | None, style: PlotStyle,
                explicit: bool = False) -> list[Chart]:
    """Each run's metrics.json read as a stream, laid out as one chart per metric.

    NAMES None means every numeric metric; EXPLICIT names (--metric) that no run has are an error.
    """
    per_run = [read_metric_series(Path(r.path) / "metrics.json", names or _recorded_metrics(r), style.smooth)
               for r in records]
    found = sorted({k for series in per_run for k in series})
    metrics = names if names is not None else found
    running = any(r.status == "running" for r in records)
    if not metrics and running:
        return []  # --follow on a run that has not printed a sample yet
    if not metrics or explicit and not set(metrics) & set(found) and not running:
        raise RunPilotError(_nothing_to_plot(records, metrics, found))
    charts = [Chart(m, [make_curve(i, r, m, s.get(m)) for i, (r, s) in enumerate(zip(records, per_run))])
              for m in metrics]
    if style.log:
        _check_log_axis(charts)
    return charts


def _nothing_to_plot(records: list[RunRecord], asked: list[str], found: list[str]) -> str:
    ids = ", ".join(r.id for r in records)
    known = ", ".join(printable(k) for k in sorted({k for r in records for k in r.last_metrics} | set(found)))
    if asked:
        return f"no numeric samples of {', '.join(map(repr, asked))} in run(s) {ids}; they have: {known or 'none'}"
    if known:
        return f"no finite numeric samples in run(s) {ids} (their metrics: {known})"
    return f"no metrics in run(s) {ids}; a job records them by printing lines such as: METRIC step=1 loss=0.5"


def _recorded_metrics(record: RunRecord) -> list[str] | None:
    """The numeric metrics a finished run recorded (None: look for them in metrics.json)."""
    if record.status == "running" or not record.last_metrics:
        return None
    return [k for k, v in record.last_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _check_log_axis(charts: list[Chart]) -> None:
    for chart in charts:
        for curve in chart.curves:
            if curve.count and curve.low <= 0:
                raise UsageError(f"--log: {chart.metric!r} of run {curve.run_id} goes down to {curve.low:g}, "
                                 f"which a log axis cannot show; plot it without --log")


def _plot_size(args, out, charts_on_screen: int = 0) -> tuple[int, int]:
    """Columns and lines per chart: --width/--height, else the terminal's, else $COLUMNS/$LINES, else 80 x 24.

    CHARTS_ON_SCREEN > 0 (following on a terminal) shares the screen's lines between that many charts.
    """
    width, height = 0, 0
    if out.isatty():
        with contextlib.suppress(AttributeError, OSError, ValueError):
            width, height = os.get_terminal_size(out.fileno())
    if width <= 0 or height <= 0:
        width, height = (_env_int("COLUMNS") or 80), (_env_int("LINES") or 24)
    if charts_on_screen:
        height = max(PLOT_MIN_HEIGHT, (height - charts_on_screen) // charts_on_screen)
    width, height = args.width or width, args.height or height
    if width < PLOT_MIN_WIDTH or height < PLOT_MIN_HEIGHT:
        raise UsageError(f"a chart of {width} x {height} is too small; give at least --width {PLOT_MIN_WIDTH} "
                         f"--height {PLOT_MIN_HEIGHT}")
    return width, height


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _refresh(store: RunStore, record: RunRecord) -> RunRecord:
    current = store.get(record.id) or record
    return mark_lost_runs(store, [current])[0]


def _wait_for_runs(store: RunStore, records: list[RunRecord]) -> list[RunRecord]:
    while any(r.status == "running" for r in records):
        time.sleep(FOLLOW_SECONDS)
        records = [_refresh(store, r) for r in records]
    return records


def _follow_on_terminal(store: RunStore, records: list[RunRecord], draw: Callable, out) -> None:
    """Redraw in place (the cursor moves up over the last picture) until no run is running."""
    shown = 0
    while True:
        started = time.monotonic()
        records = [_refresh(store, r) for r in records]
        running = sum(r.status == "running" for r in records)
        status = f"following {running} running run(s); Ctrl-C stops watching (the runs go on)" if running else ""
        lines = draw(records, status).split("\n")
        out.write((f"\x1b[{shown}F" if shown else "") + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        out.flush()
        shown = len(lines)
        if not running:
            return
        time.sleep(max(FOLLOW_SECONDS, 3 * (time.monotonic() - started)))


def _plot_html(store: RunStore, records: list[RunRecord], names: list[str] | None, style: PlotStyle,
               args) -> int:
    """Write the page (again and again with --follow, reloading itself, until the runs end)."""
    path = Path(args.html)
    while True:
        started = time.monotonic()
        records = [_refresh(store, r) for r in records] if args.follow else records
        running = args.follow and any(r.status == "running" for r in records)
        charts = plot_charts(records, names, style, explicit=bool(args.metric))
        runs = [(r, _flat_config(r)) for r in records]
        page = html_page(charts, runs, style, utc_now(), refresh=5 if running else None)
        try:
            write_atomic(path, page.encode("utf-8"), durable=False)
        except OSError as exc:
            raise RunPilotError(f"cannot write {path}: {exc.strerror}; choose another --html path") from exc
        if not running:
            break
        time.sleep(max(5 * FOLLOW_SECONDS, 3 * (time.monotonic() - started)))
    say(f"wrote {path} ({len(charts)} chart(s) of {len(records)} run(s), {len(page.encode()) / 1024:.0f} KiB)")
    return 0


def _flat_config(record: RunRecord) -> dict:
    """A run's config.yaml flattened (env.LR, ...), empty where it cannot be read."""
    try:
        data = parse_yaml((Path(record.path) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ConfigError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run", help="run ids, unique prefixes, latest or -N")
    # TODO(sweeps): `--sweep ID` plots the runs of a sweep (then `runs` becomes nargs="*"); see _plot_records.
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="a metric to plot (repeatable; default: the configs' metrics, else every numeric one)")
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="x axis: step (default); time is refused, as samples carry no time")
    p.add_argument("--smooth", type=float, default=0.0, metavar="N",
                   help="exponential moving average weight, 0 <= N < 1, as TensorBoard's slider "
                        "(the raw curve stays, faint)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis (every value must be above 0)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="redraw while a run is running; stop when they have ended")
    p.add_argument("--width", type=int, metavar="COLUMNS",
                   help="chart width (default: the terminal's, else $COLUMNS, else 80)")
    p.add_argument("--height", type=int, metavar="LINES",
                   help="lines per chart (default: the terminal's, else $LINES, else 24)")
    p.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1); runs get markers")
    p.add_argument("--ascii", action="store_true", help="draw with ASCII characters instead of braille dots")
    p.add_argument("--html", metavar="FILE",
                   help="write one self-contained HTML page (SVG charts, a table of the runs) instead")

def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run config (YAML)")
    _add_run_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the engine command line; run and record nothing")


def _rerun_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, latest or -N")
    _add_run_options(p)


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    p.add_argument("--name", metavar="PATTERN", help="only runs whose name matches this glob")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag")
    p.add_argument("--since", metavar="WHEN", help="only runs started since: 2d, 12h, 30m or 2026-11-01")
    p.add_argument("--sort", default="started", metavar="KEY",
                   help="started (default), duration, or the name of a metric")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--desc", dest="ascending", action="store_false", default=None, help="largest first")
    order.add_argument("--asc", dest="ascending", action="store_true", help="smallest first")
    p.add_argument("--limit", type=int, metavar="N", help="show at most N runs (default: a screenful)")
    p.add_argument("--all", action="store_true", help="show every run")
    p.add_argument("--absolute", action="store_true", help="show start times as ISO 8601 UTC")
    p.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--format", choices=("table", "csv"), default="table", help="table (default) or csv")
    p.add_argument("-q", "--quiet", action="store_true", help="print run ids only")


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, latest or -N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ascii", action="store_true", help="draw sparklines with ASCII only")


def _logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, latest or -N")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, latest or -N")
    p.add_argument("--wait", type=float, default=60, metavar="SECONDS", help="how long to wait (default 60)")


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run", help="run ids, unique prefixes, latest or -N")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="csv (default) or jsonl")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of to stdout")


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, metavar="N", help="keep the N newest runs")
    p.add_argument("--older-than", metavar="AGE", help="delete runs started longer ago than this: 30d, 12h")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing files")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, help="docker, podman or local (default: config, "
                   "$RUNPILOT_ENGINE, then docker if installed, else podman)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted keys (repeatable): --set env.LR=0.01")
    p.add_argument("--name", help="override the run name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="attach a tag (repeatable)")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background; print the run id")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                   help=f"grace period between SIGTERM and SIGKILL when stopped (default {DEFAULT_STOP_TIMEOUT})")
    p.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                   help="when to pull the image (default: missing)")
    p.add_argument("--engine-logs", action="store_true",
                   help="keep the engine's own log driver (docker logs works; output is slower)")
    p.add_argument("--no-gpu-check", action="store_true", help="skip the check that the GPUs asked for exist")
    p.add_argument("--run-id", help=argparse.SUPPRESS)  # chosen by the parent of a detached run


# name, function, help, example, arguments: the commands in the order --help lists them.
COMMANDS = [
    ("run", cmd_run, "run a job from a config file and record it",
     "runpilot run config.yaml --set env.LR=0.01 --tag try=3", _run_arguments),
    ("rerun", cmd_rerun, "run a recorded run again with its stored config",
     "runpilot rerun latest --set env.LR=0.02", _rerun_arguments),
    ("list", cmd_list, "list runs, newest first",
     "runpilot list --status failed --since 2d --sort val_accuracy", _list_arguments),
    ("show", cmd_show, "show one run: status, files, metrics, config",
     "runpilot show latest", _show_arguments),
    ("logs", cmd_logs, "print the saved log of a run",
     "runpilot logs latest --tail 20", _logs_arguments),
    ("stop", cmd_stop, "stop a running run (from another terminal)",
     "runpilot stop 20261128-2247", _stop_arguments),
    ("validate", cmd_validate, "check a config without running it",
     "runpilot validate config.yaml", _validate_arguments),
    ("compare", cmd_compare, "compare runs side by side",
     "runpilot compare -1 -2", _compare_arguments),
    ("plot", cmd_plot, "draw learning curves in the terminal, or as an HTML page",
     "runpilot plot -1 -2 --metric val_loss --smooth 0.6", _plot_arguments),
    ("export", cmd_export, "write the metrics of runs as CSV or JSON lines",
     "runpilot export latest -2 --format csv -o metrics.csv", _export_arguments),
    ("rm", cmd_rm, "delete runs (folder and history row)",
     "runpilot rm 20261128-2247 -y", _rm_arguments),
    ("gc", cmd_gc, "delete old runs in bulk",
     "runpilot gc --keep 100 --dry-run", _gc_arguments),
    ("init", cmd_init, "write a sample config.yaml and train.py here",
     "runpilot init", _init_arguments),
    ("reindex", cmd_reindex, "rebuild runs.db from the run folders",
     "runpilot reindex", None),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the command ARGV names (what `run` needs: 2 ms, not 7)."""
    parser = argparse.ArgumentParser(
        prog="runpilot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run training jobs in containers; keep their logs, metrics and history.",
        epilog="example:\n  runpilot run config.yaml && runpilot list")
    parser.add_argument("--version", action="version", version=f"runpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    named = argv[0] if argv and argv[0] in {spec[0] for spec in COMMANDS} else None
    for name, func, help_text, example, add_arguments in COMMANDS:
        if named is None or name == named:
            p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            p.set_defaults(func=func)
            if add_arguments:
                add_arguments(p)
    return parser

# ==== 17. Entry point ========================================================

def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (RunPilot errors become one clear line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
        return args.func(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except RunPilotError as exc:
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("runpilot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `runpilot list | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _report(exc: RunPilotError) -> None:
    problems = [exc] + list(getattr(exc, "others", []))
    for problem in problems:
        print(f"runpilot: error: {problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
