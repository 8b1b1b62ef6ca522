"""metrics_from (issue 26): recognisers, patterns, TensorBoard event files, reparse and the notices.

Unit tests: no engine. The recognisers get the bytes the frameworks print (as seen from Transformers 5,
Keras 3 and tqdm); the event files are framed here with RunPilot's own CRC and varint (the reader is
checked against TensorBoard's own reader in tests/test_metricsfrom_frameworks.py). Runs use engine local.
"""

import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path

import runpilot
from tests.common import HomeTestCase, LiveRun

ROOT = Path(__file__).resolve().parent.parent


def source(spec: str) -> runpilot.MetricsSource:
    return runpilot.parse_metrics_source(spec)


def recognise(specs: list[str], data: bytes, chunk: int | None = None) -> list[dict]:
    """The samples line sources find in DATA, fed in chunks of CHUNK bytes (all at once by default)."""
    lines = runpilot.LineSources(runpilot.make_recognisers(tuple(source(s) for s in specs)))
    found = []
    step = chunk or len(data) or 1
    for at in range(0, len(data), step):
        found += lines.feed(1, data[at:at + step])
    return found + lines.finish()


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


# -- event files, framed as TensorFlow frames them ------------------------------------------------------

def pb_field(number: int, wire: int, value) -> bytes:
    key = runpilot.encode_varint(number << 3 | wire)
    if wire == 0:
        return key + runpilot.encode_varint(value)
    if wire == 2:
        return key + runpilot.encode_varint(len(value)) + value
    return key + value  # wire 1 and 5: fixed bytes


def simple_value_event(step: int, tag: str, value: float) -> bytes:
    summary_value = pb_field(1, 2, tag.encode()) + pb_field(2, 5, struct.pack("<f", value))
    return pb_field(1, 1, struct.pack("<d", time.time())) + pb_field(2, 0, step) + \
        pb_field(5, 2, pb_field(1, 2, summary_value))


def tensor_event(step: int, tag: str, value: float, packed: bool = True) -> bytes:
    """The TF2 form: a scalar TensorProto (DT_FLOAT, shape []) with plugin `scalars`."""
    tensor = pb_field(1, 0, 1) + pb_field(2, 2, b"") + (
        pb_field(5, 2, struct.pack("<f", value)) if packed else pb_field(4, 2, struct.pack("<f", value)))
    metadata = pb_field(1, 2, pb_field(1, 2, b"scalars"))
    summary_value = pb_field(1, 2, tag.encode()) + pb_field(9, 2, metadata) + pb_field(8, 2, tensor)
    return pb_field(2, 0, step) + pb_field(5, 2, pb_field(1, 2, summary_value))


def record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", runpilot.masked_crc32c(header)) + data + \
        struct.pack("<I", runpilot.masked_crc32c(data))


