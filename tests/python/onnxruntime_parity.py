"""Independent reader check: ONNX Runtime must reproduce the trainer's own
probabilities for every test-window row of a bundle within 1e-5.

usage: python3 onnxruntime_parity.py MODEL.onnx TEST_ROWS.csv
"""
import csv
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

TOLERANCE = 1e-5


def main(model_path: str, rows_path: str) -> int:
    model = onnx.load(model_path)
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    names = json.loads(props["cartscore.feature_names"])

    with open(rows_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[: len(names)] == names, "test_rows.csv columns differ from the bundle's feature names"
        rows = [r for r in reader]
    features = np.array([[float(v) for v in r[: len(names)]] for r in rows], dtype=np.float32)
    expected = np.array([float(r[header.index("probability")]) for r in rows], dtype=np.float64)

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outputs = session.run(["probabilities"], {"features": features})[0]
    got = outputs[:, 1].astype(np.float64)
    diff = np.abs(got - expected)
    worst = float(diff.max()) if len(diff) else 0.0

    golden = json.loads(props["cartscore.golden_vectors"])
    golden_x = np.array([g["features"] for g in golden], dtype=np.float32)
    golden_p = np.array([g["probability"] for g in golden], dtype=np.float64)
    golden_diff = float(np.abs(session.run(["probabilities"], {"features": golden_x})[0][:, 1] - golden_p).max())

    print(f"onnxruntime {ort.__version__}: {len(rows)} test rows, max |diff| {worst:.3e}; "
          f"{len(golden)} golden vectors, max |diff| {golden_diff:.3e}")
    if worst > TOLERANCE or golden_diff > TOLERANCE:
        print("FAILED: ONNX Runtime disagrees with the trainer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
