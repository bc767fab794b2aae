#!/usr/bin/env python3
"""Triton Inference Server (through nvidia-pytriton) serving one ONNX variant: ONNX Runtime runs
inside the bound Python function, Triton's dynamic batcher in front. A peer Tidal is measured
against (scripts/peers.sh); it speaks KServe V2 over gRPC, as Tidal's agents do, with the same
model name, tensor names and shapes."""

import argparse

import numpy as np
from ort_session import open_session
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="the ONNX file")
    p.add_argument("--name", default="classify", help="the model name clients call")
    p.add_argument("--shape", default="3,64,64", help="one sample's input shape")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the dynamic batcher forms (1: none)")
    p.add_argument("--delay-us", type=int, default=2000, help="how long the batcher waits to fill a batch")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    a = p.parse_args()

    session = open_session(a.model, a.threads)
    input_name = session.get_inputs()[0].name

    @batch
    def infer(input):
        return {"output": session.run(None, {input_name: input})[0]}

    shape = tuple(int(d) for d in a.shape.split(","))
    config = TritonConfig(
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        grpc_port=a.grpc_port,
        http_port=a.http_port,
        metrics_port=a.metrics_port,
        allow_gpu_metrics=False,
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=a.delay_us if a.max_batch > 1 else 0)
    # Statistics open to clients, as Tidal's are: perf_analyzer reads them.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=a.name,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=shape)],
            outputs=[Tensor(name="output", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=a.max_batch, batcher=batcher, batching=True),
        )
        triton.serve()


if __name__ == "__main__":
    main()
