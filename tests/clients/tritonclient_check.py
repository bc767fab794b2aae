#!/usr/bin/env python3
"""Calls a Tidal agent with Triton's own Python client (tritonclient.grpc, or tritonclient.http
for V2's REST form), as a Triton user would, and prints what it got as one JSON object on
stdout. The Rust test that runs it (tests/tests/v2_protocol.rs) checks the answers against
Tidal's own API. Over HTTP, one sample travels as binary tensor data and three as JSON."""

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent's inference port, host:port")
    p.add_argument("--model", required=True, help="the task to call")
    p.add_argument("--sample", required=True, help="a file of one float32 sample, little-endian")
    p.add_argument("--shape", required=True, help="the sample's shape, e.g. 3,64,64")
    p.add_argument("--token", help="the inference port's bearer token, if it takes one")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    a = p.parse_args()
    headers = {"authorization": f"Bearer {a.token}"} if a.token else None
    http = a.protocol == "http"
    lib = httpclient if http else grpcclient
    client = lib.InferenceServerClient(url=a.url)
    # The gRPC client answers protobuf messages unless asked for JSON; the HTTP one, JSON.
    as_json = {} if http else {"as_json": True}
    shape = [int(d) for d in a.shape.split(",")]
    x = np.fromfile(a.sample, dtype="<f4").reshape([1] + shape)

    def infer(model, batch, parameters=None, binary=True):
        tensor = lib.InferInput("input", list(batch.shape), "FP32")
        if http:
            tensor.set_data_from_numpy(batch, binary_data=binary)
            wanted = [lib.InferRequestedOutput("output", binary_data=binary)]
        else:
            tensor.set_data_from_numpy(batch)
            wanted = [lib.InferRequestedOutput("output")]
        return client.infer(model, [tensor], outputs=wanted, headers=headers, parameters=parameters)

    config = client.get_model_config(a.model, headers=headers, **as_json)
    out = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(a.model, headers=headers),
        "server": client.get_server_metadata(headers=headers, **as_json),
        "metadata": client.get_model_metadata(a.model, headers=headers, **as_json),
        "config": {"config": config} if http else config,
    }
    one = infer(a.model, x, {"budget_ms": 5000})
    out["one"] = one.as_numpy("output").tolist()
    out["parameters"] = one.get_response(**as_json).get("parameters", {})
    three = infer(a.model, np.concatenate([x, x * 0.5, x], axis=0), binary=False).as_numpy("output")
    out["three_shape"] = list(three.shape)
    out["three"] = three.tolist()
    try:
        infer("no-such-task", x)
        out["unknown_model"] = "answered"
    except InferenceServerException as e:
        out["unknown_model"] = e.status()
    out["statistics"] = client.get_inference_statistics(a.model, headers=headers, **as_json)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