class Config(HomeTestCase):
    def validate_text(self, text: str) -> tuple[int, str, str]:
        return self.cli("validate", self.write("c.yaml", text))

    def test_metrics_from_list_is_read_and_written_back(self):
        path = self.write("c.yaml", r"""
            name: t
            engine: local
            entrypoint: python3 t.py
            metrics_from:
              - huggingface
              - pattern: 'loss (?P<loss>\S+)'
              - tensorboard: runs
            """)
        config = runpilot.load_config(path)
        self.assertEqual([s.spec for s in config.metrics_from],
                         ["huggingface", r"pattern:loss (?P<loss>\S+)", "tensorboard:runs"])
        again = runpilot.validate_config(runpilot.config_to_dict(config), str(path))
        self.assertEqual(again.metrics_from, config.metrics_from)

    def test_bad_entries_are_located_errors(self):
        code, out, err = self.validate_text("""\
            name: t
            engine: local
            entrypoint: python3 t.py
            metrics_from:
              - pattern: 'loss (\\d+'
              - pattern: 'loss \\d+'
              - kerass
              - pattern: '(?P<step>\\d+)'
            """)
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        lines = [ln for ln in err.splitlines() if ln.startswith("runpilot: error:")]
        self.assertEqual(len(lines), 4, err)
        self.assertRegex(lines[0], r"c\.yaml:5:5: pattern 'loss \(\\d\+' does not compile: missing \)")
        self.assertRegex(lines[1], r"c\.yaml:6:5: pattern 'loss \\d\+' names no metric; name what it captures")
        self.assertRegex(lines[2], r"c\.yaml:7:5: unknown metrics source 'kerass'; use one of huggingface, keras, "
                                   r"tqdm, pattern: REGEX or tensorboard: FOLDER")
        self.assertRegex(lines[3], r"c\.yaml:8:5: pattern '\(\?P<step>\\d\+\)' names no metric")
        self.assertFalse((self.home / "runs").exists())

    def test_bad_metrics_from_argument_is_one_line_and_records_nothing(self):
        config = self.write("c.yaml", "name: t\nengine: local\nentrypoint: [python3, -c, pass]\n")
        code, out, err = self.cli("run", config, "--metrics-from", "pattern:loss (")
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("runpilot: error: --metrics-from 'pattern:loss (': pattern 'loss (' does not compile", err)
        self.assertEqual(self.runs(), [])


