#!/usr/bin/env python3
"""Calls a Tidal agent with Triton's own Python client (tritonclient.grpc), as a Triton user
would, and prints what it got as one JSON object on stdout. The Rust test that runs it
(tests/tests/v2_protocol.rs) checks the answers against Tidal's own API."""

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent's inference port, host:port")
    p.add_argument("--model", required=True, help="the task to call")
    p.add_argument("--sample", required=True, help="a file of one float32 sample, little-endian")
    p.add_argument("--shape", required=True, help="the sample's shape, e.g. 3,64,64")
    p.add_argument("--token", help="the inference port's bearer token, if it takes one")
    a = p.parse_args()
    headers = {"authorization": f"Bearer {a.token}"} if a.token else None
    client = grpcclient.InferenceServerClient(url=a.url)
    shape = [int(d) for d in a.shape.split(",")]
    x = np.fromfile(a.sample, dtype="<f4").reshape([1] + shape)

    def infer(model, batch, parameters=None):
        tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        wanted = [grpcclient.InferRequestedOutput("output")]
        return client.infer(model, [tensor], outputs=wanted, headers=headers, parameters=parameters)

    out = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(a.model, headers=headers),
        "server": client.get_server_metadata(headers=headers, as_json=True),
        "metadata": client.get_model_metadata(a.model, headers=headers, as_json=True),
        "config": client.get_model_config(a.model, headers=headers, as_json=True),
    }
    one = infer(a.model, x, {"budget_ms": 5000})
    out["one"] = one.as_numpy("output").tolist()
    out["parameters"] = one.get_response(as_json=True).get("parameters", {})
    three = infer(a.model, np.concatenate([x, x * 0.5, x], axis=0)).as_numpy("output")
    out["three_shape"] = list(three.shape)
    out["three"] = three.tolist()
    try:
        infer("no-such-task", x)
        out["unknown_model"] = "answered"
    except InferenceServerException as e:
        out["unknown_model"] = e.status()
    out["statistics"] = client.get_inference_statistics(a.model, headers=headers, as_json=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
