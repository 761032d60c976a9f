"""Tree scoring engine by engine, on the same models and the same rows, in
one run: ONNX Runtime (the bundle), LightGBM's own predict, treelite +
tl2cgen (compiled C) and lleaves (LLVM) on the LightGBM model text the
trainer writes beside the bundle, against cartscore's compiled evaluator
(timed in process by `cartscore-bench engine`, passed in as JSON).

Every engine runs on one thread. Each Python engine's figure includes the
cost of calling it from Python; an empty call (a Python function taking the
same array) is measured beside it, so the reader can see how much of a
batch-1 figure is the caller. Each engine's probabilities are checked
against LightGBM's own before it is timed.

usage: compare.py --models DIR... --rows ROWS.csv --cartscore RESULTS.json
                  --table OUT.md --plot OUT.png [--seconds 1.0]
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time

import numpy as np


def read_rows(path, names):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        columns = [header.index(n) for n in names]
        rows = [[float(r[c]) for c in columns] for r in reader]
    return np.ascontiguousarray(np.array(rows, dtype=np.float32))


def median_ns(call, batch, rows, seconds):
    """Median over 20 samples of the time per call, cycling through windows of the rows."""
    windows = [np.ascontiguousarray(rows[i : i + batch]) for i in range(0, len(rows) - batch + 1, max(batch, 1))][:64]
    started = time.perf_counter()
    calls = 0
    while time.perf_counter() - started < seconds / 200:
        call(windows[calls % len(windows)])
        calls += 1
    per_sample = max(calls * 10, 1)
    samples = []
    for _ in range(20):
        t = time.perf_counter_ns()
        for i in range(per_sample):
            call(windows[i % len(windows)])
        samples.append((time.perf_counter_ns() - t) / per_sample)
    return statistics.median(samples)


def engines(model_dir, work, names):
    """name -> (predict(X) -> probabilities, trees)."""
    import lightgbm
    import lleaves
    import onnxruntime as ort
    import tl2cgen
    import treelite

    text = os.path.join(model_dir, "lightgbm.txt")
    booster = lightgbm.Booster(model_file=text)
    trees = booster.num_trees()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name

    tag = os.path.basename(os.path.normpath(model_dir))
    library = os.path.join(work, f"treelite-{tag}.so")
    if not os.path.exists(library):
        model = treelite.frontend.load_lightgbm_model(text)
        tl2cgen.export_lib(model, toolchain="gcc", libpath=library, params={"parallel_comp": 8}, verbose=False)
    predictor = tl2cgen.Predictor(library, nthread=1)

    # lleaves reads the trailer LightGBM's Python API writes (the C API's
    # text has none): the same model with it.
    with_trailer = os.path.join(work, f"lleaves-{tag}.txt")
    with open(text) as f, open(with_trailer, "w") as g:
        g.write(f.read().rstrip("\n") + "\n\npandas_categorical:null\n")
    compiled = lleaves.Model(model_file=with_trailer)
    compiled.compile(cache=os.path.join(work, f"lleaves-{tag}.o"))

    return trees, {
        "ONNX Runtime": lambda x: session.run(["probabilities"], {feed: x})[0][:, 1],
        "LightGBM": lambda x: booster.predict(x, num_threads=1),
        "treelite + tl2cgen": lambda x: np.ravel(predictor.predict(tl2cgen.DMatrix(x))),
        "lleaves": lambda x: compiled.predict(x, n_jobs=1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--cartscore", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--plot", required=True)
    parser.add_argument("--batch", default="1,16,1024")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    work = os.path.dirname(os.path.abspath(args.table))

    with open(args.cartscore) as f:
        ours = json.load(f)
    results = []  # (model, trees, engine, batch, ns per tree per row, overhead ns per call or None)
    empty = lambda x: x
    for model_dir in args.models:
        bundle = os.path.join(model_dir, "model.onnx")
        names = None
        import onnx

        props = {p.key: p.value for p in onnx.load(bundle).metadata_props}
        names = json.loads(props["cartscore.feature_names"])
        rows = read_rows(args.rows, names)
        trees, runs = engines(model_dir, work, names)
        reference = runs["LightGBM"](rows[:1024])
        tag = os.path.basename(os.path.normpath(model_dir))
        for name, run in runs.items():
            diff = float(np.max(np.abs(np.asarray(run(rows[:1024]), dtype=np.float64) - reference)))
            if diff > 1e-5:
                sys.exit(f"{name} on {tag}: probabilities differ from LightGBM's by {diff}")
        for batch in batches:
            overhead = median_ns(empty, batch, rows, args.seconds / 4)
            for name, run in runs.items():
                ns = median_ns(run, batch, rows, args.seconds)
                results.append((tag, trees, name, batch, ns / (batch * trees), overhead))
                print(f"{tag:<12} {trees:>4} trees  batch {batch:>5}  {name:<20} {ns / (batch * trees):>9.2f} ns/tree/row  ({ns:>11.0f} ns/call; an empty Python call {overhead:.0f} ns)", flush=True)
            for form, name in (("served", "cartscore"), ("walk", "cartscore (walk)")):
                mine = [r for r in ours if os.path.normpath(os.path.dirname(r["bundle"])) == os.path.normpath(model_dir) and r["batch"] == batch and r["form"] == form]
                if not mine:
                    sys.exit(f"no cartscore {form} result for {bundle} at batch {batch}")
                results.append((tag, trees, name, batch, mine[0]["ns_per_tree_per_row"], None))
                print(f"{tag:<12} {trees:>4} trees  batch {batch:>5}  {name:<20} {mine[0]['ns_per_tree_per_row']:>9.2f} ns/tree/row  (in process)", flush=True)

    engine_names = ["cartscore", "cartscore (walk)", "lleaves", "treelite + tl2cgen", "ONNX Runtime", "LightGBM"]
    others = engine_names[2:]
    lines = [
        "| model | batch | " + " | ".join(engine_names) + " | cartscore ahead of the next by |",
        "|---|---:|" + "---:|" * len(engine_names) + "---:|",
    ]
    models = []
    for r in results:
        if (r[0], r[1]) not in models:
            models.append((r[0], r[1]))
    for tag, trees in models:
        for batch in batches:
            cell = {r[2]: r for r in results if r[0] == tag and r[3] == batch}
            figures = []
            for e in engine_names:
                r = cell[e]
                figures.append(f"**{r[4]:.2f}**" if e == "cartscore" else f"{r[4]:.2f}")
            best_other = min(cell[e][4] for e in others)
            ratio = best_other / cell["cartscore"][4]
            overhead = cell["lleaves"][5] / (batch * trees)
            lines.append(f"| {tag} ({trees} trees) | {batch} | " + " | ".join(figures) + f" | {ratio:.1f}x |")
    lines.append("")
    lines.append("ns per tree per row (one thread); the Python engines' figures include the call from Python. An empty Python call taking the same array costs: " + ", ".join(
        f"batch {b}: {next(r[5] for r in results if r[3] == b and r[5] is not None):.0f} ns" for b in batches) + ".")
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), sharey=True)
    if len(models) == 1:
        axes = [axes]
    colors = {"cartscore": "#c0392b", "cartscore (walk)": "#e6a39a", "lleaves": "#2980b9", "treelite + tl2cgen": "#27ae60", "ONNX Runtime": "#8e44ad", "LightGBM": "#7f8c8d"}
    width = 0.14
    for ax, (tag, trees) in zip(axes, models):
        for i, e in enumerate(engine_names):
            ys = [next(r[4] for r in results if r[0] == tag and r[2] == e and r[3] == b) for b in batches]
            xs = [j + (i - (len(engine_names) - 1) / 2) * width for j in range(len(batches))]
            ax.bar(xs, ys, width, label=e, color=colors[e])
        ax.set_yscale("log")
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_title(f"{tag}: {trees} trees")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("ns per tree per row (log scale, lower is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Tree scoring, one thread, same models and rows (Python engines include the call)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.table} and {args.plot}")


if __name__ == "__main__":
    main()