class Recognisers(HomeTestCase):
    # What Transformers 5's ProgressCallback writes between tqdm redraws (values as strings, 4 digits).
    HF = (b"\r  8%|8         | 2/24 [00:00<00:02, 9.1it/s]\r                 \r"
          b"{'loss': '0.693', 'grad_norm': '0.3927', 'learning_rate': '4.375e-05', 'epoch': '0.5'}\n"
          b"\r 17%|#6        | 4/24 [00:00<00:01, 11.2it/s]\x1b[A\r      \r\x1b[A"
          b"{'eval_loss': '0.6932', 'eval_runtime': '0.0027', 'epoch': '1'}\n"
          b" 17%|#6        | 4/24 [00:00<00:01, 11.2it/s]{'loss': 0.25, 'global_step': 40, 'epoch': 1.5}\n"
          b"{'train_runtime': '0.1636', 'train_samples_per_second': '586.9', 'train_loss': '0.6931', 'epoch': '3'}\n"
          b"{'loss': nan, 'grad_norm': inf, 'epoch': 2.0}\n"
          b"{'not': 'a log'}\n")

    def test_huggingface_dicts_are_samples_and_the_summary_is_not(self):
        self.assertEqual(str(recognise(["huggingface"], self.HF)), str([
            {"step": 1, "loss": 0.693, "grad_norm": 0.3927, "learning_rate": 4.375e-05, "epoch": 0.5},
            {"step": 2, "eval_loss": 0.6932, "eval_runtime": 0.0027, "epoch": 1},
            {"step": 40, "loss": 0.25, "epoch": 1.5}, {"step": 4, "loss": math.nan, "grad_norm": math.inf, "epoch": 2.0}]))

    KERAS = ("Epoch 1/2\n"
             "\r\x1b[1m1/6\x1b[0m \x1b[32m━━━\x1b[0m\x1b[37m━━━━━━\x1b[0m \x1b[1m0s\x1b[0m 101ms/step - accuracy: 0.5312"
             " - loss: 0.7152\b\b\b\b\b\b\r\x1b[1m6/6\x1b[0m \x1b[32m━━━━━━━━━\x1b[0m\x1b[37m\x1b[0m \x1b[1m0s\x1b[0m "
             "60ms/step - accuracy: 0.5781 - loss: 0.7002 - val_accuracy: 0.5000 - val_loss: 0.7036\n"
             "Epoch 2/2\n"
             "6/6 - 0s - 5ms/step - accuracy: 0.5833 - loss: 0.6844 - val_accuracy: 0.5625 - val_loss: nan\n"
             "\r8/8 ━━━━━━━━━━ 0s 8ms/step - accuracy: 0.5938 - loss: 0.6815\n").encode()

    def test_keras_epoch_sets_the_step_of_its_closing_line(self):
        found = recognise(["keras"], self.KERAS)
        self.assertEqual(found[0], {"step": 1, "accuracy": 0.5781, "loss": 0.7002, "val_accuracy": 0.5,
                                    "val_loss": 0.7036})
        self.assertEqual(found[1]["step"], 2)
        self.assertNotEqual(found[1]["val_loss"], found[1]["val_loss"])  # nan stays a number
        self.assertEqual(len(found), 2)  # evaluate() after fit() is no epoch

    def test_any_chunking_gives_the_same_samples(self):
        whole = recognise(["keras", "huggingface"], self.KERAS + self.HF)
        for size in (1, 7, 64, 4096):
            with self.subTest(chunk=size):
                self.assertEqual(str(recognise(["keras", "huggingface"], self.KERAS + self.HF, size)), str(whole))

    def test_tqdm_postfix_of_finished_bars_only(self):
        data = b"".join(f"\rEpoch {e}: {p:3d}%|###| {p}/100 [00:01<00:00, 99.5it/s, loss={1 / (e + p + 1):.3f}, acc=0.{p}]"
                        .encode() for e in (0, 1) for p in (10, 50, 100) if True) 
        data = data.replace(b"\rEpoch 1:  10%", b"\n\rEpoch 1:  10%", 1) + b"\n"
        self.assertEqual(recognise(["tqdm"], data), [{"step": 1, "loss": 0.01, "acc": 0.1},
                                                      {"step": 2, "loss": 0.01, "acc": 0.1}])

    def test_pattern_groups_are_metrics_and_step_is_the_step(self):
        data = b"epoch 3 val acc 0.91\nepoch x val acc 0.93\nnothing\nval acc nan\n"
        self.assertEqual(str(recognise([r"pattern:(?:epoch (?P<step>\S+) )?val acc (?P<val_acc>\S+)"], data)),
                         str([{"step": 3, "val_acc": 0.91}, {"step": 2, "val_acc": 0.93},
                              {"step": 3, "val_acc": float("nan")}]))

    def test_nanogpt_lines_through_the_readme_patterns(self):
        block = re.search(r"\*\*nanoGPT, unmodified\.\*\*.*?```yaml\n(.*?)```", readme_section(
            "Metrics from scripts as they are"), re.S)[1]
        config = runpilot.validate_config(runpilot.parse_yaml(
            "name: n\nengine: local\nentrypoint: x\n" + block), "<readme>")
        log = (b"step 0: train loss 4.4686, val loss 4.4380\n"
               b"iter 0: loss 4.4243, time 8162.02ms, mfu -100.00%\n"
               b"iter 10: loss 3.9766, time 40.80ms, mfu 0.03%\n"
               b"step 250: train loss 1.9662, val loss 2.0666\n")
        self.assertEqual(runpilot.samples_from_log(log, config.metrics_from), [
            {"step": 0, "train_loss": 4.4686, "val_loss": 4.438},
            {"step": 0, "loss": 4.4243, "iter_ms": 8162.02},
            {"step": 10, "loss": 3.9766, "iter_ms": 40.8},
            {"step": 250, "train_loss": 1.9662, "val_loss": 2.0666}])

    def test_prefixed_metric_lines_are_counted(self):
        log = (b"METRIC a=1\nINFO:root:METRIC loss=0.5\n  METRIC loss=2\nno METRIC here\n"
               b"INFO:root:METRIC loss=0.4 METRIC x=1\nMETRIC a=METRIC\n")
        self.assertEqual(runpilot.prefixed_metric_lines(log), 3)


