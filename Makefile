# Tidal: one command runs the demo, one runs the tests. Both set up what a fresh machine lacks.

ORT_LIB := $(CURDIR)/.tidal/lib/libonnxruntime.so
export TIDAL_ORT_LIB := $(ORT_LIB)
CARGO ?= cargo

.PHONY: all setup build dist models demo live-vs-sim live-vs-sim-video live-vs-sim-tasks ipa-pipelines test test-ansible bench control-plane-scale peers clean

all: build

setup: $(ORT_LIB)

$(ORT_LIB): scripts/setup.sh
	scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

# Stripped binaries to roll out (ansible/ copies them from dist/bin): a fifth of the size.
dist: build
	mkdir -p dist/bin
	for b in tidal-agent tidal-controller tidalctl; do strip --strip-debug -o dist/bin/$$b target/release/$$b; done

models: build
	./target/release/tidalctl models generate --out models --resolution 64

demo: build
	scripts/demo.sh

# Each policy replayed live on a local cluster and in the simulator with the same profiles,
# side by side (about 20 minutes).
live-vs-sim: build
	scripts/live-vs-sim.sh

# The same on IPA's video pipeline (detection, then classification of each object's crop).
live-vs-sim-video: build
	PIPELINE=video scripts/live-vs-sim.sh

# Several tasks at once on one agent, live and simulated, per task.
live-vs-sim-tasks: build
	scripts/live-vs-sim-tasks.sh

# IPA's text and speech pipelines: profiled here, then ipa/fa2-low/fa2-high/tidal over a day
# simulated (results/ipa-pipelines.md).
ipa-pipelines: build
	scripts/ipa-pipelines.sh

# Unit tests, property tests and the cross-process integration tests (which start real
# controllers and agents, so the binaries are built first, with the same features as the
# tests so that nothing is compiled twice).
# The installs (ONNX Runtime, the clients and tools the tests drive: downloads, mostly) run
# beside the build, which needs none of them; their output is printed once both are done.
test:
	@mkdir -p .tidal
	@echo "setup and test-deps run beside the build (output: .tidal/test-deps.log, printed after it)"
	@{ $(MAKE) --no-print-directory setup && scripts/test-deps.sh; } > .tidal/test-deps.log 2>&1 & deps=$$!; \
	$(CARGO) build --release --workspace --all-targets; built=$$?; \
	wait $$deps; installed=$$?; cat .tidal/test-deps.log; \
	[ $$built -eq 0 ] && [ $$installed -eq 0 ]
	$(CARGO) test --release --workspace

# Ansible over SSH against three systemd VMs: site.yml, then a rolling upgrade under load, a
# machine lost and back, a node drained and removed (about 20 minutes; root, qemu, ansible).
test-ansible: setup
	scripts/test-deps.sh
	$(CARGO) build --release --workspace --all-targets
	$(CARGO) test --release -p tidal-tests --test process -- ansible:: --include-ignored --nocapture

bench: build
	$(CARGO) run --release -p tidal-agent --example resize_latency
	test -f models/resnet18.onnx || ./target/release/tidalctl models generate --out models --resolution 64
	$(CARGO) run --release -p tidal-agent --example overhead -- models resnet18 60 10
	$(CARGO) run --release -p tidal-agent --example overhead -- models resnet50 20 5
	$(CARGO) run --release -p tidal-agent --example resize_end_to_end -- models resnet18 200
	$(CARGO) bench -p tidal-common --bench solver
	$(CARGO) bench -p tidal-common --bench round

# Three controller replicas and 200 simulated agents over mutual TLS, 50 tasks, one round a
# second for 10 minutes (about 12 minutes; results/scale.md).
control-plane-scale: build
	$(CARGO) build --release -p tidal-tests --example control_plane_scale
	TIDAL_TEST_TLS=1 ./target/release/examples/control_plane_scale 200 50 10 1
	$(CARGO) run --release -p tidal-controller --example commit_throughput
	$(CARGO) run --release -p tidal-tests --example failover -- --trials 20
	$(CARGO) run --release -p tidal-tests --example overload -- --seconds 10

# Tidal beside Triton (nvidia-pytriton), Ray Serve and ONNX Runtime alone, all driven by
# Triton's perf_analyzer over KServe V2 (about 20 minutes; installs the peers into .tidal/peers).
peers: build
	scripts/peers.sh

clean:
	$(CARGO) clean
	rm -rf .tidal models dist
