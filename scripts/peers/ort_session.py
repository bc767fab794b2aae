"""The ONNX Runtime session every peer runs a variant in, set as Tidal's workers set theirs
(agent/src/worker_process.rs): `threads` intra-op threads, one inter-op thread, no spinning."""

import onnxruntime as ort


def open_session(model, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
