# shellcheck shell=bash disable=SC2153  # globals come from services-common.sh
# A Confluent-compatible schema registry: Apicurio Registry, with its
# Confluent-compatible REST API ("ccompat") at /apis/ccompat/v7.
#
# Installed from Maven Central with Maven: io.apicurio:apicurio-registry-app's
# "all" tar.gz (classifier all) is the Quarkus application that Apicurio builds
# for its own releases (a runner jar plus lib/), so nothing is built here; it is
# unpacked once into the cache and started with `java -jar`.
#
# Version: 3.0.9 runs on the machine's Java 17. 3.3.3 does not (its classes are
# Java 21 bytecode: UnsupportedClassVersionError on 17). To try another, set
# NATSCONN_REGISTRY_VERSION and, where it needs a newer Java, NATSCONN_REGISTRY_JAVA
# to that java binary.
#
# Ports: NATSCONN_REGISTRY_PORT (8081) for the REST APIs; NATSCONN_REGISTRY_MANAGEMENT_PORT
# (8082) is passed too but only used by releases that enable Quarkus' management
# interface (3.3.x does, 3.0.9 does not).
#
# Storage is Apicurio's default: H2 in memory. Schemas, ids and compatibility
# settings are lost on every stop/restart (unlike the other services' data);
# tests use subject names of their own.

REGISTRY_VERSION="${NATSCONN_REGISTRY_VERSION:-3.0.9}"
REGISTRY_PORT="${NATSCONN_REGISTRY_PORT:-8081}"
REGISTRY_HOME="$NATSCONN_CACHE/apicurio-registry-$REGISTRY_VERSION"
REGISTRY_ARTIFACT="io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all"
REGISTRY_API_PATH=/apis/ccompat/v7
REGISTRY_URL="http://$SVC_HOST:$REGISTRY_PORT$REGISTRY_API_PATH"

REGISTRY_DIR="$NATSCONN_STATE/registry"
REGISTRY_PID="$REGISTRY_DIR/registry.pid"
REGISTRY_OUT="$REGISTRY_DIR/registry.log"   # Quarkus logs to the console: JVM stdout/stderr

_registry_java() { printf '%s' "${NATSCONN_REGISTRY_JAVA:-${NATSCONN_JAVA:-java}}"; }

registry_installed() { [[ -f $REGISTRY_HOME/.complete ]]; }

# The jar to start: the legacy-jar runner of 3.0.x, or quarkus-run.jar of the
# fast-jar layout that 3.1+ ships.
_registry_jar() {
  local jar
  if [[ -f $REGISTRY_HOME/quarkus-run.jar ]]; then
    printf '%s\n' "$REGISTRY_HOME/quarkus-run.jar"
    return 0
  fi
  for jar in "$REGISTRY_HOME"/apicurio-registry-app-*-runner.jar; do
    [[ -f $jar ]] && { printf '%s\n' "$jar"; return 0; }
  done
  return 1
}

registry_install() {
  registry_installed && return 0
  local log="$SVC_LOG_DIR/install-registry.log" t tmp m2="$NATSCONN_CACHE/m2" tarball
  if ! command -v "$(_registry_java)" >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    say "registry: installing Java 17 / Maven from apt"
    apt_install registry openjdk-17-jre-headless maven
  fi
  t=$(now_ms)
  tarball="$m2/io/apicurio/apicurio-registry-app/$REGISTRY_VERSION/apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz"
  mkdir -p "$NATSCONN_CACHE"
  if ! (cd "$NATSCONN_CACHE" && mvn -B -q -Dmaven.repo.local="$m2" \
        dependency:get -Dtransitive=false -Dartifact="$REGISTRY_ARTIFACT") >>"$log" 2>&1 \
      || [[ ! -s $tarball ]]; then
    log_tail "$log"
    die "registry: maven could not fetch $REGISTRY_ARTIFACT (see $log)"
  fi
  tmp="$REGISTRY_HOME.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if ! tar -xzf "$tarball" -C "$tmp" >>"$log" 2>&1; then
    rm -rf "$tmp"
    die "registry: could not unpack $tarball (see $log)"
  fi
  rm -rf "$REGISTRY_HOME"
  mv "$tmp" "$REGISTRY_HOME"
  _registry_jar >/dev/null || die "registry: no runner jar in $REGISTRY_ARTIFACT (unpacked in $REGISTRY_HOME)"
  # The unpacked copy is all that is needed: drop the ~110 MB tarball from the Maven cache.
  rm -rf "${tarball%/*}"
  touch "$REGISTRY_HOME/.complete"
  say "registry: fetched Apicurio Registry $REGISTRY_VERSION ($(find "$REGISTRY_HOME" -name '*.jar' | wc -l) jars) in $(elapsed "$t")"
}

