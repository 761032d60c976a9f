"""Per-row latency of ONNX Runtime on a cartscore bundle: the reference the
appliance's compiled evaluator is compared with (see the README).

    python3 appliance/benches/onnxruntime_latency.py [models/demo/model.onnx]

Runs single-row inference on the bundle's golden vectors, one thread, and
prints percentiles over 50,000 calls after a warm-up.
"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

path = sys.argv[1] if len(sys.argv) > 1 else "models/demo/model.onnx"
meta = {p.key: p.value for p in onnx.load(path).metadata_props}
rows = [np.asarray([g["features"]], dtype=np.float32)
        for g in json.loads(meta["cartscore.golden_vectors"])]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for i in range(5_000):
    session.run(None, {name: rows[i % len(rows)]})
calls = 50_000
times = np.empty(calls)
for i in range(calls):
    row = rows[i % len(rows)]
    start = time.perf_counter_ns()
    session.run(None, {name: row})
    times[i] = time.perf_counter_ns() - start
print(f"onnxruntime {ort.__version__}, {path}, {calls} single-row calls, 1 thread:")
for q in (50, 90, 99, 99.9):
    print(f"  p{q:<5} {np.percentile(times, q) / 1e3:7.2f} µs")
print(f"  max    {times.max() / 1e3:7.2f} µs")
