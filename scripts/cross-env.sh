#!/usr/bin/env bash
# Installs what the ARM cross builds need (scripts/build-arm.sh), and with
# --qemu also what runs their results on this x86_64 machine. Safe to run
# any number of times: each step checks first and does nothing when its
# goal already holds (about a second on a ready machine).
#
# - The Rust standard library for aarch64-unknown-linux-musl on the
#   toolchain `cargo` runs here.
# - Rust 1.93.0 (minimal profile) with armv7-unknown-linux-musleabihf:
#   Rust 1.94 and 1.95 ship no standard library for that target (their
#   dist manifests mark it unavailable), 1.93 is the newest release that
#   has one. The workspace's dependencies need at most 1.90.
# - cargo-zigbuild and Zig (PyPI: cargo-zigbuild, ziglang) in their own
#   virtual environment: `zig cc` is the cross C compiler and linker for
#   both musl targets (ring has C and assembly), with musl's headers and
#   crt built in, so no per-target gcc and no musl sysroot.
# - With --qemu: Debian's qemu-user-static (qemu-aarch64-static and
#   qemu-arm-static run the cross-built tests and the agent).
#
# With CI=true every failure ends the run with a non-zero status; outside
# CI an install that fails is a warning, and the build that needed it
# fails loudly later.

set -euo pipefail

readonly AARCH64_TARGET="aarch64-unknown-linux-musl"
readonly ARMV7_TARGET="armv7-unknown-linux-musleabihf"
readonly ARMV7_TOOLCHAIN="1.93.0"
readonly ZIG_VENV="/opt/drover-zig-venv"
readonly ZIGBUILD_SPEC="cargo-zigbuild==0.24.1"
readonly ZIG_SPEC="ziglang==0.17.1"

log() { printf 'cross-env: %s\n' "$*"; }

die() {
    printf 'cross-env: error: %s\n' "$*" >&2
    exit 1
}

soft_fail() {
    if [[ "${CI:-}" == "true" ]]; then
        die "$*"
    fi
    printf 'cross-env: warning: %s\n' "$*" >&2
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

target_installed() {
    local toolchain=$1 target=$2
    rustup target list --installed --toolchain "$toolchain" 2>/dev/null | grep -qx "$target"
}

ensure_rust_targets() {
    command -v rustup >/dev/null 2>&1 || die "rustup not found; the cross targets are installed with it"
    # The toolchain `cargo` resolves to in this directory (a pin file, an
    # override or the default), so the aarch64 build uses the host's compiler.
    local active
    active=$(rustup show active-toolchain 2>/dev/null | awk '{print $1; exit}')
    [[ -n "$active" ]] || die "no active Rust toolchain; install one with rustup"
    if target_installed "$active" "$AARCH64_TARGET"; then
        log "rust: ${AARCH64_TARGET} present on ${active}"
    elif rustup target add --toolchain "$active" "$AARCH64_TARGET" >/dev/null 2>&1; then
        log "rust: added ${AARCH64_TARGET} to ${active}"
    else
        soft_fail "rustup target add --toolchain ${active} ${AARCH64_TARGET} failed"
    fi
    if target_installed "$ARMV7_TOOLCHAIN" "$ARMV7_TARGET"; then
        log "rust: ${ARMV7_TARGET} present on ${ARMV7_TOOLCHAIN}"
    elif rustup toolchain install "$ARMV7_TOOLCHAIN" --profile minimal --no-self-update \
        --target "$ARMV7_TARGET" >/dev/null 2>&1; then
        log "rust: installed ${ARMV7_TOOLCHAIN} with ${ARMV7_TARGET}"
    else
        soft_fail "rustup toolchain install ${ARMV7_TOOLCHAIN} --target ${ARMV7_TARGET} failed"
    fi
}

zig_ready() {
    [[ -x "${ZIG_VENV}/bin/cargo-zigbuild" ]] &&
        "${ZIG_VENV}/bin/cargo-zigbuild" --version 2>/dev/null | grep -qx "cargo-zigbuild ${ZIGBUILD_SPEC#*==}" &&
        [[ "$("${ZIG_VENV}/bin/python" -m ziglang version 2>/dev/null)" == "${ZIG_SPEC#*==}" ]]
}

ensure_zig() {
    if zig_ready; then
        log "zig: cargo-zigbuild ${ZIGBUILD_SPEC#*==} and zig ${ZIG_SPEC#*==} in ${ZIG_VENV}"
        return 0
    fi
    local python=/usr/bin/python3
    [[ -x "$python" ]] || python=$(command -v python3 || true)
    if [[ -z "$python" ]]; then
        soft_fail "no python3 for cargo-zigbuild; install python3 and python3-venv"
        return 0
    fi
    if [[ ! -x "${ZIG_VENV}/bin/pip" ]]; then
        if ! { [[ -w "$(dirname "$ZIG_VENV")" ]] || is_root; }; then
            soft_fail "cannot create ${ZIG_VENV} (not root); the ARM builds need cargo-zigbuild there"
            return 0
        fi
        log "zig: creating ${ZIG_VENV}"
        if ! "$python" -m venv "$ZIG_VENV"; then
            soft_fail "python3 -m venv ${ZIG_VENV} failed; install python3-venv"
            return 0
        fi
    fi
    log "zig: installing ${ZIGBUILD_SPEC} ${ZIG_SPEC} into ${ZIG_VENV}"
    if ! "${ZIG_VENV}/bin/pip" install --quiet --disable-pip-version-check "$ZIGBUILD_SPEC" "$ZIG_SPEC"; then
        soft_fail "pip install ${ZIGBUILD_SPEC} ${ZIG_SPEC} failed"
        return 0
    fi
    zig_ready || soft_fail "cargo-zigbuild or zig in ${ZIG_VENV} does not run"
}

ensure_qemu() {
    if command -v qemu-aarch64-static >/dev/null 2>&1 && command -v qemu-arm-static >/dev/null 2>&1; then
        log "qemu: qemu-aarch64-static and qemu-arm-static present"
        return 0
    fi
    if ! is_root; then
        soft_fail "qemu-user-static missing and not root; apt-get install qemu-user-static"
        return 0
    fi
    log "qemu: installing qemu-user-static"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >/dev/null ||
        ! apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null; then
        soft_fail "apt-get install qemu-user-static failed"
    fi
}

main() {
    local qemu=""
    while (($#)); do
        case "$1" in
        --qemu) qemu=1 ;;
        *) die "unknown argument '$1' (usage: cross-env.sh [--qemu])" ;;
        esac
        shift
    done
    ensure_rust_targets
    ensure_zig
    [[ -z "$qemu" ]] || ensure_qemu
}

main "$@"
