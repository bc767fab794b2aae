//! The worker process: one ONNX Runtime session, running the batches the agent sends.
//!
//! It is the agent's own binary started as `tidal-agent worker`, placed in its own cgroup by
//! the agent. It does one thing at a time — read a batch from stdin, run it, write the result
//! to stdout — so its CPU use is exactly what the cgroup quota allows, and it exits when the
//! agent closes its stdin (or dies).

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType};

use crate::worker_protocol::{read_frame, write_frame, Batch, BatchResult, FrameTensor, Ready};

/// Loads ONNX Runtime from `ort_lib`: the process's one environment, which every session of
/// the worker shares.
pub fn open_env(ort_lib: &Path) -> anyhow::Result<Environment> {
    ort::init_from(ort_lib)
        .with_context(|| format!("loading ONNX Runtime from {}", ort_lib.display()))?
        .with_name("tidal-worker")
        .build()
        .context("creating the ONNX Runtime environment")
}

/// Opens a session for `model` with `threads` intra-op threads (spinning off, so that idle
/// threads do not burn the worker's quota).
pub fn open_session(env: &Environment, model: &Path, threads: usize) -> anyhow::Result<Session> {
    let session = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(threads.max(1))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_op_spinning(false)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(model)
        .with_context(|| format!("loading the model {}", model.display()))?;
    Ok(session)
}

/// The session a worker runs, and another being built beside it for a new thread count.
///
/// ONNX Runtime fixes a session's intra-op threads when it is built, so following the quota
/// means a new session: it is built on a thread of its own while the running one serves (in
/// the same cgroup, so its CPU comes out of the worker's quota), and swapped in between two
/// batches, when it is ready and still the count wanted. Memory holds two sessions meanwhile,
/// and a build holds more than the session it makes (the model's file parsed, the graph before
/// and after optimisation): when what the process holds and what its first build took would
/// pass the worker's memory limit, the running session is dropped first and the new one built
/// in its place, the batches waiting meanwhile, rather than have the kernel kill the worker
/// with its queue (seen live: a ResNet101 worker resized from one core to two).
struct Sessions {
    env: Environment,
    model: PathBuf,
    /// Always a session, but while one is built in its place.
    running: Option<Session>,
    threads: usize,
    wanted: usize,
    building: Option<(usize, std::thread::JoinHandle<anyhow::Result<Session>>)>,
    /// A count whose build failed: not tried again (the running session serves on).
    failed: Option<usize>,
    /// What building the first session added to the process's resident peak, bytes: what a
    /// build beside the running session needs under the limit.
    build_bytes: u64,
    /// The worker's memory limit as the agent last said, bytes (0: none).
    memory_limit: u64,
}

impl Sessions {
    fn open(env: Environment, model: &Path, threads: usize) -> anyhow::Result<Self> {
        let before = own_memory().map_or(0, |m| m.resident);
        let running = open_session(&env, model, threads)?;
        let build_bytes = own_memory().map_or(0, |m| m.peak.saturating_sub(before));
        Ok(Self {
            env,
            model: model.to_path_buf(),
            running: Some(running),
            threads,
            wanted: threads,
            building: None,
            failed: None,
            build_bytes,
            memory_limit: 0,
        })
    }

    fn running(&mut self) -> anyhow::Result<&mut Session> {
        self.running.as_mut().context("no session: its rebuild failed")
    }

    /// Takes `threads` (0: no change) as the count wanted, under a limit of `memory_limit`
    /// bytes (0: none): swaps in a finished build of it, and starts one when none is under way,
    /// beside the running session or, when the limit has no room for that, in its place.
    /// Whether it rebuilt in place (the caller waited for it); fails only when a session built
    /// in place could not be built at either count.
    fn want(&mut self, threads: usize, memory_limit: u64) -> anyhow::Result<bool> {
        self.memory_limit = memory_limit;
        if threads > 0 {
            self.wanted = threads;
        }
        if self.building.as_ref().is_some_and(|(_, b)| b.is_finished()) {
            let (built, handle) = self.building.take().expect("checked above");
            match handle.join() {
                Ok(Ok(session)) if built == self.wanted => {
                    self.running = Some(session);
                    self.threads = built;
                    give_back_freed_memory();
                }
                Ok(Ok(_)) => give_back_freed_memory(),
                Ok(Err(e)) => {
                    eprintln!(
                        "tidal worker: a session of {built} threads failed to build ({e:#}); serving on with {}",
                        self.threads
                    );
                    self.failed = Some(built);
                }
                Err(_) => self.failed = Some(built),
            }
        }
        if self.building.is_some() || self.wanted == self.threads || self.failed == Some(self.wanted) {
            return Ok(false);
        }
        let held = own_memory().map(|m| m.resident);
        if !fits_beside(held, self.build_bytes, self.memory_limit) {
            self.build_in_place()?;
            return Ok(true);
        }
        let (env, model, threads) = (self.env.clone(), self.model.clone(), self.wanted);
        let build = std::thread::Builder::new()
            .name(format!("session-{threads}"))
            .spawn(move || open_session(&env, &model, threads));
        match build {
            Ok(handle) => self.building = Some((threads, handle)),
            Err(e) => eprintln!("tidal worker: cannot start a thread to build a session: {e}"),
        }
        Ok(false)
    }

