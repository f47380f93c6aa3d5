#!/usr/bin/env bash
# Builds drover-agent and drover for ARM Linux as static musl binaries:
#
#   target/aarch64-unknown-linux-musl/<profile>/drover-agent, drover
#   target/armv7-unknown-linux-musleabihf/<profile>/drover-agent, drover
#
# usage: bash scripts/build-arm.sh [--release] [--agent-only] [--test]
#
#   --release     the release profile (optimised for size, symbols stripped);
#                 the default is a debug build
#   --agent-only  only drover-agent (what CI builds)
#   --test        then run drover-agent's unit tests for each target under
#                 qemu-user (qemu-aarch64-static, qemu-arm-static)
#
# The tools come first from scripts/cross-env.sh (idempotent, about a second
# when they are there): the Rust targets, cargo-zigbuild with Zig as the
# cross C compiler and linker, and with --test qemu-user-static. Host builds
# are untouched: nothing here sets RUSTFLAGS or a host compiler, and each
# target has its own directory under target/.

set -euo pipefail
cd "$(dirname "$0")/.."

readonly ZIG_VENV="/opt/drover-zig-venv"
# The toolchain for armv7: see scripts/cross-env.sh for why it is pinned.
readonly ARMV7_TOOLCHAIN="1.93.0"

die() {
    printf 'build-arm: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    echo "usage: bash scripts/build-arm.sh [--release] [--agent-only] [--test]"
}

release=""
agent_only=""
run_tests=""
while (($#)); do
    case "$1" in
    --release) release=1 ;;
    --agent-only) agent_only=1 ;;
    --test) run_tests=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument '$1'"
        ;;
    esac
    shift
done

if [[ -n "$run_tests" ]]; then
    bash scripts/cross-env.sh --qemu
else
    bash scripts/cross-env.sh
fi

zigbuild="${ZIG_VENV}/bin/cargo-zigbuild"
[[ -x "$zigbuild" ]] || die "${zigbuild} missing; run 'bash scripts/cross-env.sh'"
# cargo-zigbuild finds Zig as `python3 -m ziglang`: the virtual
# environment's python3 comes first.
export PATH="${ZIG_VENV}/bin:${PATH}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER="qemu-aarch64-static"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUNNER="qemu-arm-static"

bins=(drover-agent)
[[ -n "$agent_only" ]] || bins+=(drover)
packages=()
for bin in "${bins[@]}"; do packages+=(-p "$bin"); done
profile_args=()
profile_dir="debug"
if [[ -n "$release" ]]; then
    profile_args=(--release)
    profile_dir="release"
fi

# target and the toolchain to build it with ("" is the one `cargo` uses here)
builds=(
    "aarch64-unknown-linux-musl:"
    "armv7-unknown-linux-musleabihf:${ARMV7_TOOLCHAIN}"
)

for build in "${builds[@]}"; do
    target=${build%%:*}
    toolchain=${build#*:}
    env_toolchain=()
    [[ -z "$toolchain" ]] || env_toolchain=(env "RUSTUP_TOOLCHAIN=${toolchain}")
    printf 'build-arm: building %s for %s (%s)\n' "${packages[*]}" "$target" "$profile_dir"
    start=$SECONDS
    "${env_toolchain[@]}" "$zigbuild" zigbuild --target "$target" "${packages[@]}" --bins "${profile_args[@]}"
    printf 'build-arm: %s built in %ss\n' "$target" "$((SECONDS - start))"
    for bin in "${bins[@]}"; do
        path="${CARGO_TARGET_DIR:-target}/${target}/${profile_dir}/${bin}"
        [[ -x "$path" ]] || die "${path} was not built"
        printf 'build-arm: %s (%s bytes)\n' "$path" "$(stat -c %s "$path")"
    done
    if [[ -n "$run_tests" ]]; then
        printf 'build-arm: testing drover-agent for %s under qemu-user\n' "$target"
        start=$SECONDS
        "${env_toolchain[@]}" "$zigbuild" test --target "$target" -p drover-agent --lib --bins "${profile_args[@]}"
        printf 'build-arm: %s tests took %ss\n' "$target" "$((SECONDS - start))"
    fi
done