registry_pid() { pidfile_pid "$REGISTRY_PID" apicurio-registry; }

# Ready when the ccompat API answers a read (the HTTP port opens a little
# before the storage is initialised).
registry_ready() {
  curl -sf -o /dev/null --max-time 2 "$REGISTRY_URL/subjects"
}

# Launch without waiting; registry_wait finishes the job (the JVM boots while
# the other services start).
REGISTRY_LAUNCHED_AT=
registry_launch() {
  local pid jar
  REGISTRY_LAUNCHED_AT=
  if pid=$(registry_pid); then
    return 0
  fi
  check_ports_free registry "$REGISTRY_PORT"
  jar=$(_registry_jar) || die "registry: not installed in $REGISTRY_HOME (run 'scripts/services install registry')"
  REGISTRY_LAUNCHED_AT=$(now_ms)
  mkdir -p "$REGISTRY_DIR/tmp"
  rotate_log "$REGISTRY_OUT"
  rm -f "$REGISTRY_PID"
  # A small heap, the serial collector and C1 only: the machine has 2 cores
  # shared with Kafka, and a test registry sees a handful of requests. The H2
  # pool is cut from Apicurio's 20..100 connections to 2..20. Canonical-hash
  # mode makes a re-registration that differs only in whitespace find the
  # existing version, as Confluent's registry does.
  # shellcheck disable=SC2086  # NATSCONN_REGISTRY_JVM_OPTS is a word list on purpose
  spawn_detached "$REGISTRY_OUT" "$(_registry_java)" \
    ${NATSCONN_REGISTRY_JVM_OPTS:--Xms64m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1} \
    -Djava.awt.headless=true \
    -Djava.io.tmpdir="$REGISTRY_DIR/tmp" \
    -Dquarkus.http.host="$SVC_HOST" \
    -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.management.host="$SVC_HOST" \
    -Dquarkus.management.port="${NATSCONN_REGISTRY_MANAGEMENT_PORT:-8082}" \
    -Dapicurio.datasource.jdbc.initial-size=2 \
    -Dapicurio.datasource.jdbc.min-size=2 \
    -Dapicurio.datasource.jdbc.max-size=20 \
    -Dapicurio.ccompat.use-canonical-hash=true \
    -jar "$jar"
  echo "$SPAWNED_PID" >"$REGISTRY_PID"
}

registry_wait() {
  local pid
  if ! pid=$(registry_pid); then
    log_tail "$REGISTRY_OUT"
    die "registry: process is not running (log: $REGISTRY_OUT)"
  fi
  if [[ -z $REGISTRY_LAUNCHED_AT ]]; then
    if registry_ready || wait_for "${NATSCONN_REGISTRY_START_TIMEOUT:-120}" "$pid" "$REGISTRY_OUT" registry registry_ready; then
      say "registry: already running (pid $pid, $REGISTRY_URL)"
      return 0
    fi
    return 1
  fi
  if ! wait_for "${NATSCONN_REGISTRY_START_TIMEOUT:-120}" "$pid" "$REGISTRY_OUT" registry registry_ready; then
    stop_pid "$pid" 15 registry
    die "registry: failed to start (log: $REGISTRY_OUT)"
  fi
  say "registry: started in $(elapsed "$REGISTRY_LAUNCHED_AT") (pid $pid, Apicurio $REGISTRY_VERSION, $REGISTRY_URL, in-memory)"
}

registry_start() { registry_launch && registry_wait; }

registry_stop() {
  local pid t
  if ! pid=$(registry_pid); then
    rm -f "$REGISTRY_PID"
    say "registry: not running"
    return 0
  fi
  t=$(now_ms)
  stop_pid "$pid" "${NATSCONN_REGISTRY_STOP_TIMEOUT:-30}" registry
  rm -f "$REGISTRY_PID"
  say "registry: stopped in $(elapsed "$t")"
}

registry_status_line() {
  local pid
  if pid=$(registry_pid) && registry_ready; then
    printf '%-9s running  %s (Apicurio %s, in-memory)  pid %s\n' registry "$REGISTRY_URL" "$REGISTRY_VERSION" "$pid"
  elif [[ -n ${pid:-} ]]; then
    printf '%-9s starting %s  pid %s (not ready yet)\n' registry "$REGISTRY_URL" "$pid"
    return 1
  else
    printf '%-9s stopped  %s\n' registry "$REGISTRY_URL"
    return 1
  fi
}
