# shellcheck shell=bash disable=SC2034  # globals are used by the other sourced files
# Shared helpers for scripts/services (sourced, not executed).
#
# Layout:
#   $NATSCONN_CACHE (default ~/.cache/natsconn)   downloads, Go/Maven caches, built binaries
#   $NATSCONN_STATE (default $NATSCONN_CACHE/state) data dirs, configs, logs, pid files

NATSCONN_CACHE="${NATSCONN_CACHE:-${HOME:?HOME is not set}/.cache/natsconn}"
NATSCONN_STATE="${NATSCONN_STATE:-$NATSCONN_CACHE/state}"
NATSCONN_BIN_DIR="$NATSCONN_CACHE/bin"
SVC_LOG_DIR="$NATSCONN_STATE/logs"
SVC_HOST=127.0.0.1

# Fixed loopback ports (overridable).
NATS_PORT="${NATSCONN_NATS_PORT:-4222}"
NATS_MONITOR_PORT="${NATSCONN_NATS_MONITOR_PORT:-8222}"
KAFKA_PORT="${NATSCONN_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${NATSCONN_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_SASL_PORT="${NATSCONN_KAFKA_SASL_PORT:-9094}"
# PROXIED: a PLAINTEXT listener on 9095 that advertises 19095, where a test's TcpProxy
# listens and forwards to 9095 (tests/integration/kafka/test_kafka_stall.py): the
# client follows the advertised address, so every connection goes through the proxy.
KAFKA_PROXIED_PORT="${NATSCONN_KAFKA_PROXIED_PORT:-9095}"
KAFKA_PROXIED_ADVERTISED_PORT="${NATSCONN_KAFKA_PROXIED_ADVERTISED_PORT:-19095}"
REDIS_PORT="${NATSCONN_REDIS_PORT:-6379}"
POSTGRES_PORT="${NATSCONN_POSTGRES_PORT:-5432}"

# fd used for the global lock; closed in every daemon we spawn.
SVC_LOCK_FD=9
SVC_APT_UPDATED=0

say()  { printf '[services] %s\n' "$*"; }
warn() { printf '[services] WARNING: %s\n' "$*" >&2; }
die()  { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

now_ms() { date +%s%3N; }
# elapsed START_MS -> "1.234s"
elapsed() {
  local d=$(( $(now_ms) - $1 ))
  printf '%d.%03ds' $((d / 1000)) $((d % 1000))
}

ensure_dirs() {
  mkdir -p "$NATSCONN_CACHE" "$NATSCONN_BIN_DIR" "$NATSCONN_STATE" "$SVC_LOG_DIR"
}

# Serialise mutating commands (install/start/stop) across concurrent callers.
take_lock() {
  ensure_dirs
  eval "exec ${SVC_LOCK_FD}>\"\$NATSCONN_STATE/.services.lock\""
  if ! flock -w "${NATSCONN_LOCK_TIMEOUT:-1800}" "$SVC_LOCK_FD"; then
    die "timed out waiting for lock $NATSCONN_STATE/.services.lock"
  fi
}

# Run a command with root rights (sudo when not root).
as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"; else sudo -n "$@"; fi
}

as_user() {
  local user=$1; shift
  if [[ $EUID -eq 0 ]]; then runuser -u "$user" -- "$@"; else sudo -n -u "$user" "$@"; fi
}

# apt_install LOGNAME PKG...: apt-get update (once per invocation) + install.
apt_install() {
  local log="$SVC_LOG_DIR/install-$1.log"; shift
  if [[ $SVC_APT_UPDATED -eq 0 ]]; then
    as_root apt-get update >>"$log" 2>&1 || die "apt-get update failed (see $log)"
    SVC_APT_UPDATED=1
  fi
  # Keep package maintainer scripts from starting system-wide daemons
  # (redis-server's init script would otherwise grab port 6379).
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    created_policy=1
  fi
  local rc=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
    >>"$log" 2>&1 || rc=$?
  if [[ $created_policy -eq 1 ]]; then as_root rm -f "$policy"; fi
  [[ $rc -eq 0 ]] || die "apt-get install $* failed (see $log)"
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed${2:+ ($2)}"
}

# tcp_open PORT [HOST]: true when something accepts connections.
tcp_open() {
  local port=$1 host=${2:-$SVC_HOST}
  timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# pid_alive PID: process exists and is not a zombie (PID 1 here may reap late).
pid_alive() {
  local state
  [[ $1 =~ ^[0-9]+$ ]] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# pid_matches PID PATTERN: process alive and its command line contains PATTERN.
pid_matches() {
  local pid=$1 pat=$2 cmdline
  pid_alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$pat"* ]]
}

# pidfile_pid FILE PATTERN: print the pid if the pid file names a live matching process.
pidfile_pid() {
  local file=$1 pat=$2 pid
  [[ -s $file ]] || return 1
  pid=$(head -n1 "$file" 2>/dev/null | tr -dc '0-9')
  pid_matches "$pid" "$pat" || return 1
  printf '%s\n' "$pid"
}

# rotate_log FILE: keep one previous copy, so each start's log starts empty.
rotate_log() {
  if [[ -s $1 ]]; then mv -f "$1" "$1.1"; fi
  : >"$1"
}

# log_tail FILE [N]: indented tail for error reports.
log_tail() {
  local file=$1 n=${2:-25}
  if [[ -s $file ]]; then
    printf '[services] --- last %d lines of %s ---\n' "$n" "$file" >&2
    tail -n "$n" "$file" | cut -c1-400 | sed 's/^/    /' >&2
  else
    printf '[services] (log %s is empty or missing)\n' "$file" >&2
  fi
}

# wait_for TIMEOUT_S PID LOG DESCRIPTION CHECK_CMD...
# Poll CHECK_CMD until it succeeds. Fails early when PID (if non-empty) dies.
wait_for() {
  local timeout=$1 pid=$2 log=$3 what=$4; shift 4
  local deadline=$(( $(now_ms) + timeout * 1000 ))
  while :; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [[ -n $pid ]] && ! pid_alive "$pid"; then
      printf '[services] ERROR: %s: process %s exited during startup\n' "$what" "$pid" >&2
      log_tail "$log"
      return 1
    fi
    if (( $(now_ms) >= deadline )); then
      printf '[services] ERROR: %s: not ready after %ss\n' "$what" "$timeout" >&2
      log_tail "$log"
      return 1
    fi
    sleep 0.2
  done
}

# stop_pid PID TIMEOUT_S NAME: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 timeout=$2 name=$3 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for (( i = 0; i < timeout * 10; i++ )); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  warn "$name (pid $pid) did not stop within ${timeout}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
}

# Launch a detached daemon: new session, no inherited stdio or lock fd.
# spawn_detached LOG CMD... ; sets SPAWNED_PID
spawn_detached() {
  local log=$1; shift
  setsid nohup "$@" </dev/null >>"$log" 2>&1 9>&- &
  SPAWNED_PID=$!
}

# Refuse to start when a foreign process already holds one of our ports.
check_ports_free() {
  local name=$1 port; shift
  for port in "$@"; do
    if tcp_open "$port"; then
      die "$name: port $SVC_HOST:$port is already in use by a process not managed by scripts/services"
    fi
  done
}
