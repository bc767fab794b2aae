#!/usr/bin/env python3
"""Ray Serve serving one ONNX variant: replicas running ONNX Runtime sessions, `@serve.batch`
forming batches, Serve's autoscaling adding and removing replicas. A peer Tidal is measured
against (scripts/peers.sh). It speaks KServe V2 over gRPC through Ray Serve's gRPC proxy, with
the servicer generated from Tidal's proto/proto/kserve_v2.proto, the same model name, tensor
names and shapes as Tidal's agents; ModelConfig and ModelStatistics answer as perf_analyzer
needs."""

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time


def generate_stubs(proto: pathlib.Path) -> str:
    """Python modules for the V2 protocol, generated into a temporary directory."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tidal-v2-")
    status = protoc.main(["protoc", f"-I{proto.parent}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)])
    if status != 0:
        sys.exit(f"ray_peer: generating the V2 stubs from {proto} failed")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="the ONNX file")
    p.add_argument("--name", default="classify", help="the model name clients call")
    p.add_argument("--shape", default="3,64,64", help="one sample's input shape")
    p.add_argument("--cores", type=int, default=2, help="CPUs given to Ray, one per replica at most")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    p.add_argument("--max-batch", type=int, default=8, help="@serve.batch's largest batch (1: none)")
    p.add_argument("--wait-ms", type=float, default=2.0, help="how long @serve.batch waits to fill a batch")
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=8800)
    a = p.parse_args()

    here = pathlib.Path(__file__).resolve().parent
    root = here.parents[1]
    stubs = generate_stubs(root / "proto" / "proto" / "kserve_v2.proto")
    sys.path.insert(0, stubs)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    ray.init(
        num_cpus=a.cores,
        include_dashboard=False,
        object_store_memory=512 << 20,
        # Replicas import the V2 stubs and this directory's ort_session.
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([stubs, str(here)]), "OMP_NUM_THREADS": str(a.threads)}
        },
    )
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=a.http_port),
        grpc_options=gRPCOptions(
            port=a.grpc_port,
            grpc_servicer_functions=["kserve_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"],
        ),
    )
    shape = [int(d) for d in a.shape.split(",")]
    app = deployment(a.cores).bind(a.model, a.name, shape, a.threads, a.max_batch, a.wait_ms / 1000)
    serve.run(app, name=a.name)
    print(f"ray_peer: serving {a.name} on 127.0.0.1:{a.grpc_port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def deployment(cores):
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=64,
        autoscaling_config={"min_replicas": 1, "max_replicas": cores, "target_ongoing_requests": 4},
    )
    class Classifier:
        def __init__(self, model, name, shape, threads, max_batch, wait_s):
            import numpy as np
            from ort_session import open_session

            import kserve_v2_pb2 as pb

            self.session = open_session(model, threads)
            self.input = self.session.get_inputs()[0].name
            self.np, self.pb = np, pb
            self.name, self.shape, self.max_batch = name, shape, max_batch
            self.run.set_max_batch_size(max_batch)
            self.run.set_batch_wait_timeout_s(wait_s)
            self.count, self.ns = 0, 0

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
        async def run(self, samples):
            out = self.session.run(None, {self.input: self.np.stack(samples)})[0]
            return list(out)

        async def ModelInfer(self, request):
            started = time.perf_counter_ns()
            x = self.np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(list(request.inputs[0].shape))
            y = self.np.stack(await asyncio.gather(*(self.run(s) for s in x)))
            response = self.pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
            out = response.outputs.add(name="output", datatype="FP32")
            out.shape.extend(y.shape)
            response.raw_output_contents.append(y.astype("<f4").tobytes())
            self.count += len(x)
            self.ns += time.perf_counter_ns() - started
            return response

        def ModelMetadata(self, request):
            tensor = self.pb.ModelMetadataResponse.TensorMetadata
            return self.pb.ModelMetadataResponse(
                name=self.name,
                versions=["1"],
                platform="ray_serve",
                inputs=[tensor(name="input", datatype="FP32", shape=[-1] + self.shape)],
                outputs=[tensor(name="output", datatype="FP32", shape=[-1, -1])],
            )

        def ModelConfig(self, request):
            pb = self.pb
            config = pb.ModelConfig(
                name=self.name,
                platform="ray_serve",
                max_batch_size=64,
                input=[pb.ModelInput(name="input", data_type=pb.TYPE_FP32, dims=self.shape)],
                output=[pb.ModelOutput(name="output", data_type=pb.TYPE_FP32, dims=[-1])],
            )
            return pb.ModelConfigResponse(config=config)

        def ModelStatistics(self, request):
            # This replica's own counts (a client sees whichever replica answers).
            pb = self.pb
            success = pb.StatisticDuration(count=self.count, ns=self.ns)
            zero = pb.StatisticDuration(count=self.count, ns=0)
            stats = pb.InferStatistics(
                success=success, queue=zero, compute_input=zero, compute_infer=success, compute_output=zero
            )
            return pb.ModelStatisticsResponse(
                model_stats=[
                    pb.ModelStatistics(
                        name=self.name,
                        version="1",
                        inference_count=self.count,
                        execution_count=self.count,
                        inference_stats=stats,
                    )
                ]
            )

        def ServerMetadata(self, request):
            import ray

            return self.pb.ServerMetadataResponse(name="ray_serve", version=ray.__version__, extensions=[])

        def ServerLive(self, request):
            return self.pb.ServerLiveResponse(live=True)

        def ServerReady(self, request):
            return self.pb.ServerReadyResponse(ready=True)

        def ModelReady(self, request):
            return self.pb.ModelReadyResponse(ready=True)

    return Classifier


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
