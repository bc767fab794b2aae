#!/usr/bin/env python3
"""Calls a Tidal agent serving models of several typed inputs and outputs (tests/src/onnx_models.rs)
with Triton's own Python client, over gRPC and over HTTP (binary tensor data and JSON), as a
Triton user would, and checks every answer against ONNX Runtime's Python API run in this process
on the same input (one intra-op thread): FP32 within 1e-5 relative, every other type exactly.
Prints one JSON object: for each protocol and case, "ok" or what differed. The Rust test that
runs it (tests/tests/process/user_models.rs) asserts that every case is "ok"."""

import argparse
import json
import os

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def session(models, name):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.path.join(models, name + ".onnx"), options, providers=["CPUExecutionProvider"])


def compare(got, want):
    """None when equal as the docstring says, else why not."""
    if got is None:
        return "missing"
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{got.dtype}{list(got.shape)} against {want.dtype}{list(want.shape)}"
    if want.dtype == np.float32:
        worst = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-6))) if want.size else 0.0
        return None if worst <= 1e-5 else f"differs by {worst} (relative)"
    return None if np.array_equal(got, want) else "values differ"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent's inference port, host:port")
    p.add_argument("--models", required=True, help="the directory of the served model files")
    a = p.parse_args()
    rng = np.random.default_rng(7)
    detector, recurrent = session(a.models, "detector"), session(a.models, "recurrent")
    cases = {
        # Two samples of one image size; an INT64 scalar and an FP16 row per sample.
        "detect": (detector, {
            "images": rng.uniform(-1, 1, (2, 3, 5, 7)).astype(np.float32),
            "scale": np.array([2, 5], dtype=np.int64),
            "bias": rng.uniform(-1, 1, (2, 4)).astype(np.float16),
        }, None),
        # Only one output asked for.
        "detect-next": (detector, {
            "images": rng.uniform(-1, 1, (1, 3, 9, 4)).astype(np.float32),
            "scale": np.array([3], dtype=np.int64),
            "bias": rng.uniform(-1, 1, (1, 4)).astype(np.float16),
        }, ["next"]),
        # No batch dimension: the tensors whole, a scalar among them.
        "step": (recurrent, {
            "state": rng.uniform(-1, 1, (2, 8)).astype(np.float32),
            "step": np.array(4, dtype=np.int64),
        }, None),
    }
    report = {}
    for protocol, lib in [("grpc", grpcclient), ("http", httpclient), ("http-json", httpclient)]:
        client = lib.InferenceServerClient(url=a.url)
        binary = protocol != "http-json"
        for case, (sess, inputs, wanted) in cases.items():
            model = "step" if case == "step" else "detect"
            want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))
            tensors = []
            for name, value in inputs.items():
                t = lib.InferInput(name, list(value.shape), grpcclient.np_to_triton_dtype(value.dtype))
                if lib is httpclient:
                    t.set_data_from_numpy(value, binary_data=binary)
                else:
                    t.set_data_from_numpy(value)
                tensors.append(t)
            names = wanted or list(want)
            if lib is httpclient:
                outputs = [lib.InferRequestedOutput(n, binary_data=binary) for n in names]
            else:
                outputs = [lib.InferRequestedOutput(n) for n in names]
            try:
                result = client.infer(model, tensors, outputs=outputs)
                problems = {n: compare(result.as_numpy(n), want[n]) for n in names}
                problems = {n: why for n, why in problems.items() if why}
                report[f"{protocol}/{case}"] = "ok" if not problems else problems
            except Exception as e:  # noqa: BLE001 - the report says what failed
                report[f"{protocol}/{case}"] = f"{type(e).__name__}: {e}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
