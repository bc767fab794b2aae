#!/usr/bin/env python3
"""Calls a Tidal agent with Triton's own Python client (tritonclient.grpc, or tritonclient.http
for V2's REST form), as a Triton user would, and prints what it got as one JSON object on
stdout. The Rust test that runs it (tests/tests/process/v2_protocol.rs) checks the answers against
Tidal's own API. Over HTTP, one sample travels as binary tensor data and three as JSON. Then
the paths users take beyond a plain call: compressed requests and answers (gzip, deflate), the
classification extension (`class_count`), the asynchronous call, and over gRPC the
bidirectional stream (`start_stream`, `async_stream_infer`), an error in it included."""

import argparse
import json
import queue
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

    def request(batch, binary=True, class_count=0):
        tensor = lib.InferInput("input", list(batch.shape), "FP32")
        if http:
            tensor.set_data_from_numpy(batch, binary_data=binary)
            wanted = [lib.InferRequestedOutput("output", binary_data=binary, class_count=class_count)]
        else:
            tensor.set_data_from_numpy(batch)
            wanted = [lib.InferRequestedOutput("output", class_count=class_count)]
        return [tensor], wanted

    def infer(model, batch, parameters=None, binary=True, class_count=0, compression=None):
        inputs, wanted = request(batch, binary, class_count)
        if compression is None:
            compressed = {}
        elif http:
            compressed = {"request_compression_algorithm": compression, "response_compression_algorithm": compression}
        else:
            compressed = {"compression_algorithm": compression}
        return client.infer(model, inputs, outputs=wanted, headers=headers, parameters=parameters, **compressed)

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
    for compression in ["gzip", "deflate"]:
        out[compression] = infer(a.model, x, compression=compression).as_numpy("output").tolist()
    classes = infer(a.model, x, class_count=3).as_numpy("output")
    out["classes"] = [[c.decode() for c in row] for row in classes]
    try:
        infer(a.model, x, class_count=-1)
        out["bad_class_count"] = "answered"
    except InferenceServerException as e:
        out["bad_class_count"] = f"{e.status()} {e.message()}"
    inputs, wanted = request(x)
    if http:
        pending = client.async_infer(a.model, inputs, outputs=wanted, headers=headers)
        out["async"] = pending.get_result().as_numpy("output").tolist()
    else:
        done = queue.Queue()
        client.async_infer(
            a.model, inputs, callback=lambda result, error: done.put((result, error)), outputs=wanted, headers=headers
        )
        result, error = done.get(timeout=60)
        out["async"] = result.as_numpy("output").tolist() if error is None else str(error)
        # One stream: two requests answered in order, and one for a model that does not exist
        # answered with its error in the stream, which goes on.
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
        for model, request_id in [(a.model, "first"), ("no-such-task", "bad"), (a.model, "last")]:
            inputs, wanted = request(x)
            client.async_stream_infer(model, inputs, outputs=wanted, request_id=request_id)
        stream = []
        for _ in range(3):
            result, error = answers.get(timeout=60)
            if error is None:
                response = result.get_response()
                stream.append({"id": response.id, "output": result.as_numpy("output").tolist()})
            else:
                stream.append({"error": error.message()})
        client.stop_stream()
        out["stream"] = stream
    out["statistics"] = client.get_inference_statistics(a.model, headers=headers, **as_json)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
