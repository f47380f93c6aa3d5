#!/usr/bin/env bash
# Prepares everything the test suite needs on this machine: Debian packages,
# the ARM cross-build tools (scripts/cross-env.sh),
# schemathesis in a Python virtual environment,
# a reachable Docker daemon, a local v2 registry on 127.0.0.1:5000 and a tiny
# busybox test image in it, and a second registry on 127.0.0.1:5001 that
# serves the same storage behind htpasswd authentication; cargo-deb and a
# Debian 12 image with systemd for the package tests. Safe to run any number of times: every step checks
# first and does nothing when its goal already holds, so a ready machine costs
# well under a second.
#
# Needs root for anything it has to install or start. With CI=true every
# failure ends the run with a non-zero status; outside CI a package that
# cannot be installed is only a warning, because a developer may have the
# tool elsewhere and later steps fail loudly if it really mattered.

set -euo pipefail

readonly REGISTRY_ADDR="127.0.0.1:5000"
readonly REGISTRY_URL="http://${REGISTRY_ADDR}"
readonly REGISTRY_CONFIG="/etc/drover/registry.yml"
readonly REGISTRY_DATA="/var/lib/drover-registry"
readonly REGISTRY_LOG="/var/log/docker-registry-drover.log"
readonly DOCKERD_LOG="/var/log/dockerd-drover.log"
readonly IMAGE_REPO="drover/busybox"
readonly IMAGE_TAG="2"
readonly IMAGE="${REGISTRY_ADDR}/${IMAGE_REPO}:${IMAGE_TAG}"
# The private registry: same storage root, so the test image is there
# without a push, but every request needs a user and password. The test
# credentials are fixed; they must match AUTH_REGISTRY_USER and
# AUTH_REGISTRY_PASSWORD in tests/src/lib.rs.
readonly AUTH_REGISTRY_ADDR="127.0.0.1:5001"
readonly AUTH_REGISTRY_URL="http://${AUTH_REGISTRY_ADDR}"
readonly AUTH_REGISTRY_CONFIG="/etc/drover/registry-auth.yml"
readonly AUTH_REGISTRY_HTPASSWD="/etc/drover/registry-auth.htpasswd"
readonly AUTH_REGISTRY_LOG="/var/log/docker-registry-drover-auth.log"
readonly AUTH_USER="drover-test"
readonly AUTH_PASSWORD="drover-registry-pw-7f3c91e2"
readonly WAIT_SECONDS=30
# schemathesis (PyPI) tests a running `drover serve` against its OpenAPI
# document. It lives in its own virtual environment so it never meets the
# system's Python packages; tests/src/schemathesis.rs looks for it here.
readonly TEST_VENV="/opt/drover-test-venv"
readonly SCHEMATHESIS_SPEC="schemathesis>=4,<5"
# paho-mqtt (PyPI): a second outside MQTT client with per-request control
# (tests/tests/automation_mqtt.rs), in the same virtual environment.
readonly PAHO_SPEC="paho-mqtt>=2,<3"
# cargo-deb builds the .deb packages (tests/tests/packages.rs), installed
# with `cargo install --locked` into ~/.cargo/bin.
readonly CARGO_DEB_VERSION="3.8.0"
# A Debian 12 image with systemd as PID 1 to install those packages into.
# No public registry is reachable, so it is made here: debootstrap from
# Debian's mirror, then `docker import`. Built once, kept in the local
# Docker image store; the tests only read it.
readonly SYSTEMD_IMAGE="drover-test/debian-systemd:12"
readonly DEBIAN_MIRROR="${DROVER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly DEBOOTSTRAP_LOG="/var/log/drover-debootstrap.log"

# The image build's scratch directory, removed however the script ends.
ROOTFS_TMP=""
trap '[[ -z "$ROOTFS_TMP" ]] || rm -rf "$ROOTFS_TMP"' EXIT

log() { printf 'test-env: %s\n' "$*"; }

die() {
    printf 'test-env: error: %s\n' "$*" >&2
    exit 1
}

