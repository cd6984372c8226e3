#!/usr/bin/env python3
"""The fused Conv+BN+ReLU layer's goals from one device call's output.

Reads what conv_bn_relu_bench printed and what torch_baseline.py printed (its stdout, or the JSON
it wrote) in the same call, and prints a Markdown table per (shape, dtype) and the goals:

- training: the better of the fused and the chained step within 1.15x of the convolutions alone,
  every shape and dtype (also from CUDA graphs, where the bench measured them);
- training: the fused step's geometric mean over the shapes at least 1.25x faster than PyTorch in
  a CUDA graph, and at least 1.5x faster than PyTorch eager, per dtype;
- inference: within 1.10x of the convolution forward, and faster than PyTorch's BN-folded eval
  forward, every shape.

Beside the goals it reports the bench's memory floor over the convolutions alone, and the fused
step's time above that floor. The floor is the least time of a fused step whose batch statistics
come from the convolution's output: the faster convolutions plus two serial passes, each moving as
many bytes as a copy of the output tensor. A shape whose floor is over 1.15x cannot meet the
training goal with such a fused step; the chained step, which hands on the convolution's output
and takes its gradient, is not bound by it. That row is a bound, not a goal. Where a run's floor
is above its own fused step, the floor does not bound that run (a disturbed timing): it is
written as "above the fused step" and left out of the bound's row, which names the shape.

A figure that is missing from the input (a shape PyTorch did not time, graphs not measured) is
written as "not measured", and a goal that needs it is not called met; nor is a goal judged on a
run without all six of the issue's shapes (the bench's default) for that dtype.
"""

import argparse
import ast
import json
import math
import re
import sys

TRAIN_WITHIN = 1.15
VS_GRAPH = 1.25
VS_EAGER = 1.5
INFER_WITHIN = 1.10

TORCH_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# The issue's shapes (the bench's default): a goal over "every shape" or "the six shapes" is judged
# only where the run has all of them.
SIX_SHAPES = ["N128_c64-64_h56_k3", "N128_c128-128_h28_k3", "N128_c256-256_h14_k3", "N128_c512-512_h7_k3",
              "N128_c256-64_h56_k1", "N128_c64-256_h56_k1"]

ROW = re.compile(
    r"^(?P<shape>N\d+_c\d+-\d+_h\d+_k\d+(?:_s\d+)?)\s+(?P<dtype>fp16|bf16|fp32)\s+(?P<fused>\S+)\s+(?P<conv>\S+)\s+"
    r"\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(?P<infer>\S+)\s+(?P<conv_fwd>\S+)\s+\S+\s+\S+(?P<wrong>\s+WRONG)?\s*$")
CHAINED = re.compile(r"^#\s+chained: (?P<chained>\S+) .*?(?P<wrong>WRONG)?\s*$")
FLOOR = re.compile(r"^#\s+memory floor: .*\+ 2 copies (?P<floor_ms>\S+) \| floor/conv (?P<floor>\S+)\s*$")
GRAPHS = re.compile(r"^#\s+from CUDA graphs: fused (?P<fused>\S+) conv alone (?P<conv>\S+) chained (?P<chained>\S+)"
                    r".*?(?P<wrong>WRONG)?\s*$")


class InputError(Exception):
    pass


def parse_bench(lines):
    """Rows of the bench in order: dicts with the figures of one (shape, dtype)."""
    rows = []
    for line in lines:
        line = line.rstrip("\n")
        m = ROW.match(line)
        if m:
            rows.append({
                "shape": m["shape"], "dtype": m["dtype"], "fused": float(m["fused"]), "conv": float(m["conv"]),
                "infer": float(m["infer"]), "conv_fwd": float(m["conv_fwd"]), "wrong": bool(m["wrong"]),
                "chained": None, "g_fused": None, "g_conv": None, "g_chained": None, "floor": None, "floor_ms": None,
            })
            continue
        if not rows:
            continue
        m = CHAINED.match(line)
        if m:
            rows[-1]["chained"] = float(m["chained"])
            rows[-1]["wrong"] |= bool(m["wrong"])
            continue
        m = FLOOR.match(line)
        if m:
            rows[-1].update(floor=float(m["floor"]), floor_ms=float(m["floor_ms"]))
            continue
        m = GRAPHS.match(line)
        if m:
            rows[-1].update(g_fused=float(m["fused"]), g_conv=float(m["conv"]), g_chained=float(m["chained"]))
            rows[-1]["wrong"] |= bool(m["wrong"])
    if not rows:
        raise InputError("no result rows found in the bench output")
    return rows