class EventFiles(HomeTestCase):
    def test_simple_value_and_tensor_forms_are_read_as_the_file_grows(self):
        folder = self.tmp / "tb" / "sub"
        folder.mkdir(parents=True)
        watcher = runpilot.TensorBoardWatcher(self.tmp / "tb")
        path = folder / "events.out.tfevents.1.host.1.0"
        first = record(pb_field(3, 2, b"brain.Event:2")) + record(simple_value_event(5, "Loss/train", 0.5))
        second = record(tensor_event(6, "lr", 0.25)) + record(tensor_event(7, "lr", 0.125, packed=False))
        path.write_bytes(first + second[:10])  # the writer is in the middle of a record
        self.assertEqual(watcher.poll(), [{"step": 5, "Loss/train": 0.5}])
        with open(path, "ab") as f:
            f.write(second[10:])
        self.assertEqual(watcher.poll(), [{"step": 6, "lr": 0.25}, {"step": 7, "lr": 0.125}])
        self.assertEqual(watcher.poll(), [])

    def test_a_damaged_record_stops_that_file(self):
        (self.tmp / "tb").mkdir()
        watcher = runpilot.TensorBoardWatcher(self.tmp / "tb")
        good, bad = record(simple_value_event(1, "a", 1.0)), bytearray(record(simple_value_event(2, "a", 2.0)))
        bad[-6] ^= 0xFF  # a flipped bit in the value: the data CRC no longer matches
        (self.tmp / "tb" / "x.tfevents.1").write_bytes(good + bytes(bad) + good)
        self.assertEqual(watcher.poll(), [{"step": 1, "a": 1.0}])
        self.assertEqual(watcher.corrupt, 1)

    def test_files_from_before_the_run_are_skipped(self):
        (self.tmp / "tb").mkdir()
        (self.tmp / "tb" / "old.tfevents.1").write_bytes(record(simple_value_event(1, "a", 1.0)))
        watcher = runpilot.TensorBoardWatcher(self.tmp / "tb")
        (self.tmp / "tb" / "new.tfevents.2").write_bytes(record(simple_value_event(2, "b", 2.0)))
        self.assertEqual(watcher.poll(), [{"step": 2, "b": 2.0}])

    def test_folder_as_the_job_sees_it(self):
        config = runpilot.validate_config({"name": "t", "image": "i", "entrypoint": "x",
                                           "mounts": {"code": str(self.tmp), "data": str(self.work)}}, "<t>")
        self.assertEqual(runpilot.tensorboard_folder(config, "docker", "runs"), self.tmp / "runs")
        self.assertEqual(runpilot.tensorboard_folder(config, "docker", "/mnt/data/tb"), self.work / "tb")
        self.assertIsNone(runpilot.tensorboard_folder(config, "docker", "/scratch/tb"))
        self.assertEqual(runpilot.tensorboard_folder(config, "local", "runs"), self.tmp / "runs")

    def test_folder_as_the_launched_job_sees_it_its_code_copy_and_outputs(self):
        config = runpilot.validate_config({"name": "t", "image": "i", "entrypoint": "x",
                                           "mounts": {"code": str(self.tmp)}}, "<t>")
        folder = runpilot.RunFolder(self.work / "run")
        for engine in ("docker", "local"):
            launched, _ = runpilot.run_files_config(config, folder, True, engine)
            self.assertEqual(runpilot.tensorboard_folder(launched, engine, "runs"), folder.code / "runs")
        launched, _ = runpilot.run_files_config(config, folder, True, "docker")
        self.assertEqual(runpilot.tensorboard_folder(launched, "docker", "/outputs/tb"), folder.outputs / "tb")