# A failure that a developer may choose to live with; fatal under CI.
soft_fail() {
    if [[ "${CI:-}" == "true" ]]; then
        die "$*"
    fi
    printf 'test-env: warning: %s\n' "$*" >&2
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Polls a command until it succeeds or WAIT_SECONDS pass. With WATCH_PID
# set, gives up early once that process has exited (a daemon that died on
# start-up, e.g. because its port is taken), after a last short grace in case
# another instance is the one answering.
WATCH_PID=""
wait_for() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@"; do
        if [[ -n "$WATCH_PID" ]] && ! kill -0 "$WATCH_PID" 2>/dev/null; then
            sleep 1
            "$@"
            return
        fi
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

package_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

ensure_packages() {
    local missing=()
    # Any docker CLI will do (Docker's own packages, a static binary in
    # /usr/local/bin, ...); only install Debian's when there is none.
    command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    local pkg
    # chromium and chromium-driver: the web console's browser tests
    # (tests/src/browser.rs); fonts-dejavu-core so its screenshots have text.
    # qemu-user-static: the ARM agent's tests under emulation
    # (scripts/build-arm.sh --test, tests/tests/arm_agent.rs).
    # debootstrap: the systemd test image (ensure_systemd_image); dpkg-dev:
    # dpkg-shlibdeps and strip for cargo-deb.
    for pkg in docker-registry apache2-utils mosquitto mosquitto-clients busybox-static curl iproute2 python3 python3-venv chromium chromium-driver fonts-dejavu-core qemu-user-static debootstrap dpkg-dev; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "packages: all present"
        return 0
    fi
    if ! is_root; then
        soft_fail "missing packages (${missing[*]}) and not root; install them with apt-get"
        return 0
    fi
    log "packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >/dev/null; then
        soft_fail "apt-get update failed"
        return 0
    fi
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        soft_fail "apt-get install ${missing[*]} failed"
    fi
}

docker_up() { timeout 10 docker info >/dev/null 2>&1; }

ensure_docker() {
    command -v docker >/dev/null 2>&1 || die "no docker CLI; install docker.io"
    if docker_up; then
        log "docker: daemon reachable"
        return 0
    fi
    is_root || die "docker daemon unreachable and not root to start it"
    # A daemon that is already starting only needs time.
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "docker: dockerd is running but not answering yet; waiting"
    elif service docker start >/dev/null 2>&1; then
        log "docker: started with 'service docker start'"
    else
        command -v dockerd >/dev/null 2>&1 || die "docker daemon unreachable and no dockerd binary to start"
        log "docker: starting dockerd in the background (log: ${DOCKERD_LOG})"
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
        WATCH_PID=$!
    fi
    wait_for docker_up ||
        die "docker daemon unreachable (it exited, or was not up within ${WAIT_SECONDS}s); see ${DOCKERD_LOG} or 'docker info'"
    WATCH_PID=""
}

registry_up() { curl -fsS --max-time 3 -o /dev/null "${REGISTRY_URL}/v2/" 2>/dev/null; }

# Debian's packaged /etc/docker/registry/config.yml listens on every address
# and turns on htpasswd auth whose path is a directory, so the registry runs
# but answers 401 to everything. Ours: loopback only, no auth, own storage.
write_registry_config() {
    local want
    want=$(
        cat <<EOF
# Written by scripts/test-env.sh: the Drover test registry.
version: 0.1
log:
  level: info
  fields:
    service: drover-registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: ${REGISTRY_DATA}
  delete:
    enabled: true
http:
  addr: ${REGISTRY_ADDR}
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
    )
    if [[ -f "$REGISTRY_CONFIG" && "$(cat "$REGISTRY_CONFIG")" == "$want" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$REGISTRY_CONFIG")"
    printf '%s\n' "$want" >"$REGISTRY_CONFIG"
    log "registry: wrote ${REGISTRY_CONFIG}"
}

# Installing docker-registry on a machine with an init system starts the
# packaged service on :5000 with that unusable config. It holds our port and
# serves nothing, so it gives way to ours, now and at the next boot.
stop_packaged_registry() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "${REGISTRY_URL}/v2/" 2>/dev/null || true)
    if [[ "$code" != "401" ]] || ! service docker-registry status >/dev/null 2>&1; then
        return 0
    fi
    log "registry: stopping Debian's docker-registry service (it demands auth on ${REGISTRY_ADDR})"
    service docker-registry stop >/dev/null 2>&1 || die "could not stop the docker-registry service holding ${REGISTRY_ADDR}"
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --quiet docker-registry.service >/dev/null 2>&1 || true
    fi
}

ensure_registry() {
    if registry_up; then
        log "registry: already serving ${REGISTRY_URL}/v2/"
        return 0
    fi
    is_root || die "no registry at ${REGISTRY_URL} and not root to start one"
    command -v docker-registry >/dev/null 2>&1 || die "no registry at ${REGISTRY_URL} and docker-registry is not installed"
    stop_packaged_registry
    write_registry_config
    mkdir -p "$REGISTRY_DATA"
    # Run unprivileged as the package's own user when it exists.
    local run_as=()
    if getent passwd docker-registry >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1; then
        chown docker-registry: "$REGISTRY_DATA"
        run_as=(setpriv --reuid=docker-registry --regid=docker-registry --init-groups --)
    fi
    log "registry: starting docker-registry on ${REGISTRY_ADDR} (data: ${REGISTRY_DATA}, log: ${REGISTRY_LOG})"
    setsid nohup "${run_as[@]}" docker-registry serve "$REGISTRY_CONFIG" >>"$REGISTRY_LOG" 2>&1 </dev/null &
    WATCH_PID=$!
    if ! wait_for registry_up; then
        tail -n 3 "$REGISTRY_LOG" >&2 || true
        die "registry not answering on ${REGISTRY_URL}/v2/ (it exited, or was not up within ${WAIT_SECONDS}s); see ${REGISTRY_LOG}"
    fi
    WATCH_PID=""
}

image_in_registry() {
    curl -fsS --max-time 5 "${REGISTRY_URL}/v2/${IMAGE_REPO}/tags/list" 2>/dev/null |
        grep -Eq "\"tags\":\[([^]]*,)?\"${IMAGE_TAG}\""
}

# A root file system of one static busybox plus applet symlinks, imported as
# an image whose command prints a numbered line every second forever.
build_image() {
    local busybox
    busybox=$(command -v busybox || true)
    [[ -n "$busybox" ]] || die "busybox not found; install busybox-static"
    busybox=$(readlink -f "$busybox")
    # A dynamically linked busybox would not run in an empty root file system.
    if command -v ldd >/dev/null 2>&1 && ldd "$busybox" >/dev/null 2>&1; then
        die "${busybox} is dynamically linked; install busybox-static"
    fi
    local rootfs
    rootfs=$(mktemp -d)
    ROOTFS_TMP=$rootfs
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    chmod 1777 "$rootfs/tmp"
    cp "$busybox" "$rootfs/bin/busybox"
    local applet
    for applet in sh sleep echo cat ls env true false printf date; do
        ln -s busybox "$rootfs/bin/$applet"
    done
    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf - . |
        docker import \
            -c 'ENV PATH=/bin' \
            -c 'CMD ["/bin/sh","-c","trap \"exit 0\" TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]' \
            -m "drover test image: static busybox" \
            - "$IMAGE" >/dev/null ||
        die "docker import of ${IMAGE} failed"
    rm -rf "$rootfs"
    ROOTFS_TMP=""
}

ensure_image() {
    if image_in_registry; then
        log "image: ${IMAGE} already in the registry"
        return 0
    fi
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        log "image: pushing existing local ${IMAGE}"
    else
        log "image: building ${IMAGE} from static busybox"
        build_image
    fi
    docker push "$IMAGE" >/dev/null || die "docker push ${IMAGE} failed"
    image_in_registry || die "pushed ${IMAGE} but the registry does not list tag ${IMAGE_TAG}"
    log "image: pushed ${IMAGE}"
}

auth_registry_code() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" "${AUTH_REGISTRY_URL}/v2/" 2>/dev/null || true
}