def parse_torch(text):
    """PyTorch's block figures by key (shape_dtype), from torch_baseline.py's JSON or its stdout."""
    try:
        return json.loads(text).get("block", {})
    except json.JSONDecodeError:
        pass  # not the JSON file: its stdout, one "KEY {figures}" line per shape and dtype
    block = {}
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if not re.match(r"^N\d+_c", key) or not rest.startswith("{"):
            continue
        try:
            block[key] = ast.literal_eval(rest)
        except (ValueError, SyntaxError) as e:
            raise InputError(f"a PyTorch line does not parse: {line[:80]}") from e
    return block


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def fmt(v, spec=".4f", suffix=""):
    return "not measured" if v is None else f"{v:{spec}}{suffix}"


def row_figures(r, torch):
    """The ratios of one bench row, and PyTorch's figures for its shape and dtype (None where missing)."""
    peer = torch.get(f"{r['shape']}_{TORCH_DTYPE[r['dtype']]}", {})
    graph, eager, folded = (peer.get(k) for k in ("cbr_fwdbwd_graph_ms", "cbr_fwdbwd_ms", "cbr_eval_folded_fwd_ms"))
    # A floor above the step it bounds is no bound in this run: left out of every floor figure.
    floor_holds = r["floor_ms"] is not None and r["floor_ms"] <= r["fused"]
    return {
        "best": min(t for t in (r["fused"], r["chained"]) if t is not None) / r["conv"],
        "g_best": min(r["g_fused"], r["g_chained"]) / r["g_conv"] if r["g_fused"] is not None and r["g_conv"] else None,
        "graph": graph, "eager": eager, "folded": folded,
        "vs_graph": graph / r["fused"] if graph else None,
        "vs_eager": eager / r["fused"] if eager else None,
        "infer": r["infer"] / r["conv_fwd"],
        "infer_vs_folded": folded / r["infer"] if folded else None,
        "floor_contradicted": r["floor_ms"] is not None and not floor_holds,
        "floor": r["floor"] if floor_holds else None,
        "over_floor": (r["fused"] - r["floor_ms"]) * 1000.0 if floor_holds else None,
    }


