//! `tidalctl`: Tidal's admin CLI.

mod connect;
mod forecast;
mod import;
mod load;
mod models;
mod nodes;
mod output;
mod plot;
mod profile;
mod replicas;
mod samples;
mod simulate;
mod simulate_tasks;
mod status;

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{
    ClusterStatusRequest, DeleteTaskRequest, RegisterTaskRequest, RegisterTaskResponse, RollbackTaskRequest, Rollout,
    SetShareRequest, SetSloRequest, StartRolloutRequest, TaskSpec,
};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "tidalctl", version, about = "Administer a Tidal cluster: models, tasks, profiles, load and status")]
struct Cli {
    /// Controller replica addresses (host:port, comma-separated): any of them leads tidalctl
    /// to the current leader.
    #[arg(long, global = true, env = "TIDAL_CONTROLLER", default_value = "127.0.0.1:7000")]
    controller: String,
    #[command(flatten)]
    tls: tidal_auth::TlsArgs,
    /// How read commands (status, history, controller list) print: aligned columns, or the
    /// API's messages as JSON or YAML.
    #[arg(short = 'o', long, global = true, env = "TIDAL_OUTPUT", value_enum, default_value = "table")]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Model variants on disk.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Tasks served by the cluster.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Measure each variant of a task on an agent (latency and throughput over a grid of cores
    /// and batch sizes, under the real cgroup quota, repeated) and store the profiles in the
    /// controller. Run it while the node serves nothing: serving or load generation on the same
    /// cores would be measured too.
    ///
    /// Example: tidalctl profile --agent 10.0.0.20:7101 --task resnet --cores 1,2 --batches 1,4,8 --save profiles.json
    Profile {
        /// The agent to measure on: its control port (host:port).
        #[arg(long, default_value = "127.0.0.1:7101")]
        agent: String,
        /// The task whose variants to measure.
        #[arg(long)]
        task: String,
        /// Core counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        cores: Vec<u32>,
        /// Batch sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        batches: Vec<u32>,
        /// Milliseconds of measurement per point and run.
        #[arg(long, default_value_t = 2000)]
        duration_ms: u32,
        /// Runs per variant: p50 and throughput are their medians, p99 the worst run's.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Also write the profiles to this JSON file (for `--from` and `tidalctl simulate --profiles`).
        #[arg(long)]
        save: Option<PathBuf>,
        /// Store the profiles saved in this file instead of measuring.
        #[arg(long, conflicts_with_all = ["save", "samples"])]
        from: Option<PathBuf>,
        /// Measure with real requests of the task's first stage, at every input size among
        /// them (pixels, tokens, audio samples): a directory of V2 request bodies (NAME.json),
        /// NumPy arrays of a one-input model (NAME.npy) or directories of INPUT.npy files, one
        /// sample each. The planner then plans for the sizes requests come in.
        #[arg(long)]
        samples: Option<PathBuf>,
        /// Show the task's stored profiles instead of measuring: each measured point, and
        /// beside it the point as the planner now uses it when the batches the variant served
        /// ran off its profile (the controller's correction, from the agents' measurements).
        #[arg(long, conflicts_with_all = ["save", "from", "samples"])]
        show: bool,
    },
    /// Show the cluster: nodes, workers, plan, live rates and latencies.
    ///
    /// Example: tidalctl status --watch 2   (or: tidalctl -o json status | jq .nodes)
    Status {
        /// Refresh every this many seconds until interrupted.
        #[arg(long)]
        watch: Option<f64>,
    },
    /// Show the plans committed so far, newest last.
    ///
    /// Example: tidalctl history --limit 5
    History {
        /// How many of the latest plans to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// The controller's replicas: list, add, remove, transfer leadership.
    #[command(subcommand)]
    Controller(replicas::ControllerCmd),
    /// Nodes: drain one (the next plans give it no workers) and remove it once drained.
    #[command(subcommand)]
    Node(nodes::NodeCmd),
    /// The cluster's certificate authority: make it, and issue certificates for identities.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Score the forecasters on a rate trace (MAPE of the next interval's peak, share under-predicted).
    ///
    /// Example: tidalctl forecast --trace data/twitter-trace-rps.txt.gz --interval-s 30
    Forecast(forecast::ForecastOpts),
    /// Replay a rate trace open-loop against agents (Tidal's API, or KServe V2 so that other
    /// servers can be measured alike) and summarise latency, SLO violations and accuracy.
    ///
    /// Example: tidalctl load --agent 10.0.0.20:7100,10.0.0.21:7100 --task resnet --trace data/twitter-trace-rps.txt.gz --scale 0.5 --speedup 10
    Load(load::LoadOpts),
    /// Replay a rate trace in the discrete-event simulator against one or more policies (the
    /// real forecaster and solver decide each interval) and compare them: table, CSV, SVG plot.
    ///
    /// Example: tidalctl simulate --trace data/twitter-trace-rps.txt.gz --profiles profiles.json --cores 2 --slo-ms 250 --policy tidal,infadapter
    Simulate(Box<simulate::SimulateOpts>),
    /// Print a shell completion script.
    ///
    /// Example: tidalctl completion bash > /etc/bash_completion.d/tidalctl
    Completion {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Generate ONNX models of the real architectures with weights from a seed (ResNets and
    /// YOLOv5s; the Transformer encoders, wav2vec2s and encoder–decoders (DistilBART, Marian,
    /// Speech2Text, decoding greedily in their graphs) of IPA's text and speech stages; a 2×2
    /// downsampling stage for pipelines) and their variant configs.
    ///
    /// Example: tidalctl models generate --out models --resolution 64 --variants resnet18,resnet50
    ///
    /// Example: tidalctl models generate --out models --variants distilbert-sst2,wav2vec2-base --tokens 32
    ///
    /// Example: tidalctl models generate --out models --variants distilbart-xsum-1-1,s2t-small --audio-ms 2000
    Generate {
        /// Directory to write the ONNX files and variant TOMLs into.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// Input resolution in pixels (224 is ImageNet's; smaller runs faster on small machines).
        #[arg(long, default_value_t = 64)]
        resolution: u32,
        /// Text models' length to profile at, tokens (they take any length up to 512).
        #[arg(long, default_value_t = 64)]
        tokens: u32,
        /// Speech models' recording length to profile at, milliseconds of 16 kHz audio (they
        /// take any length).
        #[arg(long, default_value_t = 2000)]
        audio_ms: u32,
        /// Variants to make, comma-separated: resnet18, resnet34, resnet50, resnet101, resnet152
        /// (classifiers, top-1), yolov5n, yolov5s, yolov5m, yolov5l, yolov5x (detectors, mAP;
        /// --resolution a multiple of 32), downsample (output at half of --resolution);
        /// distilbert-sst2, distilbert-sentiment, bert-sentiment, roberta-sentiment (sentiment,
        /// accuracy), roberta-squad2, xlm-roberta-squad2 (question answering, F1),
        /// xlm-roberta-langid (language identification, accuracy); wav2vec2-base,
        /// wav2vec2-large (speech to text, 100 − WER).
        #[arg(long, value_delimiter = ',', default_value = "resnet18,resnet34,resnet50,resnet101,resnet152")]
        variants: Vec<String>,
        /// A word list (one word per line) the text models' WordPiece tokenizers take their
        /// vocabulary from, shortest words first (Debian's wamerican installs one); without
        /// it they spell every word in characters.
        #[arg(long, default_value = "/usr/share/dict/words")]
        words: PathBuf,
        /// Seed of the generated weights (the same seed gives the same files).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Regenerate even if an identical variant is already there.
        #[arg(long)]
        force: bool,
    },
    /// Print what ONNX files take and give: every input and output with its name, element type
    /// (V2's names: FP32, INT64, …) and shape, `?` marking a dynamic dimension (with its name
    /// when the file gives one), and whether the model takes batches.
    ///
    /// Example: tidalctl models signature models/resnet18.onnx
    Signature {
        /// ONNX files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make the cluster's CA: <dir>/ca.pem (give it to every process as --tls-ca) and
    /// <dir>/ca.key (keep it offline: whoever has it can issue any identity).
    ///
    /// Example: tidalctl certs init --dir .tidal/certs/ca --cluster lab
    Init {
        /// Directory for ca.pem and ca.key (created; an existing CA is never overwritten).
        #[arg(long, default_value = "tidal-ca")]
        dir: PathBuf,
        /// A name for the cluster, in the CA's subject.
        #[arg(long, default_value = "tidal")]
        cluster: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a key and certificate for one identity, signed by the CA: <out>/<kind>-<name>.pem
    /// and .key, to give as --tls-cert and --tls-key.
    ///
    /// Example: tidalctl certs issue --ca-dir .tidal/certs/ca --out .tidal/certs --role agent/node-a --host 10.0.0.20
    Issue {
        /// The CA's directory (from `certs init`).
        #[arg(long, default_value = "tidal-ca")]
        ca_dir: PathBuf,
        /// The identity: controller/ID (a replica), agent/NODE (a node agent), admin/NAME (may
        /// change anything) or reader/NAME (may read status).
        #[arg(long)]
        role: tidal_auth::Role,
        /// Host names and IP addresses the identity serves at (its certificate must name the
        /// address others dial), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        host: Vec<String>,
        /// Directory to write <kind>-<name>.pem and .key into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a certificate across the cluster (admin): from the next call, every controller
    /// refuses it, and every agent once its next telemetry answer brings the list (a second).
    /// Removing a node or a replica revokes the certificate it was seen with already.
    ///
    /// Example: tidalctl certs revoke --cert stolen/agent-n2.pem --reason "laptop lost"
    Revoke {
        /// The certificate file (PEM) to revoke.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        cert: Option<PathBuf>,
        /// Or its serial number, in hex (`openssl x509 -noout -serial`; colons allowed).
        #[arg(long)]
        serial: Option<String>,
        /// Whose it is, for the record (taken from --cert when given).
        #[arg(long, default_value = "")]
        identity: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revoked certificates.
    ///
    /// Example: tidalctl certs revoked
    Revoked,
}

fn render_revoked(list: &tidal_proto::v1::RevokedCertificates) -> String {
    let rows = list.certificates.iter().map(|c| vec![c.serial.clone(), c.identity.clone(), c.reason.clone()]).collect();
    output::table(&["SERIAL", "IDENTITY", "REASON"], rows)
}

/// A task's share of a shared cluster (see `TaskShare`).
#[derive(clap::Args, Clone, Copy, Debug)]
struct ShareArgs {
    /// Its weight, 0–1000 (default 1): while the cores suffice, the planner maximises the sum
    /// over tasks of weight × objective; under shortage, cores are shared by weight (see the
    /// controller's --share). 0 is best effort: only cores no weighted task needs.
    #[arg(long)]
    weight: Option<f64>,
    /// Cores guaranteed to the task while its load asks for them.
    #[arg(long)]
    min_cores: Option<u32>,
    /// The most cores the task may have (0: no cap).
    #[arg(long)]
    max_cores: Option<u32>,
    /// The fewest workers it keeps: 1 (the default) keeps one ready however idle it is; 0
    /// unloads it once no request came for --idle-s (its memory and cores go to the others),
    /// and its next request waits while a worker loads (the agent's --cold-start-wait-s).
    /// Under memory pressure such tasks are unloaded first, least recently used first.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1))]
    min_workers: Option<u32>,
    /// With --min-workers 0: seconds without a request before it is unloaded (default 300).
    #[arg(long)]
    idle_s: Option<u32>,
}

impl ShareArgs {
    fn request(self, task: &str) -> SetShareRequest {
        SetShareRequest {
            task: task.into(),
            weight: self.weight,
            min_cores: self.min_cores,
            max_cores: self.max_cores,
            min_workers: self.min_workers,
            idle_s: self.idle_s,
        }
    }
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Register a task from variant configs in a model directory: a single-model task from
    /// --name, --slo-ms and --variants, or a pipeline from --file. Registering a task again
    /// with other models makes its next version (the previous one serves until the new one's
    /// workers are ready; `task rollback` goes back); with the same models it changes the SLO
    /// and share in place.
    ///
    /// Example: tidalctl task register --name resnet --slo-ms 250 --model-dir models --variants resnet18,resnet50,resnet152
    Register {
        /// The task's name (with --variants).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        name: Option<String>,
        /// The p99 latency SLO in ms (with --variants).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        slo_ms: Option<u32>,
        /// Directory holding the variants' TOML configs and ONNX files.
        #[arg(long, default_value = "models")]
        model_dir: PathBuf,
        /// Variants of a single-model task (names of <model-dir>/<name>.toml), comma-separated.
        #[arg(long, value_delimiter = ',', required_unless_present = "file", conflicts_with = "file")]
        variants: Vec<String>,
        /// A task file (TOML): `name`, `slo_ms` and `[[stages]]`, each with a `name` and its
        /// `variants` (names in --model-dir), run in order; see deploy/video-pipeline.toml.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        share: ShareArgs,
        /// Keep it as the task's next version without serving it, for `task rollout`.
        #[arg(long)]
        staged: bool,
    },
    /// Register the ONNX models of a Triton model repository as tasks, one per model, served
    /// from the repository as it lies: start the agents with --model-dir <repository>.
    ///
    /// Each model's config.pbtxt (inputs, outputs, max_batch_size, version policy) is checked
    /// against its ONNX file; what Tidal does otherwise than Triton is printed as a note, and
    /// a model Tidal cannot serve is refused with the reason (the others are still registered).
    ///
    /// Example: tidalctl task import --triton-repository /srv/models --slo-ms 200 --sample-shape yolo=3,640,640
    Import {
        /// The repository: a directory per model, each with its config.pbtxt and numbered
        /// version directories holding model.onnx.
        #[arg(long)]
        triton_repository: PathBuf,
        /// The p99 latency SLO of every imported task, in ms.
        #[arg(long)]
        slo_ms: u32,
        /// Only these models (directory names), comma-separated; default: all of them.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// For a model whose first input has dynamic dimensions, the size to profile it at:
        /// MODEL=DIMS, one sample without the batch dimension (e.g. yolo=3,640,640). Repeatable.
        #[arg(long = "sample-shape", value_parser = import::parse_sample_shape)]
        sample_shapes: Vec<(String, Vec<i64>)>,
        /// Check and print what would be registered, and register nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change how a task shares the cluster's cores with the other tasks: its weight, its
    /// guaranteed minimum and its maximum (what is not given stays as it is).
    ///
    /// Example: tidalctl task set --task resnet --weight 2 --min-cores 1 --max-cores 8
    Set {
        /// The task's name.
        #[arg(long)]
        task: String,
        #[command(flatten)]
        share: ShareArgs,
    },
    /// Roll a kept version of a task out as a canary: it serves --canary percent of the
    /// requests that name no version (and all that name it) for --window-s seconds, then is
    /// promoted (served) if its error rate (failed or late requests) stayed within
    /// --max-error-increase of the version served and its p99 within --max-slowdown times;
    /// rolled back at once when it leaves either margin. A request the canary fails is
    /// answered by the version served. `task rollback` ends a rollout early.
    ///
    /// Example: tidalctl task register --staged --name resnet --slo-ms 250 --variants resnet50 &&
    /// tidalctl task rollout --task resnet --version 2 --canary 10 --window-s 300
    Rollout {
        /// The task's name.
        #[arg(long)]
        task: String,
        /// The kept version to roll out (`task register --staged` keeps one).
        #[arg(long)]
        version: u32,
        /// Its share of the requests that name no version, in percent (1–50).
        #[arg(long, default_value_t = 10)]
        canary: u32,
        /// How long it is compared before it is promoted, in seconds.
        #[arg(long, default_value_t = 300)]
        window_s: u32,
        /// How much higher its error rate may be, as a fraction (0.01: one point).
        #[arg(long, default_value_t = 0.01)]
        max_error_increase: f64,
        /// How many times the served version's p99 its p99 may be.
        #[arg(long, default_value_t = 1.5)]
        max_slowdown: f64,
    },
    /// Serve an earlier version of a task again: the one before the version it serves, or
    /// --version N (the controller keeps the last 8). Its SLO and share stay as they are; the
    /// profiles of its variants are kept with it, so it is planned at once.
    ///
    /// Example: tidalctl task rollback --task resnet
    Rollback {
        /// The task's name.
        #[arg(long)]
        task: String,
        /// The version to serve (default: the highest below the one served).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Delete a task: its profiles at once, its workers from the next plan (the agents drain
    /// them: requests already queued are answered). Afterwards the task is unknown (NOT_FOUND)
    /// and its name may be registered again, as a new task.
    ///
    /// Example: tidalctl task delete --task resnet
    Delete {
        /// The task's name.
        #[arg(long)]
        task: String,
    },
    /// Change a task's SLO at run time.
    ///
    /// Example: tidalctl task set-slo --task resnet --slo-ms 400
    SetSlo {
        /// The task's name.
        #[arg(long)]
        task: String,
        /// The new p99 latency objective, in milliseconds.
        #[arg(long)]
        slo_ms: u32,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tidal_daemon::logging::init_plain("warn");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", output::describe(&e));
            std::process::ExitCode::from(output::exit_code(&e) as u8)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    connect::configure(cli.tls.clone());
    let format = cli.output;
    match cli.command {
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tidalctl", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Certs(CertsCmd::Init { dir, cluster, days }) => {
            let cert = tidal_auth::certs::init(&dir, &cluster, days)?;
            println!("CA made: {} (and its key, {}; keep that one safe)", cert.display(), dir.join("ca.key").display());
            Ok(())
        }
        Command::Certs(CertsCmd::Issue { ca_dir, role, host, out, days }) => {
            let (cert, key) = tidal_auth::certs::issue(&ca_dir, &role, &host, &out, days)?;
            println!("issued {role}: --tls-cert {} --tls-key {}", cert.display(), key.display());
            Ok(())
        }
        Command::Certs(CertsCmd::Revoke { cert, serial, identity, reason }) => {
            let (serial, identity) = match (cert, serial) {
                (Some(path), _) => {
                    let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    let holder =
                        tidal_auth::Holder::of_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    (holder.serial, holder.role.to_string())
                }
                (None, Some(serial)) => (tidal_auth::normalise_serial(&serial).map_err(anyhow::Error::msg)?, identity),
                (None, None) => anyhow::bail!("give --cert or --serial"),
            };
            let certificate = tidal_proto::v1::RevokedCertificate { serial: serial.clone(), identity, reason };
            let req = tidal_proto::v1::RevokeCertificateRequest { certificate: Some(certificate) };
            let list = controller(&cli.controller).await?.revoke_certificate(req).await?.into_inner();
            eprintln!("revoked certificate {serial}; {} revoked in all", list.certificates.len());
            output::print(format, &list, render_revoked)
        }
        Command::Certs(CertsCmd::Revoked) => {
            let req = tidal_proto::v1::ListRevokedRequest {};
            let list = controller(&cli.controller).await?.list_revoked(req).await?.into_inner();
            output::print(format, &list, render_revoked)
        }
        Command::Node(cmd) => nodes::run(&cli.controller, cmd).await,
        Command::Models(ModelsCmd::Generate { out, resolution, tokens, audio_ms, variants, words, seed, force }) => {
            let size = tidal_common::zoo::SampleSize { resolution, tokens, audio_ms };
            models::generate_models(&out, &variants, size, &words, seed, force)
        }
        Command::Models(ModelsCmd::Signature { files }) => models::print_signatures(&files),
        Command::Task(TaskCmd::Register { name, slo_ms, model_dir, variants, file, share, staged }) => {
            let file = file.map(|path| tidal_common::task_file::TaskFile::load(&path)).transpose()?;
            let mut task = match &file {
                Some(file) => file.to_spec(&model_dir)?,
                None => {
                    let variants = variants
                        .iter()
                        .map(|v| VariantConfig::load(&model_dir, v).map(|c| c.spec()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let task = tidal_common::task::single_stage(
                        name.as_deref().unwrap_or_default(),
                        slo_ms.unwrap_or_default(),
                        variants,
                    );
                    tidal_common::task::validate_task(&task).map_err(|e| anyhow::anyhow!(e))?;
                    task
                }
            };
            models::read_signatures(&mut task, &model_dir)?;
            match &file {
                Some(file) => file.apply_io(&mut task)?,
                // Connections and signatures checked together, before the controller is asked.
                None => tidal_common::task::validate_task(&task).map_err(|e| anyhow::anyhow!(e))?,
            }
            models::check_tokenizers(&task, &model_dir)?;
            let changed = tidal_common::task::changed_share(task.share.as_ref(), &share.request(&task.name))
                .map_err(|e| anyhow::anyhow!(e))?;
            task.share = (changed != Default::default()).then_some(changed);
            let (name, slo, stages) = (task.name.clone(), task.slo_ms, task.stages.len());
            let registered = controller(&cli.controller)
                .await?
                .register_task(RegisterTaskRequest { task: Some(task), staged })
                .await?;
            let RegisterTaskResponse { version, new_version } = registered.into_inner();
            let what = match (version, new_version) {
                (v, true) if staged => format!("version {v} (staged, not served) of task"),
                (1, true) => "registered task".to_string(),
                (v, true) => format!("version {v} of task"),
                (v, false) => format!("the same models as version {v} of task"),
            };
            if stages > 1 {
                println!("{what} {name} (SLO {slo} ms, a pipeline of {stages} stages)");
            } else {
                println!("{what} {name} (SLO {slo} ms)");
            }
            if staged && new_version {
                println!("serve it with: tidalctl task rollout --task {name} --version {version} --canary 10");
            } else if version > 1 && new_version {
                println!("its workers start beside the previous version's, which serve until they are ready");
            }
            Ok(())
        }
        Command::Task(TaskCmd::Import { triton_repository, slo_ms, models, sample_shapes, dry_run }) => {
            let opts = import::Import {
                repository: &triton_repository,
                slo_ms,
                models: &models,
                sample_shapes: &sample_shapes,
                dry_run,
            };
            import::run(&cli.controller, opts).await
        }
        Command::Task(TaskCmd::Set { task, share }) => {
            let answer = controller(&cli.controller).await?.set_share(share.request(&task)).await?.into_inner();
            let share = answer.share.unwrap_or_default();
            let max = if share.max_cores > 0 { format!("{} cores", share.max_cores) } else { "no cap".into() };
            let unloads =
                match tidal_common::task::unloads_after_s(&TaskSpec { share: Some(share), ..Default::default() }) {
                    Some(after_s) => format!("unloaded after {after_s:.0} s without a request"),
                    None => "keeps one worker".into(),
                };
            println!(
                "task {task}: weight {}, minimum {} cores, maximum {max}, {unloads}",
                share.weight.unwrap_or(1.0),
                share.min_cores
            );
            Ok(())
        }
        Command::Task(TaskCmd::Rollout { task, version, canary, window_s, max_error_increase, max_slowdown }) => {
            let rollout = Rollout {
                task: task.clone(),
                version,
                canary_percent: canary,
                window_s,
                max_error_increase,
                max_slowdown,
            };
            controller(&cli.controller).await?.start_rollout(StartRolloutRequest { rollout: Some(rollout) }).await?;
            println!(
                "task {task}: version {version} serves {canary} % of the requests; promoted after {window_s} s within \
                 the margins, rolled back as soon as it leaves them (tidalctl status shows how it compares)"
            );
            Ok(())
        }
        Command::Task(TaskCmd::Rollback { task, version }) => {
            let request = RollbackTaskRequest { task: task.clone(), version: version.unwrap_or(0) };
            let back = controller(&cli.controller).await?.rollback_task(request).await?.into_inner();
            if back.version == back.from_version {
                println!("task {task}: its rollout is ended; version {} serves as before", back.version);
            } else {
                println!(
                    "task {task} serves version {} again (was version {}); its workers start beside the ones they \
                     replace",
                    back.version, back.from_version
                );
            }
            Ok(())
        }
        Command::Task(TaskCmd::Delete { task }) => {
            let request = DeleteTaskRequest { task: task.clone() };
            let deleted = controller(&cli.controller).await?.delete_task(request).await?.into_inner();
            match (deleted.workers, deleted.plan_epoch) {
                (0, _) => println!("task {task} deleted (it had no workers)"),
                (n, 0) => println!("task {task} deleted; the next plan frees its {n} workers"),
                (n, epoch) => println!(
                    "task {task} deleted; plan {epoch} frees its {n} workers (the agents drain them as they apply it)"
                ),
            }
            Ok(())
        }
        Command::Task(TaskCmd::SetSlo { task, slo_ms }) => {
            controller(&cli.controller).await?.set_slo(SetSloRequest { task: task.clone(), slo_ms }).await?;
            println!("task {task}: SLO set to {slo_ms} ms");
            Ok(())
        }
        Command::Profile { task, show: true, .. } => profile::show(&cli.controller, &task, format).await,
        Command::Profile { agent, task, cores, batches, duration_ms, repeat, save, from, samples, show: false } => {
            let spec = task_spec(&cli.controller, &task).await?;
            match from {
                Some(path) => profile::store_saved(&cli.controller, &spec, &path).await,
                None => {
                    let samples = samples.as_deref().map(samples::read_dir).transpose()?.unwrap_or_default();
                    let m = profile::Measure { agent: &agent, cores, batches, duration_ms, repeat, samples };
                    profile::measure(&cli.controller, &spec, m, save.as_deref()).await
                }
            }
        }
        Command::Controller(cmd) => replicas::run(&cli.controller, cmd, format).await,
        Command::Status { watch } => status::run(&cli.controller, watch, format).await,
        Command::History { limit } => status::history(&cli.controller, limit, format).await,
        Command::Forecast(opts) => forecast::run(opts),
        // Several tasks sharing the cores, or one task's replay.
        Command::Simulate(opts) => match opts.tasks.clone() {
            Some(path) => simulate_tasks::run(&path, &opts),
            None => simulate::run(*opts, &cli.controller).await,
        },
        Command::Load(opts) => {
            // Without --slo-ms and --input-shape, the task is Tidal's: its controller says
            // what it takes and reports the cores it gives it.
            let (slo_ms, input_shape, watcher) = match (opts.slo_ms, opts.input_shape.clone()) {
                (Some(slo_ms), Some(shape)) => (slo_ms, shape, None),
                _ => {
                    let spec = task_spec(&cli.controller, &opts.task).await?;
                    let shape = tidal_common::task::input_shape(&spec).to_vec();
                    // A random sample fits a task of one FP32 input; any other needs the user's.
                    if opts.samples.is_none() {
                        let io = tidal_common::text::task_io(&spec.stages).map_err(anyhow::Error::msg)?;
                        let takes: Vec<String> =
                            io.inputs.iter().map(|d| format!("{} {}", d.name, d.element.v2_name())).collect();
                        anyhow::ensure!(
                            io.inputs.len() == 1
                                && io.inputs[0].element == tidal_common::onnx_signature::ElementType::Fp32,
                            "task {} takes {}: give it requests with --samples DIR",
                            opts.task,
                            takes.join(", ")
                        );
                    }
                    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                    let watch =
                        tokio::spawn(load::watch_cluster(cli.controller.clone(), opts.task.clone(), samples.clone()));
                    (spec.slo_ms, shape, Some((watch, samples)))
                }
            };
            anyhow::ensure!(
                opts.samples.is_some() || !input_shape.is_empty(),
                "task {} has no input shape: give it requests with --samples",
                opts.task
            );
            tidal_common::task::validate_slo(slo_ms).map_err(anyhow::Error::msg)?;
            let json = opts.summary_json.clone();
            let mut summary = load::run(opts, slo_ms, input_shape).await?;
            if let Some((watch, samples)) = watcher {
                watch.abort();
                (summary.mean_cores, summary.plans) =
                    load::cluster_figures(&samples.lock().unwrap_or_else(|p| p.into_inner()));
            }
            load::print_summary(&summary, slo_ms);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// A client of the controller leader, found through any of the comma-separated `addrs`.
pub(crate) async fn controller(addrs: &str) -> anyhow::Result<ControllerClient<Channel>> {
    replicas::leader(addrs).await
}

async fn task_spec(controller_addr: &str, task: &str) -> anyhow::Result<TaskSpec> {
    let status = controller(controller_addr).await?.status(ClusterStatusRequest {}).await?.into_inner();
    status
        .tasks
        .into_iter()
        .filter_map(|t| t.spec)
        .find(|t| t.name == task)
        .with_context(|| format!("the controller has no task {task:?}; register it first"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument explains itself and every command shows an example (`--help`).
    #[test]
    fn every_argument_has_help_and_every_command_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: argument {id} has no help"));
                }
            }
            let subcommands: Vec<_> =
                cmd.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help").collect();
            if subcommands.is_empty() {
                let text = cmd.get_long_about().map(|a| a.to_string()).unwrap_or_default();
                if !text.contains("Example: tidalctl ") {
                    missing.push(format!("{path}: no example"));
                }
            }
            for sub in subcommands {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tidalctl", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