# Up means: 401 without credentials and 200 with the test ones.
auth_registry_up() {
    [[ "$(auth_registry_code)" == "401" ]] &&
        [[ "$(auth_registry_code -u "${AUTH_USER}:${AUTH_PASSWORD}")" == "200" ]]
}

write_auth_registry_files() {
    local want
    want=$(
        cat <<EOF
# Written by scripts/test-env.sh: the Drover private test registry. It
# shares its storage with the registry on ${REGISTRY_ADDR}, read-mostly.
version: 0.1
log:
  level: info
  fields:
    service: drover-registry-auth
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: ${REGISTRY_DATA}
http:
  addr: ${AUTH_REGISTRY_ADDR}
  headers:
    X-Content-Type-Options: [nosniff]
auth:
  htpasswd:
    realm: drover-test
    path: ${AUTH_REGISTRY_HTPASSWD}
EOF
    )
    mkdir -p "$(dirname "$AUTH_REGISTRY_CONFIG")"
    if [[ ! -f "$AUTH_REGISTRY_CONFIG" || "$(cat "$AUTH_REGISTRY_CONFIG")" != "$want" ]]; then
        printf '%s\n' "$want" >"$AUTH_REGISTRY_CONFIG"
        log "auth registry: wrote ${AUTH_REGISTRY_CONFIG}"
    fi
    # bcrypt, the only hash the registry's htpasswd support accepts.
    if ! htpasswd -vb "$AUTH_REGISTRY_HTPASSWD" "$AUTH_USER" "$AUTH_PASSWORD" >/dev/null 2>&1; then
        htpasswd -Bbn "$AUTH_USER" "$AUTH_PASSWORD" >"$AUTH_REGISTRY_HTPASSWD" ||
            die "htpasswd failed; install apache2-utils"
        log "auth registry: wrote ${AUTH_REGISTRY_HTPASSWD}"
    fi
    chmod 0640 "$AUTH_REGISTRY_HTPASSWD"
    if getent group docker-registry >/dev/null 2>&1; then
        chgrp docker-registry "$AUTH_REGISTRY_HTPASSWD"
    fi
}