def evaluate(rows, torch):
    """The table rows and the goals, as lists of strings."""
    table = ["| shape | dtype | fused | chained | conv alone | best / conv | graphs: best / conv | PyTorch graph | "
             "PyTorch eager | fused vs graph | fused vs eager | inference / conv fwd | PyTorch BN-folded eval | "
             "memory floor / conv | fused over the floor (us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_dtype = {}  # dtype -> [(row, figures)] in bench order
    for r in rows:
        f = row_figures(r, torch)
        by_dtype.setdefault(r["dtype"], []).append((r, f))
        table.append(f"| {r['shape']} | {r['dtype']} | {r['fused']:.4f} | {fmt(r['chained'])} | {r['conv']:.4f} | "
                     f"{f['best']:.3f} | {fmt(f['g_best'], '.3f')} | {fmt(f['graph'], '.3f')} | "
                     f"{fmt(f['eager'], '.3f')} | {fmt(f['vs_graph'], '.2f', 'x')} | {fmt(f['vs_eager'], '.2f', 'x')} | "
                     f"{f['infer']:.3f} | {fmt(f['folded'], '.3f')} | "
                     + ("above the fused step | above the fused step |" if f["floor_contradicted"] else
                        f"{fmt(f['floor'], '.3f')} | {fmt(f['over_floor'], '.1f')} |")
                     + (" WRONG |" if r["wrong"] else ""))

    goals = ["| goal | dtype | measured | |", "|---|---|---|---|"]

    def verdict(ok, complete, every_shape=False):
        # A shape over the bound misses an every-shape goal whatever else was measured.
        if not ok and every_shape:
            return "**missed**"
        if not complete:
            return "not judged: not measured on the six shapes"
        return "met" if ok else "**missed**"

    for dt, entries in by_dtype.items():
        n = len(entries)
        six = set(SIX_SHAPES) <= {r["shape"] for r, _ in entries}

        def measured(key):
            return [f[key] for _, f in entries if f[key] is not None]

        best = measured("best")
        missed = sum(1 for b in best if b > TRAIN_WITHIN)
        goals.append(f"| training within {TRAIN_WITHIN:.2f}x of the convolutions alone, every shape | {dt} | best of "
                     f"fused and chained {min(best):.3f} to {max(best):.3f} ({missed} of {n} over) | "
                     f"{verdict(missed == 0, six, True)} |")
        g = measured("g_best")
        if g:
            g_missed = sum(1 for v in g if v > TRAIN_WITHIN)
            goals.append(f"| the same from CUDA graphs | {dt} | {min(g):.3f} to {max(g):.3f} ({g_missed} of {len(g)} "
                         f"over) | {verdict(g_missed == 0, six and len(g) == n, True)} |")
        floors = measured("floor")
        contradicted = [r["shape"] for r, f in entries if f["floor_contradicted"]]
        if floors or contradicted:
            over = [r["shape"] for r, f in entries if f["floor"] is not None and f["floor"] > TRAIN_WITHIN]
            parts = [f"{min(floors):.3f} to {max(floors):.3f}; over {TRAIN_WITHIN:.2f}x: {', '.join(over) or 'none'}"
                     if floors else "no floor below its fused step"]
            if contradicted:
                parts.append(f"left out, floor above the fused step: {', '.join(contradicted)}")
            goals.append(f"| memory floor of the fused step (statistics from y), over the convolutions alone | {dt} | "
                         f"{'; '.join(parts)} | a bound, not a goal |")
        for key, bound, what in (("vs_graph", VS_GRAPH, "PyTorch in a CUDA graph"),
                                 ("vs_eager", VS_EAGER, "PyTorch eager")):
            vals = measured(key)
            gm = geomean(vals)
            goals.append(f"| training: geometric mean at least {bound:.2f}x faster than {what} | {dt} | "
                         f"{fmt(gm, '.2f', 'x')} over {len(vals)} of {n} shapes | "
                         f"{verdict(gm is not None and gm >= bound, six and len(vals) == n)} |")
        infer = measured("infer")
        i_missed = sum(1 for v in infer if v > INFER_WITHIN)
        goals.append(f"| inference within {INFER_WITHIN:.2f}x of the convolution forward, every shape | {dt} | "
                     f"{min(infer):.3f} to {max(infer):.3f} | {verdict(i_missed == 0, six, True)} |")
        f = measured("infer_vs_folded")
        goals.append(f"| inference faster than PyTorch's BN-folded eval forward, every shape | {dt} | "
                     + (f"{min(f):.1f}x to {max(f):.1f}x faster" if f else "not measured")
                     + f" | {verdict(all(v > 1.0 for v in f), six and len(f) == n, True)} |")
        if any(r["wrong"] for r, _ in entries):
            goals.append(f"| results checked against the unfused path | {dt} | some rows WRONG | **failed** |")
    return table, goals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="conv_bn_relu_bench's output")
    parser.add_argument("--torch", help="torch_baseline.py's stdout or JSON from the same call (block)")
    args = parser.parse_args(argv)
    try:
        with open(args.bench, encoding="utf-8") as f:
            rows = parse_bench(f)
        torch = {}
        if args.torch:
            with open(args.torch, encoding="utf-8") as f:
                torch = parse_torch(f.read())
        table, goals = evaluate(rows, torch)
    except (OSError, InputError) as e:
        print(f"conv_bn_relu_goals: {e}", file=sys.stderr)
        return 2
    print("\n".join(table))
    print()
    print("\n".join(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
