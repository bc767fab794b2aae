#!/usr/bin/env python3
"""Calls a Tidal agent serving a text task (text in, a label out, as V2 BYTES) with Triton's own
Python client, over gRPC and over HTTP (binary tensor data and JSON), as a Triton user sends
text: a numpy array of Python strings or bytes, dtype object, datatype "BYTES". Checks each
answer's label against the one the Rust test computed with ONNX Runtime and the same tokenizer
(tests/tests/process/text_pipelines.rs). Prints one JSON object: for each protocol and case, "ok" or
what differed."""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent's inference port, host:port")
    p.add_argument("--task", required=True, help="the text task")
    p.add_argument("--text", action="append", required=True, help="a text to send")
    p.add_argument("--label", action="append", required=True, help="its expected label, in order")
    a = p.parse_args()
    want = np.array([[t.encode()] for t in a.label], dtype=object)
    cases = {
        # Two texts in one request, as str and as bytes.
        "str": np.array([[t] for t in a.text], dtype=object),
        "bytes": np.array([[t.encode()] for t in a.text], dtype=object),
    }
    report = {}
    for protocol, lib in [("grpc", grpcclient), ("http", httpclient), ("http-json", httpclient)]:
        client = lib.InferenceServerClient(url=a.url)
        binary = protocol != "http-json"
        for case, texts in cases.items():
            t = lib.InferInput("text", list(texts.shape), "BYTES")
            if lib is httpclient:
                t.set_data_from_numpy(texts, binary_data=binary)
                outputs = [lib.InferRequestedOutput("label", binary_data=binary)]
            else:
                t.set_data_from_numpy(texts)
                outputs = [lib.InferRequestedOutput("label")]
            try:
                got = client.infer(a.task, [t], outputs=outputs).as_numpy("label")
                # JSON answers come back as str, binary ones as bytes.
                got = None if got is None else np.array(
                    [[v if isinstance(v, bytes) else str(v).encode() for v in row] for row in got], dtype=object)
                if got is None:
                    report[f"{protocol}/{case}"] = "no label"
                elif got.shape != want.shape or not (got == want).all():
                    report[f"{protocol}/{case}"] = f"{got.tolist()} against {want.tolist()}"
                else:
                    report[f"{protocol}/{case}"] = "ok"
            except Exception as e:  # noqa: BLE001 - the report says what failed
                report[f"{protocol}/{case}"] = f"{type(e).__name__}: {e}"
    meta = grpcclient.InferenceServerClient(url=a.url).get_model_metadata(a.task, as_json=True)
    report["grpc/metadata"] = "ok" if meta["inputs"][0]["datatype"] == "BYTES" else f"{meta}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