ensure_auth_registry() {
    if auth_registry_up; then
        log "auth registry: already serving ${AUTH_REGISTRY_URL}/v2/ (401 without credentials, 200 with)"
        return 0
    fi
    is_root || die "no authenticating registry at ${AUTH_REGISTRY_URL} and not root to start one"
    command -v htpasswd >/dev/null 2>&1 || die "htpasswd not found; install apache2-utils"
    local code
    code=$(auth_registry_code)
    if [[ "$code" != "000" ]]; then
        die "${AUTH_REGISTRY_ADDR} answers ${code} but not as the test registry; stop whatever holds the port"
    fi
    write_auth_registry_files
    local run_as=()
    if getent passwd docker-registry >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1; then
        run_as=(setpriv --reuid=docker-registry --regid=docker-registry --init-groups --)
    fi
    log "auth registry: starting docker-registry on ${AUTH_REGISTRY_ADDR} (storage shared with ${REGISTRY_ADDR}, log: ${AUTH_REGISTRY_LOG})"
    setsid nohup "${run_as[@]}" docker-registry serve "$AUTH_REGISTRY_CONFIG" >>"$AUTH_REGISTRY_LOG" 2>&1 </dev/null &
    WATCH_PID=$!
    if ! wait_for auth_registry_up; then
        tail -n 3 "$AUTH_REGISTRY_LOG" >&2 || true
        die "auth registry not answering 401/200 on ${AUTH_REGISTRY_URL}/v2/; see ${AUTH_REGISTRY_LOG}"
    fi
    WATCH_PID=""
}

schemathesis_version() {
    "${TEST_VENV}/bin/schemathesis" --version 2>/dev/null || true
}

ensure_schemathesis() {
    local version
    version=$(schemathesis_version)
    if [[ "$version" == *"version 4."* ]]; then
        log "schemathesis: ${version} in ${TEST_VENV}"
        return 0
    fi
    # Debian's own interpreter: a python3 earlier on PATH (pyenv, a
    # developer's build) may lack venv or go away.
    local python=/usr/bin/python3
    [[ -x "$python" ]] || python=$(command -v python3 || true)
    if [[ -z "$python" ]]; then
        soft_fail "no python3 for schemathesis; install python3 and python3-venv"
        return 0
    fi
    if [[ ! -x "${TEST_VENV}/bin/pip" ]]; then
        if ! { [[ -w "$(dirname "$TEST_VENV")" ]] || is_root; }; then
            soft_fail "cannot create ${TEST_VENV} (not root); the OpenAPI tests need schemathesis there"
            return 0
        fi
        log "schemathesis: creating ${TEST_VENV}"
        if ! "$python" -m venv "$TEST_VENV"; then
            soft_fail "python3 -m venv ${TEST_VENV} failed; install python3-venv"
            return 0
        fi
    fi
    log "schemathesis: installing ${SCHEMATHESIS_SPEC} into ${TEST_VENV}"
    if ! "${TEST_VENV}/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS_SPEC"; then
        soft_fail "pip install ${SCHEMATHESIS_SPEC} failed"
        return 0
    fi
    version=$(schemathesis_version)
    if [[ "$version" == *"version 4."* ]]; then
        log "schemathesis: ${version} installed in ${TEST_VENV}"
    else
        soft_fail "schemathesis installed but ${TEST_VENV}/bin/schemathesis does not run"
    fi
}

ensure_paho() {
    if "${TEST_VENV}/bin/python" -c 'import paho.mqtt.client' 2>/dev/null; then
        log "paho-mqtt: present in ${TEST_VENV}"
        return 0
    fi
    if [[ ! -x "${TEST_VENV}/bin/pip" ]]; then
        soft_fail "no ${TEST_VENV} for paho-mqtt (ensure_schemathesis makes it)"
        return 0
    fi
    log "paho-mqtt: installing ${PAHO_SPEC} into ${TEST_VENV}"
    if ! "${TEST_VENV}/bin/pip" install --quiet --disable-pip-version-check "$PAHO_SPEC"; then
        soft_fail "pip install ${PAHO_SPEC} failed"
    fi
}