    /// Drops the running session and builds one of the wanted count in its place; when that
    /// fails, one of the count it ran.
    fn build_in_place(&mut self) -> anyhow::Result<()> {
        let (from, to) = (self.threads, self.wanted);
        eprintln!(
            "tidal worker: no room under the memory limit ({} MiB) for a session of {to} threads beside the one \
             running: rebuilding in place, batches wait",
            self.memory_limit >> 20
        );
        self.running = None;
        give_back_freed_memory();
        match open_session(&self.env, &self.model, to) {
            Ok(session) => {
                self.running = Some(session);
                self.threads = to;
                Ok(())
            }
            Err(e) => {
                eprintln!("tidal worker: a session of {to} threads failed to build ({e:#}); back to {from}");
                self.failed = Some(to);
                self.running = Some(open_session(&self.env, &self.model, from)?);
                Ok(())
            }
        }
    }

    /// Waits for a build under way (the process is ending).
    fn finish(self) {
        if let Some((_, handle)) = self.building {
            let _ = handle.join();
        }
    }
}

/// Whether a build that takes `build_bytes` fits beside what the process holds (`held`, bytes;
/// `None`: unknown) under `limit` (0: none). Unknown holdings build beside, as before limits.
fn fits_beside(held: Option<u64>, build_bytes: u64, limit: u64) -> bool {
    limit == 0 || held.is_none_or(|held| held.saturating_add(build_bytes) <= limit)
}

/// A process's memory as its `/proc/PID/status` says (bytes).
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    /// Resident now (`VmRSS`).
    pub resident: u64,
    /// Resident at its peak (`VmHWM`).
    pub peak: u64,
}

/// The memory of process `pid` ("self": this one); `None` when it cannot be read.
pub fn process_memory(pid: &str) -> Option<ProcessMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        let kib = status.lines().find_map(|l| l.strip_prefix(name))?;
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k.saturating_mul(1024))
    };
    Some(ProcessMemory { resident: field("VmRSS:")?, peak: field("VmHWM:")? })
}

fn own_memory() -> Option<ProcessMemory> {
    process_memory("self")
}

/// Returns the heap's free memory to the system after a session is dropped. glibc keeps freed
/// chunks for reuse, and once a large block was freed it serves blocks of that size from the
/// heap rather than by mapping them, so the memory of a dropped session would stay resident
/// (and count against the limit) until the heap happened to reuse it.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks; it takes no pointer.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// ONNX Runtime's element type for a frame's datatype (BYTES is not served).
fn ort_type(datatype: &str) -> anyhow::Result<TensorElementType> {
    use tidal_common::onnx_signature::ElementType as E;
    let element = E::from_v2_name(datatype).ok_or_else(|| anyhow::anyhow!("unknown datatype {datatype:?}"))?;
    Ok(match element {
        E::Fp32 => TensorElementType::Float32,
        E::Fp16 => TensorElementType::Float16,
        E::Bf16 => TensorElementType::Bfloat16,
        E::Fp64 => TensorElementType::Float64,
        E::Int8 => TensorElementType::Int8,
        E::Int16 => TensorElementType::Int16,
        E::Int32 => TensorElementType::Int32,
        E::Int64 => TensorElementType::Int64,
        E::Uint8 => TensorElementType::Uint8,
        E::Uint16 => TensorElementType::Uint16,
        E::Uint32 => TensorElementType::Uint32,
        E::Uint64 => TensorElementType::Uint64,
        E::Bool => TensorElementType::Bool,
        E::Bytes => anyhow::bail!("BYTES tensors are not served yet"),
    })
}

/// The frame's datatype for ONNX Runtime's element type.
fn frame_type(t: TensorElementType) -> anyhow::Result<&'static str> {
    Ok(match t {
        TensorElementType::Float32 => "FP32",
        TensorElementType::Float16 => "FP16",
        TensorElementType::Bfloat16 => "BF16",
        TensorElementType::Float64 => "FP64",
        TensorElementType::Int8 => "INT8",
        TensorElementType::Int16 => "INT16",
        TensorElementType::Int32 => "INT32",
        TensorElementType::Int64 => "INT64",
        TensorElementType::Uint8 => "UINT8",
        TensorElementType::Uint16 => "UINT16",
        TensorElementType::Uint32 => "UINT32",
        TensorElementType::Uint64 => "UINT64",
        TensorElementType::Bool => "BOOL",
        other => anyhow::bail!("the model gives a {other:?} tensor, which is not served"),
    })
}

