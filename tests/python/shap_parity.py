"""Independent explanation check: the `shap` package's TreeExplainer, given
the bundle's own trees (read from its ONNX graph) and node covers (its
`cartscore.shap` metadata), must reproduce the contributions and the base
value cartscore answered for every row within 1e-4.

usage: python3 shap_parity.py MODEL.onnx EXPLAINED.csv

EXPLAINED.csv: the feature columns in contract order, then `shap_<feature>`
for each and `shap_base_value` (what the appliance answered).
"""
import csv
import json
import sys
from collections import defaultdict

import numpy as np
import onnx
import shap
from onnx import helper

TOLERANCE = 1e-4


def trees_of(model: onnx.ModelProto, covers: list) -> tuple[list, float]:
    """shap's dictionary form of each tree, indexed by ONNX node id."""
    (node,) = model.graph.node
    assert node.op_type == "TreeEnsembleClassifier", node.op_type
    a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    leaf = defaultdict(float)
    for t, n, w in zip(a["class_treeids"], a["class_nodeids"], a["class_weights"]):
        leaf[(t, n)] += w
    by_tree = defaultdict(list)
    for i, t in enumerate(a["nodes_treeids"]):
        by_tree[t].append(i)
    missing = a.get("nodes_missing_value_tracks_true", [0] * len(a["nodes_treeids"]))
    trees = []
    for t in sorted(by_tree):
        positions = sorted(by_tree[t], key=lambda i: a["nodes_nodeids"][i])
        size = len(positions)
        assert len(covers[t]) == size, f"tree {t}: {len(covers[t])} covers for {size} nodes"
        left = np.full(size, -1, dtype=np.int32)
        right = np.full(size, -1, dtype=np.int32)
        default = np.full(size, -1, dtype=np.int32)
        feature = np.full(size, -2, dtype=np.int32)
        threshold = np.zeros(size, dtype=np.float64)
        value = np.zeros((size, 1), dtype=np.float64)
        for i in positions:
            n = a["nodes_nodeids"][i]
            mode = a["nodes_modes"][i].decode()
            if mode == "LEAF":
                # The leaf as served: an f32.
                value[n, 0] = float(np.float32(leaf[(t, n)]))
                continue
            assert mode in ("BRANCH_LEQ", "BRANCH_LT"), mode
            cut = np.float32(a["nodes_values"][i])
            if mode == "BRANCH_LT":
                cut = np.nextafter(cut, np.float32(-np.inf))
            left[n], right[n] = a["nodes_truenodeids"][i], a["nodes_falsenodeids"][i]
            default[n] = left[n] if missing[i] else right[n]
            feature[n] = a["nodes_featureids"][i]
            threshold[n] = float(cut)
        trees.append(
            {
                "children_left": left,
                "children_right": right,
                "children_default": default,
                "feature": feature,
                "threshold": threshold,
                "value": value,
                "node_sample_weight": np.array(covers[t], dtype=np.float64),
            }
        )
    base = a.get("base_values", [0.0])
    return trees, float(np.float32(base[0])) if base else 0.0


def main(model_path: str, rows_path: str) -> int:
    model = onnx.load(model_path)
    props = {p.key: p.value for p in model.metadata_props}
    names = json.loads(props["cartscore.feature_names"])
    covers = json.loads(props["cartscore.shap"])["covers"]
    trees, base = trees_of(model, covers)

    with open(rows_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[: len(names)] == names, "the rows' columns differ from the bundle's feature names"
        rows = list(reader)
    x = np.array([[float(v) for v in r[: len(names)]] for r in rows], dtype=np.float32).astype(np.float64)
    ours = np.array(
        [[float(r[header.index(f"shap_{n}")]) for n in names] for r in rows], dtype=np.float64
    )
    our_base = np.array([float(r[header.index("shap_base_value")]) for r in rows])

    explainer = shap.TreeExplainer(
        {"trees": trees, "base_offset": base},
        feature_perturbation="tree_path_dependent",
        model_output="raw",
    )
    theirs = np.asarray(explainer.shap_values(x))
    expected = float(np.ravel(explainer.expected_value)[0])
    worst = max(float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(our_base - expected))))
    if worst > TOLERANCE:
        row, column = np.unravel_index(np.argmax(np.abs(ours - theirs)), ours.shape)
        print(
            f"shap {shap.__version__} disagrees: row {row}, {names[column]}: "
            f"cartscore {ours[row, column]}, shap {theirs[row, column]}; base {our_base[0]} vs {expected}; "
            f"max |diff| {worst:.3e} > {TOLERANCE}"
        )
        return 1
    print(
        f"shap {shap.__version__} TreeExplainer agrees on {len(rows)} rows x {len(names)} features "
        f"and the base value: max |diff| {worst:.3e} (tolerance {TOLERANCE})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
