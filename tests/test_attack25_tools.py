"""Attacks on issue 25's exports, read back by the tools themselves (gated like tests/test_exports_tools.py:
they skip without `pip install tensorboard mlflow`, and fail instead when RUNPILOT_TEST_EXPORT_TOOLS=1).

TensorBoard's EventMultiplexer reads exports of NaN, ±inf, negative steps, steps beyond int64 and odd
metric and run names; a real `mlflow server` receives tag and param names it would refuse, values over
its length limits, NaN and ±inf, a URI with credentials and a trailing slash, and an export again.
"""

import math
import sys

import runpilot
from tests.common import RunsHome
import tests.test_exports_tools as tools
from tests.test_exports_tools import float32, multiplexer, points, require


class TensorBoardReadsOddRuns(RunsHome):
    def setUp(self):
        super().setUp()
        require(self, "tensorboard")

    def test_odd_values_steps_and_names(self):
        samples = [{"step": -3, "a/b": "nan", "x.y-z": "inf", "note": "text"}, {"step": 2 ** 70, "a/b": 1},
                   {"step": 5, "a/b": "-inf", "x.y-z": "1e400"}, {"step": 9223372036854775807, "a/b": 2.5}]
        a = self.add_run("same \x1b[31mname é", samples=samples)
        b = self.add_run("same \x1b[31mname é", samples=[{"step": 1, "a/b": 7}])
        out = self.tmp / "tb"
        code, _, err = self.cli("export", a.id, b.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        mux = multiplexer(out)
        run_a, run_b = (f"same_31mname-{runpilot.short_id(r.id)}" for r in (a, b))
        self.assertEqual(sorted(mux.Runs()), sorted([run_a, run_b]))
        got = points(mux, run_a, "a/b")
        self.assertEqual([step for step, _ in got], [-3, 5, 9223372036854775807])
        self.assertTrue(math.isnan(got[0][1]))
        self.assertEqual(got[1:], [(5, -math.inf), (9223372036854775807, 2.5)])
        self.assertEqual(points(mux, run_a, "x.y-z"), [(-3, math.inf), (5, math.inf)])
        self.assertEqual(points(mux, run_b, "a/b"), [(1, 7.0)])

    def test_the_runners_file_after_a_huge_step(self):
        script = "print('METRIC step=99999999999999999999999 loss=0.5')\n" + "".join(
            f"print('METRIC step={i} loss={i / 4}')\n" for i in range(40))
        code, _, err = self.cli("run", self.local_config(script, "tb", "tensorboard: true\n"))
        self.assertEqual(code, 0, err)
        mux = multiplexer(self.home / "runs")
        self.assertEqual(points(mux, self.only_run().name, "loss"), [(i, float32(i / 4)) for i in range(40)])


class MlflowTakesOddRuns(RunsHome):
    setUpClass = tools.MlflowReceivesExports.__dict__["setUpClass"]
    tearDownClass = tools.MlflowReceivesExports.__dict__["tearDownClass"]
    client = tools.MlflowReceivesExports.client

    def test_names_lengths_values_and_a_uri_with_credentials(self):
        config = ("name: odd\nengine: local\nentrypoint: [python3, t.py]\nenv:\n  'K!': q\n  LONG: '" + "y" * 7000
                  + "'\n")
        run = self.add_run("odd", samples=[{"step": 1, "loss": "nan", "acc": "inf"}, {"step": 2, "loss": 0.5}],
                           tags={"my key!": "v", "note": "w" * 9000}, config=config)
        host = self.uri.split("//", 1)[1]
        args = ("export", run.id, "--format", "mlflow", "-o", f"http://user:pw@{host}/", "--experiment", "odd")
        code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        self.assertNotIn("pw@", err)
        self.assertIn("(3 new metric value(s))", err)
        client = self.client()
        (found,) = client.search_runs([client.get_experiment_by_name("odd").experiment_id])
        self.assertEqual(found.data.tags["my key_"], "v")
        self.assertEqual(len(found.data.tags["note"]), runpilot.MLFLOW_TAG_MAX)
        self.assertEqual(found.data.params["env.K_"], "q")
        self.assertEqual(found.data.params["env.LONG"], "y" * runpilot.MLFLOW_PARAM_MAX)
        loss = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss"))
        self.assertEqual(loss[1], (2, 0.5))
        self.assertTrue(math.isnan(loss[0][1]))
        # MLflow's sqlite store keeps +inf as the largest double
        self.assertIn([m.value for m in client.get_metric_history(found.info.run_id, "acc")],
                      ([math.inf], [sys.float_info.max]))
        code, _, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        self.assertIn("(0 new metric value(s))", err)
