#!/usr/bin/env bash
# Runs every test: prepares the environment (Docker, the local registry,
# the test image), builds the binaries the end-to-end tests start (and the
# agent for ARM, whose unit tests run under qemu-user), then runs
# the whole workspace's tests. Nothing is skipped: a missing service fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test-env.sh

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# The end-to-end tests start the real drover and drover-agent binaries,
# built exactly as the harness builds them (the same packages, so the same
# features: a different set would rebuild both once more).
cargo build -p drover -p drover-agent --bins
# drover-agent for aarch64 and armv7 (static musl), debug, and its unit tests
# under qemu-user; tests/tests/arm_agent.rs then runs the aarch64 binary.
bash scripts/build-arm.sh --agent-only --test
cargo nextest run --workspace --no-fail-fast "$@"
