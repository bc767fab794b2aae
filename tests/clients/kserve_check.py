#!/usr/bin/env python3
"""Calls a Tidal agent over TLS with the clients users already run, each as its own
documentation shows, and prints what each call got as one JSON object on stdout: the KServe
Python SDK's REST client (HTTP/1.1, then HTTP/2) and gRPC client, httpx and requests over
HTTP/1.1, and gRPC's own health and reflection clients. Every check is recorded as
{"ok": true, ...} or {"ok": false, "error": "..."}; the Rust test that runs it
(tests/tests/process/security.rs) asserts on them, so a client that fails shows its own error."""

import argparse
import asyncio
import json
import sys
import traceback

import grpc
import httpx
import numpy as np
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def record(results, name, fn):
    try:
        results[name] = {"ok": True, **(fn() or {})}
    except Exception as e:  # a client's own error, as the user would see it
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}


async def record_async(results, name, coro):
    try:
        results[name] = {"ok": True, **((await coro) or {})}
    except Exception as e:
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}


def request(model, shape, n):
    x = InferInput("input", [n] + shape, "FP32")
    x.set_data_from_numpy(np.random.default_rng(n).random([n] + shape, dtype=np.float32))
    return InferRequest(model_name=model, infer_inputs=[x])


def logits_shape(response):
    return {"shape": list(response.outputs[0].as_numpy().shape), "name": response.outputs[0].name}


async def kserve_rest(results, base, model, shape, ca, http2):
    tag = "kserve_rest_h2" if http2 else "kserve_rest"
    client = InferenceRESTClient(RESTConfig(protocol="v2", verify=ca, http2=http2, timeout=30))
    try:

        async def ready():
            live = await client.is_server_live(base)
            ready = await client.is_server_ready(base)
            model_ready = await client.is_model_ready(base, model)
            assert live and ready and model_ready, (live, ready, model_ready)

        await record_async(results, f"{tag}_health", ready())

        async def infer(n):
            return logits_shape(await client.infer(base, request(model, shape, n), model_name=model))

        await record_async(results, f"{tag}_infer_one", infer(1))
        await record_async(results, f"{tag}_infer_two", infer(2))

        async def unknown():
            try:
                await client.infer(base, request("no-such-model", shape, 1), model_name="no-such-model")
            except httpx.HTTPStatusError as e:
                return {"status": e.response.status_code, "body": e.response.json()}
            raise AssertionError("an unknown model was served")

        await record_async(results, f"{tag}_unknown_model", unknown())
    finally:
        await client.close()


async def kserve_grpc(results, url, model, shape, ca):
    client = InferenceGRPCClient(url, use_ssl=True, root_certificates=ca, timeout=30)
    try:

        async def ready():
            live = await client.is_server_live()
            ready = await client.is_server_ready()
            model_ready = await client.is_model_ready(model)
            assert live and ready and model_ready, (live, ready, model_ready)

        await record_async(results, "kserve_grpc_health", ready())

        async def infer(n):
            return logits_shape(await client.infer(request(model, shape, n)))

        await record_async(results, "kserve_grpc_infer_one", infer(1))
        await record_async(results, "kserve_grpc_infer_two", infer(2))

        async def unknown():
            try:
                await client.infer(request("no-such-model", shape, 1))
            except grpc.RpcError as e:
                return {"code": e.code().name}
            raise AssertionError("an unknown model was served")

        await record_async(results, "kserve_grpc_unknown_model", unknown())
    finally:
        await client.close()


def v2_json(model, shape):
    n = int(np.prod(shape))
    return {"inputs": [{"name": "input", "shape": [1] + shape, "datatype": "FP32", "data": [0.5] * n}]}


def http_clients(results, base, model, shape, ca):
    def with_httpx():
        with httpx.Client(verify=ca, http2=False, timeout=30) as c:
            ready = c.get(f"{base}/v2/health/ready")
            answer = c.post(f"{base}/v2/models/{model}/infer", json=v2_json(model, shape))
            answer.raise_for_status()
            return {"http_version": answer.http_version, "ready": ready.json(), "shape": answer.json()["outputs"][0]["shape"]}

    def with_requests():
        ready = requests.get(f"{base}/v2/health/ready", verify=ca, timeout=30)
        answer = requests.post(f"{base}/v2/models/{model}/infer", json=v2_json(model, shape), verify=ca, timeout=30)
        answer.raise_for_status()
        return {"ready": ready.json(), "shape": answer.json()["outputs"][0]["shape"]}

    record(results, "httpx", with_httpx)
    record(results, "requests", with_requests)


def grpc_standard(results, url, model, ca):
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(url, creds) as channel:

        def health():
            stub = health_pb2_grpc.HealthStub(channel)
            statuses = {}
            for service in ["", model]:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                statuses[service or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            try:
                stub.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=10)
                statuses["no-such-service"] = "answered"
            except grpc.RpcError as e:
                statuses["no-such-service"] = e.code().name
            return {"statuses": statuses}

        def reflection():
            # grpcio-reflection's own client (v1alpha): every listed service described, with
            # the files it imports, into a protobuf descriptor pool.
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            services = database.get_services()
            methods = {s: sorted(m.name for m in pool.FindServiceByName(s).methods) for s in services}
            # An unknown symbol is an error response on the stream, which stays open.
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            asked = [
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
                reflection_pb2.ServerReflectionRequest(list_services=""),
            ]
            answers = list(stub.ServerReflectionInfo(iter(asked), timeout=10))
            unknown = answers[0].error_response
            return {
                "services": sorted(services),
                "methods": methods,
                "unknown_symbol": grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == unknown.error_code)).name,
                "answers": len(answers),
            }

        record(results, "grpc_health", health)
        record(results, "grpc_reflection", reflection)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the agent's inference port, host:port")
    p.add_argument("--model", required=True, help="the task to call")
    p.add_argument("--shape", required=True, help="one sample's shape, e.g. 3,32,32")
    p.add_argument("--ca", required=True, help="the cluster CA's certificate (PEM)")
    a = p.parse_args()
    shape = [int(d) for d in a.shape.split(",")]
    base = f"https://{a.url}"
    results = {}
    asyncio.run(kserve_rest(results, base, a.model, shape, a.ca, http2=False))
    asyncio.run(kserve_rest(results, base, a.model, shape, a.ca, http2=True))
    asyncio.run(kserve_grpc(results, a.url, a.model, shape, a.ca))
    http_clients(results, base, a.model, shape, a.ca)
    grpc_standard(results, a.url, a.model, a.ca)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