/// A frame's tensor as an ONNX Runtime value: one copy of its bytes.
fn to_value(t: &FrameTensor) -> anyhow::Result<DynValue> {
    let ty = ort_type(&t.datatype)?;
    let count = tidal_common::tensor::element_count(&t.shape)
        .ok_or_else(|| anyhow::anyhow!("input {:?}: bad shape {:?}", t.name, t.shape))?;
    let bytes = ty.byte_size(count).ok_or_else(|| anyhow::anyhow!("input {:?}: no fixed size", t.name))?;
    if bytes != t.data.len() {
        anyhow::bail!("input {:?}: {} bytes for shape {:?} of {}", t.name, t.data.len(), t.shape, t.datatype);
    }
    let mut tensor = DynTensor::new(&Allocator::default(), ty, t.shape.clone()).context("allocating an input")?;
    if bytes > 0 {
        // SAFETY: the tensor was just allocated on the CPU for `count` elements of `ty`, which
        // is `bytes` bytes, and `data` holds exactly `bytes` bytes; the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(t.data.as_ptr(), tensor.data_ptr_mut().cast::<u8>(), bytes) };
    }
    Ok(tensor.into_dyn())
}

/// An ONNX Runtime output as a frame's tensor: one copy of its bytes.
fn to_frame(name: &str, value: &DynValue) -> anyhow::Result<FrameTensor> {
    let tensor = value
        .view()
        .downcast::<DynTensorValueType>()
        .map_err(|_| anyhow::anyhow!("output {name:?} is not a tensor"))?;
    let ty = *tensor.data_type();
    let shape: Vec<i64> = tensor.shape().iter().copied().collect();
    let count = tidal_common::tensor::element_count(&shape)
        .ok_or_else(|| anyhow::anyhow!("output {name:?}: bad shape {shape:?}"))?;
    let bytes = ty.byte_size(count).ok_or_else(|| anyhow::anyhow!("output {name:?}: no fixed size"))?;
    let datatype = frame_type(ty)?;
    if !tensor.memory_info().is_cpu_accessible() {
        anyhow::bail!("output {name:?} is not in CPU memory");
    }
    let mut data = vec![0u8; bytes];
    if bytes > 0 {
        // SAFETY: a CPU tensor of `count` elements of `ty` holds `bytes` bytes at its data
        // pointer, alive while `value` is borrowed.
        unsafe { std::ptr::copy_nonoverlapping(tensor.data_ptr().cast::<u8>(), data.as_mut_ptr(), bytes) };
    }
    Ok(FrameTensor { name: name.to_string(), datatype: datatype.into(), shape, data })
}

/// Runs one batch through the session: the outputs it asks for (all by default), in the
/// model's order. An input without a name is the model's first.
pub fn run_batch(session: &mut Session, batch: &Batch) -> anyhow::Result<Vec<FrameTensor>> {
    let first = session.inputs().first().map(|i| i.name().to_string()).unwrap_or_default();
    let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(batch.inputs.len());
    for t in &batch.inputs {
        let name = if t.name.is_empty() { first.clone() } else { t.name.clone() };
        inputs.push((name, to_value(t)?));
    }
    let names: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
    if let Some(missing) = batch.outputs.iter().find(|w| !names.contains(w)) {
        anyhow::bail!("the model has no output {missing:?} (it gives {names:?})");
    }
    let outputs = session.run(inputs).context("running the model")?;
    names
        .iter()
        .filter(|n| batch.outputs.is_empty() || batch.outputs.contains(n))
        .map(|n| to_frame(n, outputs.get(n).ok_or_else(|| anyhow::anyhow!("no output {n:?}"))?))
        .collect()
}