# Prometheus and promtool (Debian's `prometheus`): tests/tests/metrics_prometheus.rs
# runs its own `prometheus` on a free loopback port with a temporary config
# and data directory, and `promtool check metrics`. The packaged daemon is
# never needed: it is installed with service starts denied (policy-rc.d),
# and one an earlier install started is left alone, it serves nothing the
# tests read.
ensure_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        log "prometheus: $(prometheus --version 2>&1 | head -n1)"
        return 0
    fi
    if ! is_root; then
        soft_fail "prometheus and promtool missing and not root; apt-get install prometheus"
        return 0
    fi
    log "prometheus: installing (service start denied)"
    export DEBIAN_FRONTEND=noninteractive
    local policy=/usr/sbin/policy-rc.d own_policy=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    local ok=1
    apt-get update -qq >/dev/null || ok=""
    if [[ -n "$ok" ]]; then
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null || ok=""
    fi
    [[ -z "$own_policy" ]] || rm -f "$policy"
    if [[ -z "$ok" ]] || ! command -v promtool >/dev/null 2>&1; then
        soft_fail "apt-get install prometheus failed"
        return 0
    fi
    log "prometheus: $(prometheus --version 2>&1 | head -n1)"
}

# The ARM cross builds' tools (Rust targets, cargo-zigbuild and Zig in
# /opt/drover-zig-venv): scripts/cross-env.sh, shared with
# scripts/build-arm.sh. It follows the same CI=true rule.
ensure_cross_tools() {
    bash "$(dirname "${BASH_SOURCE[0]}")/cross-env.sh" --qemu
}

cargo_deb_version() {
    cargo deb --version 2>/dev/null || true
}

ensure_cargo_deb() {
    if [[ "$(cargo_deb_version)" == *"${CARGO_DEB_VERSION}"* ]]; then
        log "cargo-deb: $(cargo_deb_version)"
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "no cargo to install cargo-deb with"
    log "cargo-deb: installing ${CARGO_DEB_VERSION} (cargo install --locked, a few minutes)"
    cargo install --quiet --locked --version "$CARGO_DEB_VERSION" cargo-deb ||
        die "cargo install cargo-deb failed"
    log "cargo-deb: $(cargo_deb_version)"
}

# Debian 12 minbase with systemd, dbus and curl: everything the packages
# depend on is already there, so `dpkg -i` needs no mirror at test time.
build_systemd_image() {
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found; apt-get install debootstrap"
    local rootfs
    rootfs=$(mktemp -d)
    ROOTFS_TMP=$rootfs
    log "systemd image: debootstrap bookworm from ${DEBIAN_MIRROR} (log: ${DEBOOTSTRAP_LOG})"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$DEBOOTSTRAP_LOG" 2>&1 ||
        die "debootstrap failed; see ${DEBOOTSTRAP_LOG}"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # Units that have nothing to do in a container, and would only fail.
    local unit
    for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
        getty@.service console-getty.service systemd-logind.service \
        systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
        sys-kernel-tracing.mount systemd-firstboot.service; do
        ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
    done
    printf 'drover-test\n' >"$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" -cf - . |
        docker import \
            -c 'ENV container=docker' \
            -c 'CMD ["/sbin/init"]' \
            -m "drover test image: Debian 12 with systemd" \
            - "$SYSTEMD_IMAGE" >/dev/null ||
        die "docker import of ${SYSTEMD_IMAGE} failed"
    rm -rf "$rootfs"
    ROOTFS_TMP=""
}

ensure_systemd_image() {
    if docker image inspect "$SYSTEMD_IMAGE" >/dev/null 2>&1; then
        log "systemd image: ${SYSTEMD_IMAGE} present"
        return 0
    fi
    is_root || die "no ${SYSTEMD_IMAGE} and not root to debootstrap one"
    build_systemd_image
    log "systemd image: built ${SYSTEMD_IMAGE}"
}

main() {
    ensure_packages
    ensure_cross_tools
    ensure_schemathesis
    ensure_paho
    ensure_prometheus
    ensure_docker
    ensure_registry
    ensure_image
    ensure_auth_registry
    ensure_cargo_deb
    ensure_systemd_image
    log "ready (registry ${REGISTRY_ADDR}, image ${IMAGE}; with auth: ${AUTH_REGISTRY_ADDR})"
}

main "$@"
