# Ember's entry points. `make run` and `make test` work on a fresh Debian 12 machine: they
# install what is missing, build the kernel (cached), initramfs and binaries, and use the
# nested test bed when this host's KVM cannot boot stock guests.

CARGO ?= cargo
TESTBED := target/release/ember-testbed

.PHONY: all deps build run test lint unit bench fuzz-smoke rootfs-debian clean

all: build

deps:
	@./resources/deps.sh

build: deps
	./resources/build.sh
	$(CARGO) build --release --workspace --quiet

# Boot a VM (2 vCPUs, 256 MiB, ext4 root, vsock), run a command in it through the agent,
# print its output and the boot figures.
run: build
	@echo "placement: $$($(TESTBED) --show-placement)"
	$(TESTBED) -- resources/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets --quiet -- -D warnings

# The integration tests (tests/tests/*.rs) that boot guests, and those that do not. Every
# file there is in one list (a unit test of tests/src/lib.rs checks it).
VM_TESTS := agent api block boot clones config_file hostile net snapshot
HOST_TESTS := config_errors hostile_api

# Everything: lint, unit tests, and the integration tests that boot real guests. The latter
# run one after the other in a single job (in the nested test bed: one level-1 VM for all).
# Test binaries use the test-release profile (Cargo.toml); the binaries under test are the
# release ones `build` made.
test: build lint
	$(CARGO) test --profile test-release --workspace --exclude ember-tests
	$(CARGO) test --profile test-release -p ember-tests --lib --bins $(HOST_TESTS:%=--test %)
	$(TESTBED) --memory 6144 --timeout 3600 $(VM_TESTS:%=--test %)

# Every fuzz target for FUZZ_SECONDS each from the committed seeds (stable toolchain with
# RUSTC_BOOTSTRAP=1, see fuzz/smoke.sh); installs cargo-fuzz if it is missing.
FUZZ_SECONDS ?= 20
fuzz-smoke: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked --quiet
	./fuzz/smoke.sh $(FUZZ_SECONDS)

bench: build
	target/release/ember-bench boot --runs 10 --json target/bench/boot.json

# Opt-in: Debian bookworm (minbase, python3, git) root image, ~425 MiB, about a minute.
rootfs-debian: build
	./resources/rootfs-debian.sh resources/out/ember-init resources/out/rootfs-debian.ext4

clean:
	$(CARGO) clean
	rm -rf resources/out