/// The worker's main loop.
pub fn serve(ort_lib: &Path, model: &Path, threads: usize) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut sessions = match open_env(ort_lib).and_then(|env| Sessions::open(env, model, threads)) {
        Ok(s) => s,
        Err(e) => {
            write_frame(&mut out, &Ready { error: format!("{e:#}") })?;
            return Err(e);
        }
    };
    write_frame(&mut out, &Ready { error: String::new() })?;
    while let Some(batch) = read_frame::<Batch>(&mut input)? {
        let setting_up = Instant::now();
        sessions.want(batch.threads as usize, batch.memory_limit)?;
        let setup_us = setting_up.elapsed().as_micros() as u64;
        let started = Instant::now();
        let id = batch.id;
        let result = if batch.inputs.is_empty() {
            BatchResult { id, ..Default::default() }
        } else {
            match run_batch(sessions.running()?, &batch) {
                Ok(outputs) => BatchResult { id, outputs, ..Default::default() },
                Err(e) => BatchResult { id, error: format!("{e:#}"), ..Default::default() },
            }
        };
        let result = BatchResult {
            run_us: started.elapsed().as_micros() as u64,
            threads: sessions.threads as u32,
            setup_us,
            ..result
        };
        write_frame(&mut out, &result)?;
    }
    sessions.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The test process's ONNX Runtime environment: the library loads once a process.
    fn env() -> Environment {
        static ENV: std::sync::OnceLock<Environment> = std::sync::OnceLock::new();
        ENV.get_or_init(|| {
            let lib = std::env::var_os("TIDAL_ORT_LIB")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tidal/lib/libonnxruntime.so"));
            assert!(lib.is_file(), "ONNX Runtime library {} is missing: run `make setup`", lib.display());
            open_env(&lib).unwrap()
        })
        .clone()
    }

    /// A batch of one 64×64 image, as a ResNet at that resolution takes it.
    fn one_image() -> Batch {
        let image = FrameTensor {
            name: String::new(),
            datatype: "FP32".into(),
            shape: vec![1, 3, 64, 64],
            data: 0.5f32.to_le_bytes().repeat(3 * 64 * 64),
        };
        Batch { inputs: vec![image], ..Default::default() }
    }

    #[test]
    fn a_build_fits_beside_only_when_the_limit_holds_both() {
        let mib = 1 << 20;
        assert!(fits_beside(Some(300 * mib), 200 * mib, 0), "no limit");
        assert!(fits_beside(Some(300 * mib), 200 * mib, 500 * mib));
        assert!(!fits_beside(Some(300 * mib), 200 * mib, 499 * mib));
        assert!(fits_beside(None, 200 * mib, 100 * mib), "holdings unknown: beside, as without limits");
    }

    /// A new thread count is built beside the running session when the memory limit has room
    /// for both, and in the running one's place when it has not: then the call returns with
    /// the new session serving, and no second session was ever held.
    #[test]
    fn a_session_is_rebuilt_in_place_when_the_limit_has_no_room_for_two() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("resnet18.onnx");
        let generated = tidal_common::resnet::generate(tidal_common::resnet::ResNetDepth::R18, 64, 1);
        std::fs::write(&model, generated.onnx).unwrap();
        let mut sessions = Sessions::open(env(), &model, 1).unwrap();
        assert!(sessions.build_bytes > 40 << 20, "building ResNet18 takes its weights at least");
        // Limits that do not depend on what the test process holds (other tests run in it).
        let (room, no_room) = (1 << 61, 1);

        // Room for both: built beside, the running session serves meanwhile.
        assert!(!sessions.want(2, room).unwrap());
        assert!(sessions.building.is_some(), "built beside");
        assert_eq!(sessions.threads, 1, "the running session serves until the build is ready");
        while !sessions.building.as_ref().unwrap().1.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        sessions.want(0, room).unwrap();
        assert_eq!((sessions.threads, sessions.building.is_none()), (2, true), "swapped in");

        // No room for a second build: in place, done when the call returns.
        assert!(sessions.want(1, no_room).unwrap(), "rebuilt in place");
        assert!(sessions.building.is_none(), "nothing built beside");
        assert_eq!(sessions.threads, 1);
        let batch = one_image();
        let outputs = run_batch(sessions.running().unwrap(), &batch).unwrap();
        assert_eq!(outputs[0].shape, vec![1, 1000], "the session built in place serves");
    }

    /// A worker that says it is ready answers its first request as fast as the ones after it:
    /// with ONNX Runtime 1.31.1 a session's first run is not a slow one (its kernels are
    /// prepared when the session is built), so a worker needs no warm-up run before it serves,
    /// and a standby that never served takes a burst at its profiled speed. Measured here (one
    /// intra-op thread), ResNet50 at 64×64: first run 12.6 ms against 10.5–12.3 ms for the next
    /// five; at 224×224, 75.2 ms against 74.6–74.9 ms. This holds the library to it: a version
    /// that ran its first batch slowly would call for a warm-up at load.
    #[test]
    fn a_session_s_first_run_is_as_fast_as_the_ones_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("resnet50.onnx");
        let generated = tidal_common::resnet::generate(tidal_common::resnet::ResNetDepth::R50, 64, 1);
        std::fs::write(&model, generated.onnx).unwrap();
        let mut session = open_session(&env(), &model, 1).unwrap();
        let batch = one_image();
        let mut runs: Vec<Duration> = (0..6)
            .map(|_| {
                let started = Instant::now();
                run_batch(&mut session, &batch).unwrap();
                started.elapsed()
            })
            .collect();
        let first = runs.remove(0);
        runs.sort_unstable();
        let median = runs[runs.len() / 2];
        assert!(first < 2 * median, "the first run took {first:?}, the next ones {runs:?}: a cold first run");
    }
}