class Runs(HomeTestCase):
    NANO = ("for i in (0, 10):\n"
            "    print(f'step {i}: train loss {4.5 - i / 100:.4f}, val loss {4.6 - i / 100:.4f}')\n"
            "    print(f'iter {i}: loss {4.0 - i / 100:.4f}, time 40.80ms, mfu 0.03%')\n")
    PATTERN = r"pattern:^step (?P<step>\d+): train loss (?P<train_loss>\S+), val loss (?P<val_loss>\S+)"

    def test_metrics_from_on_the_command_line_fills_metrics_json(self):
        config = self.local_config(self.NANO, "nano")
        result = self.process("run", config, "--metrics-from", self.PATTERN.replace(r"(?P<train_loss>\S+)",
                                                                                    r"(?P<train_loss>[^,]+)"))
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        self.assertEqual(self.metrics(run), [{"step": 0, "train_loss": 4.5, "val_loss": 4.6},
                                             {"step": 10, "train_loss": 4.4, "val_loss": 4.5}])
        self.assertEqual(self.meta(run)["samples"], {"count": 2, "malformed": 0})
        self.assertIn("metrics_from:", (run / "config.yaml").read_text())
        self.assertNotIn(b"captured no metrics", result.stderr)

    def test_rerun_adds_metrics_from_to_the_stored_config(self):
        config = self.local_config("print(\"{'loss': 0.5, 'epoch': 1.0}\")\n", "hf")
        self.assertEqual(self.process("run", config).returncode, 0)
        result = self.process("rerun", "latest", "--metrics-from", "huggingface")
        self.assertEqual(result.returncode, 0, result.stderr)
        first, second = sorted(self.runs(), key=lambda run: self.meta(run).get("rerun_of") is not None)
        self.assertEqual((self.metrics(first), self.metrics(second)), ([], [{"step": 1, "loss": 0.5, "epoch": 1.0}]))
        self.assertIn("metrics_from:\n  - huggingface", (second / "config.yaml").read_text())

    def test_zero_samples_are_said_and_the_style_named(self):
        keras = Recognisers.KERAS.decode()
        config = self.local_config(f"import sys\nsys.stdout.write({keras!r})\n", "k")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"runpilot: the run captured no metrics; its log looks like keras output: add "
                      b"`metrics_from: [keras]` to the config, or run `runpilot reparse ID --metrics-from keras`\n",
                      result.stderr)
        quiet = self.local_config("print('hello')\n", "q")
        result = self.process("run", quiet)
        self.assertIn(b"runpilot: the run captured no metrics (no METRIC lines); see README: Metrics from scripts "
                      b"as they are\n", result.stderr)
        failed = self.process("run", self.local_config("raise SystemExit(3)\n", "f"))
        self.assertEqual(failed.returncode, 3)
        self.assertNotIn(b"captured no metrics", failed.stderr)  # it may have failed before printing any

    def test_prefixed_metric_lines_get_one_notice_with_the_count(self):
        script = ("import logging\nlogging.basicConfig(level=logging.INFO)\n"
                  "for i in range(3):\n    logging.info('METRIC loss=%s', i)\nprint('METRIC acc=1')\n")
        result = self.process("run", self.local_config(script, "log"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.count(b"line(s) carry METRIC after a prefix"), 1, result.stderr)
        self.assertIn(b"runpilot: 3 line(s) carry METRIC after a prefix", result.stderr)
        self.assertNotIn(b"captured no metrics", result.stderr)

    def test_reparse_with_a_new_pattern(self):
        config = self.local_config(self.NANO + "print('METRIC lr=0.1')\n", "nano",
                                   extra=f"metrics_from:\n  - 'pattern:train loss (?P<oops>x)'\n".replace(
                                       "'pattern:", "pattern: '"))
        self.assertEqual(self.process("run", config).returncode, 0)
        run = self.only_run()
        self.assertEqual(self.metrics(run), [{"step": 1, "lr": 0.1}])
        logs_before = (run / "logs.txt").read_bytes()
        code, out, err = self.cli("reparse", run.name, "--metrics-from", r"pattern:^step (?P<step>\d+): "
                                  r"train loss (?P<train_loss>[^,]+), val loss (?P<val_loss>\S+)")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, f"run {run.name}: 3 sample(s) from its log (before: 1)\n")
        # a METRIC line's default step is its own number, whatever else the log holds
        self.assertEqual(sorted(self.metrics(run), key=lambda s: (s["step"], sorted(s))), [
            {"step": 0, "train_loss": 4.5, "val_loss": 4.6}, {"step": 1, "lr": 0.1},
            {"step": 10, "train_loss": 4.4, "val_loss": 4.5}])
        meta = self.meta(run)
        self.assertEqual(meta["samples"], {"count": 3, "malformed": 0})
        self.assertEqual(meta["last_metrics"], {"train_loss": 4.4, "val_loss": 4.5, "lr": 0.1})
        self.assertEqual(json.loads(self.db_rows()[0]["last_metrics"])["val_loss"], 4.5)
        self.assertEqual((run / "logs.txt").read_bytes(), logs_before)
        self.assertEqual(sorted(p.name for p in run.iterdir()), ["config.yaml", "logs.txt", "meta.json",
                                                                 "metrics.json", "outputs"])
        code, out, err = self.cli("show", run.name)
        self.assertRegex(out, r"val_loss +2 +4\.6 +4\.5 ")
        code, out, err = self.cli("plot", run.name, "--x", "time")  # the old arrival times would mislabel
        self.assertEqual(code, 2)
        self.assertIn("runs whose metrics `reparse` rebuilt", err)

    def test_reparse_without_sources_uses_the_runs_own(self):
        config = self.local_config("print({'loss': 1.5, 'epoch': 0.5})\n", "hf", extra="metrics_from: [huggingface]\n")
        self.assertEqual(self.process("run", config).returncode, 0)
        run = self.only_run()
        (run / "metrics.json").write_text("[]\n")
        code, out, err = self.cli("reparse", "latest")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.metrics(run), [{"step": 1, "loss": 1.5, "epoch": 0.5}])

    def test_reparse_refuses_a_bad_pattern_and_leaves_metrics_alone(self):
        self.assertEqual(self.process("run", self.local_config("print('METRIC a=1')\n")).returncode, 0)
        run = self.only_run()
        before = (run / "metrics.json").read_bytes()
        code, out, err = self.cli("reparse", run.name, "--metrics-from", "pattern:no groups")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, "runpilot: error: --metrics-from 'pattern:no groups': pattern 'no groups' names no "
                              "metric; name what it captures with groups, e.g. loss (?P<loss>[\\d.]+)\n")
        self.assertEqual((run / "metrics.json").read_bytes(), before)

    def test_tensorboard_files_written_by_the_job_become_samples(self):
        events = record(simple_value_event(3, "Loss/train", 0.75)) + record(tensor_event(4, "lr", 0.5))
        (self.work / "tb").mkdir()
        old = self.work / "tb" / "events.out.tfevents.0.old"  # an earlier run's, of a minute ago
        old.write_bytes(record(simple_value_event(1, "old", 1.0)))
        os.utime(old, (time.time() - 60, time.time() - 60))
        script = (f"import pathlib\npathlib.Path('tb/events.out.tfevents.1.h').write_bytes({events!r})\n")
        config = self.local_config(script, "tb", extra="metrics_from:\n  - tensorboard: tb\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        self.assertEqual(self.metrics(run), [{"step": 3, "Loss/train": 0.75}, {"step": 4, "lr": 0.5}])
        (run / "metrics.json").write_text("[]\n")
        self.assertEqual(self.cli("reparse", run.name)[0], 0)
        self.assertEqual(self.metrics(run), [{"step": 3, "Loss/train": 0.75}, {"step": 4, "lr": 0.5}])

    def test_event_files_in_the_code_copy_of_a_snapshot_run_become_samples(self):
        events = record(simple_value_event(3, "Loss/train", 0.75))
        script = (f"import pathlib\npathlib.Path('tb').mkdir()\n"
                  f"pathlib.Path('tb/events.out.tfevents.1.h').write_bytes({events!r})\n")
        config = self.local_config(script, "tbcode", extra="mounts:\n  code: .\nmetrics_from: [tensorboard: tb]\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        self.assertFalse((self.work / "tb").exists())  # the job ran in its own copy of the code
        self.assertEqual(self.metrics(run), [{"step": 3, "Loss/train": 0.75}])

    def test_event_files_are_read_while_the_job_runs(self):
        (self.work / "tb").mkdir()
        events = record(simple_value_event(1, "loss", 0.5))
        script = (f"import pathlib, time\npathlib.Path('tb/events.out.tfevents.1.h').write_bytes({events!r})\n"
                  "print('ready', flush=True)\n"
                  "while not pathlib.Path('go').exists():\n    time.sleep(0.05)\n")
        live = LiveRun(self, self.local_config(script, "live", extra="metrics_from: [tensorboard: tb]\n"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b'"loss"' not in (self.only_run() / "metrics.json").read_bytes():
            time.sleep(0.1)
        self.assertIn(b'{"step": 1, "loss": 0.5}', (self.only_run() / "metrics.json").read_bytes())
        self.assertIsNone(live.proc.poll())  # read while the job still runs
        (self.work / "go").touch()
        code, out, err = live.finish()
        self.assertEqual(code, 0, err)
        self.assertEqual(self.metrics(self.only_run()), [{"step": 1, "loss": 0.5}])

    def test_a_damaged_event_file_is_a_warning(self):
        bad = bytearray(record(simple_value_event(2, "a", 2.0)))
        bad[-6] ^= 0xFF
        events = record(simple_value_event(1, "a", 1.0)) + bytes(bad)
        (self.work / "tb").mkdir()
        script = f"import pathlib\npathlib.Path('tb/x.tfevents.1').write_bytes({events!r})\n"
        result = self.process("run", self.local_config(script, "bad", extra="metrics_from: [tensorboard: tb]\n"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"runpilot: warning: 1 TensorBoard event file(s) hold a record whose CRC check failed",
                      result.stderr)
        run = self.only_run()
        self.assertEqual(self.metrics(run), [{"step": 1, "a": 1.0}])
        self.assertEqual(len(self.meta(run)["warnings"]), 1)

    def test_engine_local_says_nothing_of_a_workdir_nobody_wrote(self):
        (self.work / "src").mkdir()
        (self.work / "src" / "t.py").write_text("print('METRIC a=1')\n")
        config = self.write("c.yaml", f"name: t\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, t.py]\n"
                                      "mounts: {code: ./src}\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(b"ignores", result.stderr)
        self.assertNotIn("workdir", (self.only_run() / "config.yaml").read_text())


class CheckWrites(HomeTestCase):
    def test_only_check_writes_leaves_out_rm(self):
        config = runpilot.validate_config({"name": "t", "image": "i", "entrypoint": "x"}, "<t>")
        self.assertEqual(runpilot.build_engine_argv(config, "r", "docker")[:3], ["docker", "run", "--rm"])
        argv = runpilot.build_engine_argv(config, "r", "podman", keep_container=True)
        self.assertNotIn("--rm", argv)
        self.assertEqual(argv[:3], ["podman", "run", "--init"])

    def test_diff_lines_sizes_and_the_warning(self):
        sizes = {"/scratch/out/ckpt.pt": 150 << 20, "/tmp/small": 1, "/scratch": 0, "/scratch/out": 0}
        writes = runpilot.parse_container_diff("C /tmp\nA /tmp/small\nA /scratch\nA /scratch/out\n"
                                               "A /scratch/out/ckpt.pt\nD /etc/motd\n", lambda p: sizes.get(p, 0))
        self.assertEqual(writes[0], ("/scratch/out/ckpt.pt", 150 << 20))
        self.assertNotIn("/etc/motd", [p for p, _ in writes])
        self.assertEqual(runpilot.unmounted_write_warnings(writes), [
            "the job wrote 150.0 MiB outside its mounts, now gone with its container: /scratch/out/ckpt.pt "
            "(150.0 MiB), /tmp/small (1 B); write such files into a mount (e.g. --out_dir=/mnt/NAME)"])
        self.assertEqual(runpilot.unmounted_write_warnings([("/tmp/x", 99 << 20)]), [])
        self.assertEqual(runpilot.unmounted_write_warnings(None), [])
