#!/usr/bin/env python3
"""benchmarks/conv_bn_relu_goals.py on saved output of H100 device calls (2026-12-06 and 2026-12-07).

The expected figures were worked out by hand from the saved files: a ratio is two numbers of one
line, and the geometric means are over PyTorch's graph (eager) time divided by the fused time of
the six shapes.
"""

import io
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "conv_bn_relu_goals")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import conv_bn_relu_goals as goals  # noqa: E402


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = goals.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def fixture(name):
    return os.path.join(FIXTURES, name)


class SixShapes(unittest.TestCase):
    def setUp(self):
        self.rc, self.out, self.err = run("--bench", fixture("bench_fp16_h100.txt"), "--torch",
                                          fixture("torch_h100.txt"))
        self.assertEqual(self.rc, 0, self.err)

    def row(self, shape):
        lines = [l for l in self.out.splitlines() if l.startswith(f"| {shape} | fp16 |")]
        self.assertEqual(len(lines), 1, self.out)
        return [c.strip() for c in lines[0].strip("|").split("|")]

    def goal(self, start):
        lines = [l for l in self.out.splitlines() if l.startswith(f"| {start}")]
        self.assertEqual(len(lines), 1, self.out)
        return lines[0]

    def test_best_of_fused_and_chained(self):
        # 64-64: fused 0.3925, chained 0.3726, conv 0.2339 -> 0.3726 / 0.2339 = 1.593
        self.assertEqual(self.row("N128_c64-64_h56_k3")[5], "1.593")
        # 512-512: fused 0.1827 better than chained 0.1829 -> 0.1827 / 0.1519 = 1.203
        self.assertEqual(self.row("N128_c512-512_h7_k3")[5], "1.203")
        # from graphs, 64-256: min(0.8485, 0.4082) / 0.2870 = 1.422
        self.assertEqual(self.row("N128_c64-256_h56_k1")[6], "1.422")

    def test_peer_ratios(self):
        # 512-512 fp16: PyTorch graph 0.24297 ms / fused 0.1827 = 1.33x; eager 0.33951 / 0.1827 = 1.86x
        r = self.row("N128_c512-512_h7_k3")
        self.assertEqual(r[9], "1.33x")
        self.assertEqual(r[10], "1.86x")

    def test_goals(self):
        self.assertIn("1.203 to 1.593 (6 of 6 over) | **missed**", self.goal("training within 1.15x"))
        self.assertIn("1.82x over 6 of 6 shapes | met", self.goal("training: geometric mean at least 1.25x"))
        self.assertIn("2.02x over 6 of 6 shapes | met", self.goal("training: geometric mean at least 1.50x"))
        self.assertIn("0.994 to 1.037 | met", self.goal("inference within 1.10x"))
        self.assertIn("| met |", self.goal("inference faster than PyTorch"))


class PartialRun(unittest.TestCase):
    def test_goals_not_judged_without_the_six_shapes(self):
        rc, out, err = run("--bench", fixture("bench_bf16_two_shapes_h100.txt"), "--torch", fixture("torch_h100.txt"))
        self.assertEqual(rc, 0, err)
        # bf16 512-512 chained 0.1787 / conv 0.1558 = 1.147: within 1.15, but 256-256 (1.306) is over
        self.assertIn("1.147 to 1.306 (1 of 2 over) | **missed**", out)
        self.assertIn("1.49x over 2 of 2 shapes | not judged", out)

    def test_without_the_peer(self):
        rc, out, err = run("--bench", fixture("bench_fp16_h100.txt"))
        self.assertEqual(rc, 0, err)
        self.assertIn("not measured over 0 of 6 shapes | not judged", out)


class MemoryFloor(unittest.TestCase):
    """A later H100 call (2026-12-06, bench_fp16_floor_h100.txt) whose bench printed the memory floor."""

    def test_floor_column_and_bound(self):
        rc, out, err = run("--bench", fixture("bench_fp16_floor_h100.txt"))
        self.assertEqual(rc, 0, err)
        rows = [l for l in out.splitlines() if l.startswith("| N128_c")]
        # the bench's own ratio: 64-64 (0.2360 beside + 2 x 0.0376) / 0.2409 conv alone = 1.292
        # and the fused step above its floor: (0.4027 - 0.3113) ms = 91.4 us
        self.assertTrue(rows[0].endswith("| 1.292 | 91.4 |"), rows[0])
        self.assertTrue(rows[3].endswith("| 1.042 | 24.6 |"), rows[3])
        self.assertIn("| fp16 | 1.042 to 1.958; over 1.15x: N128_c64-64_h56_k3, N128_c128-128_h28_k3, "
                      "N128_c256-64_h56_k1, N128_c64-256_h56_k1 | a bound, not a goal |", out)

    def test_without_the_floor_line(self):
        rc, out, err = run("--bench", fixture("bench_fp16_h100.txt"))
        self.assertEqual(rc, 0, err)
        self.assertNotIn("memory floor of the fused step", out)
        rows = [l for l in out.splitlines() if l.startswith("| N128_c")]
        self.assertEqual(len(rows), 6, out)
        self.assertTrue(all(l.endswith("| not measured | not measured |") for l in rows), out)


class FloorAboveTheFusedStep(unittest.TestCase):
    """An H100 call (2026-12-07, bench_fp16_choices_h100.txt, with DSTRAIN_LOG_CHOICES' lines) in which
    the copy of 512-512's output was timed at 0.0269 ms (0.0063 to 0.0076 in the calls before),
    putting the floor (0.2063) above the fused step (0.1829)."""

    def setUp(self):
        self.rc, self.out, self.err = run("--bench", fixture("bench_fp16_choices_h100.txt"))
        self.assertEqual(self.rc, 0, self.err)

    def test_not_reported_as_a_bound(self):
        rows = [l for l in self.out.splitlines() if l.startswith("| N128_c")]
        self.assertEqual(len(rows), 6, self.out)
        self.assertTrue(rows[3].endswith("| above the fused step | above the fused step |"), rows[3])
        # 256-256 keeps its floor: the bench's ratio 1.071, and the fused step (0.1958 - 0.1627) ms = 33.1 us above it
        self.assertTrue(rows[2].endswith("| 1.071 | 33.1 |"), rows[2])

    def test_left_out_of_the_bound_row(self):
        # 1.071 (256-256) to 1.942 (64-256) from the five other shapes; 512-512's 1.343 is not among them
        self.assertIn("| fp16 | 1.071 to 1.942; over 1.15x: N128_c64-64_h56_k3, N128_c128-128_h28_k3, "
                      "N128_c256-64_h56_k1, N128_c64-256_h56_k1; left out, floor above the fused step: "
                      "N128_c512-512_h7_k3 | a bound, not a goal |", self.out)


class BadInput(unittest.TestCase):
    def test_missing_file(self):
        rc, _, err = run("--bench", os.path.join(FIXTURES, "no_such_file.txt"))
        self.assertEqual(rc, 2)
        self.assertIn("no_such_file.txt", err)

    def test_not_bench_output(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("nothing to see\n")
        try:
            rc, _, err = run("--bench", f.name)
        finally:
            os.unlink(f.name)
        self.assertEqual(rc, 2)
        self.assertIn("no result rows", err)


if __name__ == "__main__":
    unittest.main()
