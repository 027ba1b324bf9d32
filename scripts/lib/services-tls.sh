# shellcheck shell=bash disable=SC2153  # globals come from services-common.sh and the others
# TLS and authentication variants of the four servers, for tests/security/.
#
# They run BESIDE the plain servers, on their own ports and state, so that the
# plain servers (used by every other test at the same time) are never touched:
#
#   nats-tls      4223 TLS, client certificate required (tls { verify: true }), JetStream
#                 4224 users: user/password and an NKey user; TLS offered, not required
#                      (monitor 8224: /connz shows which clients use TLS)
#                 4225 token
#                 4226 operator mode (user JWT in a .creds file), only when `nsc` was built
#   kafka-tls     a second single-node KRaft broker: SASL_SSL (SCRAM-SHA-256/512) on 9194,
#                 controller 9195, inter-broker PLAINTEXT on 9196 (loopback, not for clients)
#   redis-tls     a second redis-server: TLS only on 6380, client certificate required,
#                 ACL users (the default user is off)
#   postgres-tls  a second cluster "natsconn_tls" on 5433: ssl = on, hostssl + scram-sha-256
#                 only (plain TCP is refused by pg_hba)
#
# A throwaway CA, a server certificate (SAN IP:127.0.0.1 and DNS:natsconn.test, NOT
# localhost, so that connecting to "localhost" is a host-name mismatch), a client
# certificate, and a second, untrusted CA with its own server/client certificates are
# generated with openssl into $NATSCONN_STATE/tls (never into the repository).
# Credentials are fixed test values, printed by `scripts/services env`.

TLS_DIR="$NATSCONN_STATE/tls"

NATS_TLS_PORT="${NATSCONN_NATS_TLS_PORT:-4223}"
NATS_TLS_MONITOR_PORT="${NATSCONN_NATS_TLS_MONITOR_PORT:-8223}"
NATS_AUTH_PORT="${NATSCONN_NATS_AUTH_PORT:-4224}"
NATS_AUTH_MONITOR_PORT="${NATSCONN_NATS_AUTH_MONITOR_PORT:-8224}"   # /connz shows TLS per client
NATS_TOKEN_PORT="${NATSCONN_NATS_TOKEN_PORT:-4225}"
NATS_JWT_PORT="${NATSCONN_NATS_JWT_PORT:-4226}"
KAFKA_TLS_PORT="${NATSCONN_KAFKA_TLS_PORT:-9194}"
KAFKA_TLS_CONTROLLER_PORT="${NATSCONN_KAFKA_TLS_CONTROLLER_PORT:-9195}"
KAFKA_TLS_INTERNAL_PORT="${NATSCONN_KAFKA_TLS_INTERNAL_PORT:-9196}"
REDIS_TLS_PORT="${NATSCONN_REDIS_TLS_PORT:-6380}"
POSTGRES_TLS_PORT="${NATSCONN_POSTGRES_TLS_PORT:-5433}"

# Test credentials (throwaway, loopback only).
NATS_TLS_USER=natsconn-user
NATS_TLS_PASSWORD=natsconn-user-pw
NATS_TLS_TOKEN=natsconn-token-s3cret
KAFKA_TLS_USER=natsconn-tls
KAFKA_TLS_PASSWORD=natsconn-tls-pw
REDIS_TLS_USER=natsconn-tls
REDIS_TLS_PASSWORD=natsconn-tls-pw
REDIS_TLS_LIMITED_USER=natsconn-limited          # keys allowed:* only
REDIS_TLS_LIMITED_PASSWORD=natsconn-limited-pw
PG_TLS_CLUSTER=natsconn_tls
PG_TLS_ROLE=natsconn_tls
PG_TLS_PASSWORD=natsconn-tls-pw
PG_TLS_DB=natsconn

_tls_repo_python() {
  local py="$SVC_SCRIPT_DIR/../.venv/bin/python"
  [[ -x $py ]] || die "tls: $py is missing (run scripts/bootstrap): the nkeys package makes the NKey user"
  printf '%s\n' "$py"
}

# ------------------------------------------------------------------ certificates

# _tls_sign NAME CA SUBJECT EXT: key NAME.key, certificate NAME.pem signed by CA.
_tls_sign() {
  local name=$1 ca=$2 subject=$3 ext=$4 d=$TLS_DIR
  openssl req -new -newkey rsa:2048 -nodes -keyout "$d/$name.key" -subj "$subject" \
    -out "$d/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.pem" -CAkey "$d/$ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null
  rm -f "$d/$name.csr" "$d/$name.ext"
}

_tls_ca() {
  local name=$1 cn=$2
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=$cn" \
    -keyout "$TLS_DIR/$name.key" -out "$TLS_DIR/$name.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
}

# tls_certs: the CA and certificates, made once (kept across restarts).
tls_certs() {
  need_cmd openssl
  [[ -s $TLS_DIR/.complete ]] && return 0
  local server_ext client_ext
  mkdir -p "$TLS_DIR"
  chmod 700 "$TLS_DIR"
  server_ext=$'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:natsconn.test'
  client_ext=$'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  _tls_ca ca "natsconn test CA"
  _tls_sign server ca "/CN=natsconn.test" "$server_ext"
  _tls_sign client ca "/CN=natsconn-client" "$client_ext"
  # An unrelated CA nobody trusts, with certificates of its own.
  _tls_ca rogue-ca "rogue CA"
  _tls_sign rogue-server rogue-ca "/CN=natsconn.test" "$server_ext"
  _tls_sign rogue-client rogue-ca "/CN=natsconn-client" "$client_ext"
  # Kafka's PEM key store: the key (PKCS#8) followed by the certificate chain.
  cat "$TLS_DIR/server.key" "$TLS_DIR/server.pem" "$TLS_DIR/ca.pem" >"$TLS_DIR/server-keystore.pem"
  chmod 600 "$TLS_DIR"/*.key "$TLS_DIR/server-keystore.pem"
  date -u +%FT%TZ >"$TLS_DIR/.complete"
  say "tls: made a test CA and certificates in $TLS_DIR"
}

# ------------------------------------------------------------------ NATS variants

NATS_TLS_DIR="$NATSCONN_STATE/nats-tls"

# The NKey user: seed in nkey.seed, public key in nkey.pub (made once).
_nats_tls_nkey() {
  [[ -s $TLS_DIR/nkey.seed && -s $TLS_DIR/nkey.pub ]] && return 0
  "$(_tls_repo_python)" - "$TLS_DIR" <<'EOF'
import os, sys, nkeys
seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
pub = nkeys.from_seed(bytearray(seed)).public_key
d = sys.argv[1]
with open(os.path.join(d, "nkey.seed"), "wb") as f:
    f.write(seed)
with open(os.path.join(d, "nkey.pub"), "wb") as f:
    f.write(pub)
EOF
  chmod 600 "$TLS_DIR/nkey.seed"
}

# Operator mode with a user JWT, when nsc is there: operator, account, user, creds.
_nats_tls_jwt() {
  local nsc="$NATSCONN_BIN_DIR/nsc" home="$NATS_TLS_DIR/nsc" log="$SVC_LOG_DIR/nats-tls-nsc.log"
  [[ -x $nsc ]] || return 1
  [[ -s $TLS_DIR/user.creds && -s $NATS_TLS_DIR/jwt-resolver.conf ]] && return 0
  rm -rf "$home"
  mkdir -p "$home"
  if ! (
    export NKEYS_PATH="$home/keys" NSC_HOME="$home/home"
    "$nsc" env -s "$home/store" >/dev/null 2>&1 || true
    "$nsc" --data-dir "$home/store" add operator --generate-signing-key --sys --name natsconn_op
    "$nsc" --data-dir "$home/store" add account natsconn_acc
    "$nsc" --data-dir "$home/store" add user --account natsconn_acc natsconn_jwt_user
    "$nsc" --data-dir "$home/store" generate creds --account natsconn_acc \
      --name natsconn_jwt_user --output-file "$TLS_DIR/user.creds"
    "$nsc" --data-dir "$home/store" generate config --mem-resolver \
      --config-file "$NATS_TLS_DIR/jwt-resolver.conf"
  ) >>"$log" 2>&1; then
    warn "nats-tls: nsc could not make the operator/account/user (see $log); no JWT server"
    return 1
  fi
  chmod 600 "$TLS_DIR/user.creds"
}

_nats_tls_write_configs() {
  local d=$NATS_TLS_DIR t=$TLS_DIR
  mkdir -p "$d/jetstream"
  cat >"$d/tls.conf" <<EOF
# Generated by scripts/services (nats-tls) -- overwritten on every start.
server_name: natsconn_tls
listen: $SVC_HOST:$NATS_TLS_PORT
http: $SVC_HOST:$NATS_TLS_MONITOR_PORT
pid_file: "$d/tls.pid"
tls {
  cert_file: "$t/server.pem"
  key_file: "$t/server.key"
  ca_file: "$t/ca.pem"
  verify: true
  timeout: 3
}
jetstream {
  store_dir: "$d/jetstream"
  max_memory_store: 64MB
  max_file_store: 512MB
}
EOF
  cat >"$d/auth.conf" <<EOF
# Generated by scripts/services (nats-tls) -- overwritten on every start.
server_name: natsconn_auth
listen: $SVC_HOST:$NATS_AUTH_PORT
http: $SVC_HOST:$NATS_AUTH_MONITOR_PORT
pid_file: "$d/auth.pid"
# TLS offered but not required: a client configured for TLS must upgrade (natsconn
# does), a plain client still connects.
tls {
  cert_file: "$t/server.pem"
  key_file: "$t/server.key"
}
allow_non_tls: true
authorization {
  users: [
    { user: "$NATS_TLS_USER", password: "$NATS_TLS_PASSWORD" }
    { nkey: "$(cat "$t/nkey.pub")" }
  ]
}
EOF
  cat >"$d/token.conf" <<EOF
# Generated by scripts/services (nats-tls) -- overwritten on every start.
server_name: natsconn_token
listen: $SVC_HOST:$NATS_TOKEN_PORT
pid_file: "$d/token.pid"
authorization { token: "$NATS_TLS_TOKEN" }
EOF
  if [[ -s $d/jwt-resolver.conf ]]; then
    cat >"$d/jwt.conf" <<EOF
# Generated by scripts/services (nats-tls) -- overwritten on every start.
server_name: natsconn_jwt
listen: $SVC_HOST:$NATS_JWT_PORT
pid_file: "$d/jwt.pid"
include "jwt-resolver.conf"
EOF
  fi
}

# The NATS variants as "name:port" words (jwt only with nsc).
_nats_tls_variants() {
  local v="tls:$NATS_TLS_PORT auth:$NATS_AUTH_PORT token:$NATS_TOKEN_PORT"
  [[ -s $NATS_TLS_DIR/jwt.conf ]] && v+=" jwt:$NATS_JWT_PORT"
  printf '%s\n' "$v"
}

nats_tls_installed() { nats_installed; }
nats_tls_install() { nats_install; }

nats_tls_start() {
  local t v name port pid log
  t=$(now_ms)
  tls_certs
  mkdir -p "$NATS_TLS_DIR"
  _nats_tls_nkey
  _nats_tls_jwt || true
  _nats_tls_write_configs
  for v in $(_nats_tls_variants); do
    name=${v%%:*} port=${v##*:} log="$NATS_TLS_DIR/$name.log"
    if pid=$(pidfile_pid "$NATS_TLS_DIR/$name.pid" nats-server); then
      continue
    fi
    check_ports_free "nats-tls ($name)" "$port"
    rotate_log "$log"
    spawn_detached "$log" "$NATSCONN_BIN_DIR/nats-server" -c "$NATS_TLS_DIR/$name.conf"
    echo "$SPAWNED_PID" >"$NATS_TLS_DIR/$name.pid"
    if ! wait_for 20 "$SPAWNED_PID" "$log" "nats-tls ($name)" tcp_open "$port"; then
      stop_pid "$SPAWNED_PID" 10 "nats-tls ($name)"
      die "nats-tls: $name server failed to start (log: $log)"
    fi
  done
  say "nats-tls: running ($(_nats_tls_variants)) in $(elapsed "$t")"
}

nats_tls_stop() {
  local v name pid
  for v in $(_nats_tls_variants); do
    name=${v%%:*}
    if pid=$(pidfile_pid "$NATS_TLS_DIR/$name.pid" nats-server); then
      stop_pid "$pid" 20 "nats-tls ($name)"
    fi
    rm -f "$NATS_TLS_DIR/$name.pid"
  done
  say "nats-tls: stopped"
}

nats_tls_status_line() {
  local v name port rc=0 up=() down=()
  for v in $(_nats_tls_variants); do
    name=${v%%:*} port=${v##*:}
    if pidfile_pid "$NATS_TLS_DIR/$name.pid" nats-server >/dev/null && tcp_open "$port"; then
      up+=("$name:$port")
    else
      down+=("$name:$port"); rc=1
    fi
  done
  printf '%-12s %s  up: %s%s\n' nats-tls "$([[ $rc -eq 0 ]] && echo running || echo stopped)" \
    "${up[*]:-none}" "${down:+  down: ${down[*]}}"
  return "$rc"
}

# ------------------------------------------------------------------ Kafka SASL_SSL broker

KAFKA_TLS_DIR="$NATSCONN_STATE/kafka-tls"
KAFKA_TLS_CONF="$KAFKA_TLS_DIR/server.properties"
KAFKA_TLS_LOG4J="$KAFKA_TLS_DIR/log4j2.properties"
KAFKA_TLS_PID="$KAFKA_TLS_DIR/kafka.pid"
KAFKA_TLS_LOG="$KAFKA_TLS_DIR/server.log"
KAFKA_TLS_OUT="$KAFKA_TLS_DIR/stdout.log"

kafka_tls_installed() { kafka_installed; }
kafka_tls_install() { kafka_install; }
kafka_tls_pid() { pidfile_pid "$KAFKA_TLS_PID" "$KAFKA_TLS_CONF"; }

_kafka_tls_write_config() {
  local d=$KAFKA_TLS_DIR t=$TLS_DIR
  mkdir -p "$d/data"
  cat >"$KAFKA_TLS_CONF" <<EOF
# Generated by scripts/services (kafka-tls) -- overwritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$SVC_HOST:$KAFKA_TLS_CONTROLLER_PORT
listeners=SASL_SSL://$SVC_HOST:$KAFKA_TLS_PORT,CONTROLLER://$SVC_HOST:$KAFKA_TLS_CONTROLLER_PORT,INTERNAL://$SVC_HOST:$KAFKA_TLS_INTERNAL_PORT
advertised.listeners=SASL_SSL://$SVC_HOST:$KAFKA_TLS_PORT,INTERNAL://$SVC_HOST:$KAFKA_TLS_INTERNAL_PORT
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$t/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$t/ca.pem
ssl.client.auth=none
EOF
  _kafka_common_properties 1 "$d/data" 16777216 >>"$KAFKA_TLS_CONF"
  _kafka_write_log4j "$KAFKA_TLS_LOG4J" "$KAFKA_TLS_LOG" kafka-tls
}

_kafka_tls_format() {
  _kafka_format_storage kafka-tls "$KAFKA_TLS_DIR/data" "$KAFKA_TLS_CONF" "$KAFKA_TLS_LOG4J" \
    "$KAFKA_TLS_DIR/cluster.id" "$KAFKA_TLS_USER" "$KAFKA_TLS_PASSWORD"
}

kafka_tls_ready() {
  grep -q 'Kafka Server started' "$KAFKA_TLS_LOG" 2>/dev/null && tcp_open "$KAFKA_TLS_PORT"
}

kafka_tls_start() {
  local pid t
  tls_certs
  if pid=$(kafka_tls_pid); then
    wait_for "${NATSCONN_KAFKA_START_TIMEOUT:-90}" "$pid" "$KAFKA_TLS_LOG" kafka-tls kafka_tls_ready \
      || die "kafka-tls: running (pid $pid) but not ready"
    say "kafka-tls: already running (pid $pid, SASL_SSL $SVC_HOST:$KAFKA_TLS_PORT)"
    return 0
  fi
  check_ports_free kafka-tls "$KAFKA_TLS_PORT" "$KAFKA_TLS_CONTROLLER_PORT" "$KAFKA_TLS_INTERNAL_PORT"
  t=$(now_ms)
  mkdir -p "$KAFKA_TLS_DIR"
  _kafka_tls_write_config
  _kafka_tls_format
  rotate_log "$KAFKA_TLS_LOG"
  rotate_log "$KAFKA_TLS_OUT"
  # shellcheck disable=SC2086  # a word list on purpose
  spawn_detached "$KAFKA_TLS_OUT" "${NATSCONN_JAVA:-java}" \
    ${NATSCONN_KAFKA_TLS_JVM_OPTS:--Xms128m -Xmx512m} \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_TLS_LOG4J" -Dkafka.logs.dir="$KAFKA_TLS_DIR" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_TLS_CONF"
  pid=$SPAWNED_PID
  echo "$pid" >"$KAFKA_TLS_PID"
  if ! wait_for "${NATSCONN_KAFKA_START_TIMEOUT:-90}" "$pid" "$KAFKA_TLS_LOG" kafka-tls kafka_tls_ready; then
    [[ -s $KAFKA_TLS_OUT ]] && log_tail "$KAFKA_TLS_OUT" 15
    stop_pid "$pid" 15 kafka-tls
    die "kafka-tls: failed to start (log: $KAFKA_TLS_LOG)"
  fi
  say "kafka-tls: started in $(elapsed "$t") (pid $pid, SASL_SSL $SVC_HOST:$KAFKA_TLS_PORT)"
}

kafka_tls_stop() {
  local pid
  if pid=$(kafka_tls_pid); then
    stop_pid "$pid" "${NATSCONN_KAFKA_STOP_TIMEOUT:-60}" kafka-tls
    say "kafka-tls: stopped"
  else
    say "kafka-tls: not running"
  fi
  rm -f "$KAFKA_TLS_PID"
}

kafka_tls_status_line() {
  local pid
  if pid=$(kafka_tls_pid) && kafka_tls_ready; then
    printf '%-12s running  SASL_SSL %s:%s  pid %s\n' kafka-tls "$SVC_HOST" "$KAFKA_TLS_PORT" "$pid"
  else
    printf '%-12s stopped  SASL_SSL %s:%s\n' kafka-tls "$SVC_HOST" "$KAFKA_TLS_PORT"
    return 1
  fi
}

# ------------------------------------------------------------------ Redis TLS + ACL

REDIS_TLS_DIR="$NATSCONN_STATE/redis-tls"
REDIS_TLS_CONF="$REDIS_TLS_DIR/redis.conf"
REDIS_TLS_PID="$REDIS_TLS_DIR/redis.pid"
REDIS_TLS_LOG="$REDIS_TLS_DIR/redis.log"

redis_tls_installed() { redis_installed; }
redis_tls_install() { redis_install; }
redis_tls_pid() { pidfile_pid "$REDIS_TLS_PID" redis-server; }

redis_tls_ready() {
  [[ $(redis-cli --tls --cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/client.pem" \
        --key "$TLS_DIR/client.key" -h "$SVC_HOST" -p "$REDIS_TLS_PORT" \
        --user "$REDIS_TLS_USER" --pass "$REDIS_TLS_PASSWORD" --no-auth-warning ping 2>/dev/null) == PONG ]]
}

_redis_tls_write_config() {
  local t=$TLS_DIR
  mkdir -p "$REDIS_TLS_DIR/data"
  cat >"$REDIS_TLS_CONF" <<EOF
# Generated by scripts/services (redis-tls) -- overwritten on every start.
bind $SVC_HOST
port 0
tls-port $REDIS_TLS_PORT
tls-cert-file $t/server.pem
tls-key-file $t/server.key
tls-ca-cert-file $t/ca.pem
tls-auth-clients yes
protected-mode yes
daemonize yes
pidfile $REDIS_TLS_PID
logfile $REDIS_TLS_LOG
dir $REDIS_TLS_DIR/data
save ""
# AOF, so that a restart (the fault matrix restarts this server) keeps the data.
appendonly yes
appendfilename "appendonly.aof"
appendfsync everysec
maxmemory 128mb
maxmemory-policy noeviction
user default off
user $REDIS_TLS_USER on >$REDIS_TLS_PASSWORD ~* &* +@all
user $REDIS_TLS_LIMITED_USER on >$REDIS_TLS_LIMITED_PASSWORD ~allowed:* &allowed:* +@all -@dangerous
EOF
}

redis_tls_start() {
  local pid t
  tls_certs
  if pid=$(redis_tls_pid); then
    wait_for 20 "$pid" "$REDIS_TLS_LOG" redis-tls redis_tls_ready || die "redis-tls: not answering"
    say "redis-tls: already running (pid $pid, TLS $SVC_HOST:$REDIS_TLS_PORT)"
    return 0
  fi
  check_ports_free redis-tls "$REDIS_TLS_PORT"
  t=$(now_ms)
  _redis_tls_write_config
  rotate_log "$REDIS_TLS_LOG"
  redis-server "$REDIS_TLS_CONF" </dev/null >>"$REDIS_TLS_LOG" 2>&1 9>&- \
    || { log_tail "$REDIS_TLS_LOG"; die "redis-tls: redis-server failed to launch"; }
  wait_for 10 "" "$REDIS_TLS_LOG" "redis-tls (pid file)" redis_tls_pid || die "redis-tls: no pid file"
  pid=$(redis_tls_pid)
  if ! wait_for 20 "$pid" "$REDIS_TLS_LOG" redis-tls redis_tls_ready; then
    stop_pid "$pid" 10 redis-tls
    die "redis-tls: failed to start (log: $REDIS_TLS_LOG)"
  fi
  say "redis-tls: started in $(elapsed "$t") (pid $pid, TLS $SVC_HOST:$REDIS_TLS_PORT)"
}

redis_tls_stop() {
  local pid
  if pid=$(redis_tls_pid); then
    stop_pid "$pid" 10 redis-tls
    say "redis-tls: stopped"
  else
    say "redis-tls: not running"
  fi
  rm -f "$REDIS_TLS_PID"
}

redis_tls_status_line() {
  local pid
  if pid=$(redis_tls_pid) && redis_tls_ready; then
    printf '%-12s running  rediss://%s:%s/0  pid %s\n' redis-tls "$SVC_HOST" "$REDIS_TLS_PORT" "$pid"
  else
    printf '%-12s stopped  rediss://%s:%s/0\n' redis-tls "$SVC_HOST" "$REDIS_TLS_PORT"
    return 1
  fi
}

# ------------------------------------------------------------------ PostgreSQL SSL cluster

postgres_tls_installed() { postgres_installed; }
postgres_tls_install() { postgres_install; }

_pg_tls_etc() { printf '/etc/postgresql/%s/%s\n' "$(_pg_version)" "$PG_TLS_CLUSTER"; }

_pg_tls_line() { pg_lsclusters -h "$(_pg_version)" "$PG_TLS_CLUSTER" 2>/dev/null | head -n1; }

postgres_tls_pid() {
  local line datadir pid
  line=$(_pg_tls_line); [[ -n $line ]] || return 1
  datadir=$(awk '{print $6}' <<<"$line")
  pid=$(as_root head -n1 "$datadir/postmaster.pid" 2>/dev/null | tr -dc '0-9') || return 1
  pid_matches "$pid" postgres || return 1
  printf '%s\n' "$pid"
}

postgres_tls_ready() { pg_isready -q -h "$SVC_HOST" -p "$POSTGRES_TLS_PORT" -t 2; }

_pg_tls_psql() {
  (cd / && as_user postgres psql --cluster "$(_pg_version)/$PG_TLS_CLUSTER" -X -q \
    -v ON_ERROR_STOP=1 -d postgres -tA "$@")
}

# The server's key and certificate must be readable by the postgres user, which
# cannot reach $NATSCONN_STATE: copies live in the cluster's config directory.
_pg_tls_install_certs() {
  local etc; etc=$(_pg_tls_etc)
  as_root install -o postgres -g postgres -m 0644 "$TLS_DIR/server.pem" "$etc/server.crt"
  as_root install -o postgres -g postgres -m 0600 "$TLS_DIR/server.key" "$etc/server.key"
  as_root install -o postgres -g postgres -m 0644 "$TLS_DIR/ca.pem" "$etc/root.crt"
}

_pg_tls_create() {
  local v etc log="$SVC_LOG_DIR/postgres-tls-createcluster.log"
  v=$(_pg_version)
  [[ -n $(_pg_tls_line) ]] && return 0
  as_root pg_createcluster "$v" "$PG_TLS_CLUSTER" -p "$POSTGRES_TLS_PORT" --start-conf=manual \
    --locale C.UTF-8 -e UTF8 -- --auth-local=peer --auth-host=scram-sha-256 >>"$log" 2>&1 9>&- \
    || { log_tail "$log"; die "postgres-tls: pg_createcluster failed (see $log)"; }
  say "postgres-tls: created cluster $v/$PG_TLS_CLUSTER on $SVC_HOST:$POSTGRES_TLS_PORT"
}

_pg_tls_write_config() {
  local etc; etc=$(_pg_tls_etc)
  # SSL only over TCP: a plain (hostnossl) connection has no pg_hba line and is refused.
  as_root tee "$etc/pg_hba.conf" >/dev/null <<'EOF'
# Generated by scripts/services (postgres-tls).
# TYPE    DATABASE  USER  ADDRESS        METHOD
local     all       all                  peer
hostssl   all       all   127.0.0.1/32   scram-sha-256
EOF
  as_root tee "$etc/conf.d/natsconn-tls.conf" >/dev/null <<EOF
# Generated by scripts/services (postgres-tls).
listen_addresses = '$SVC_HOST'
port = $POSTGRES_TLS_PORT
ssl = on
ssl_cert_file = '$etc/server.crt'
ssl_key_file = '$etc/server.key'
ssl_ca_file = '$etc/root.crt'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
max_connections = 50
shared_buffers = 32MB
EOF
}

postgres_tls_start() {
  local v pid t out
  v=$(_pg_version)
  [[ -n $v ]] || die "postgres-tls: no PostgreSQL server installed"
  tls_certs
  if pid=$(postgres_tls_pid); then
    wait_for 30 "$pid" /dev/null postgres-tls postgres_tls_ready || die "postgres-tls: not ready"
    say "postgres-tls: already running (pid $pid, SSL $SVC_HOST:$POSTGRES_TLS_PORT)"
    return 0
  fi
  check_ports_free postgres-tls "$POSTGRES_TLS_PORT"
  t=$(now_ms)
  _pg_tls_create
  _pg_tls_install_certs
  _pg_tls_write_config
  if ! out=$(as_root pg_ctlcluster "$v" "$PG_TLS_CLUSTER" start </dev/null 2>&1 9>&-); then
    printf '%s\n' "$out" >>"$SVC_LOG_DIR/postgres-tls-ctl.log"
    die "postgres-tls: pg_ctlcluster start failed: $out"
  fi
  pid=$(postgres_tls_pid) || true
  wait_for 60 "$pid" /dev/null postgres-tls postgres_tls_ready || die "postgres-tls: not accepting connections"
  _pg_tls_psql >/dev/null <<EOF
DO \$\$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_TLS_ROLE') THEN
    CREATE ROLE $PG_TLS_ROLE LOGIN PASSWORD '$PG_TLS_PASSWORD';
  END IF;
END\$\$;
EOF
  if [[ -z $(_pg_tls_psql -c "SELECT 1 FROM pg_database WHERE datname = '$PG_TLS_DB'") ]]; then
    _pg_tls_psql -c "CREATE DATABASE $PG_TLS_DB OWNER $PG_TLS_ROLE" >/dev/null
  fi
  say "postgres-tls: started in $(elapsed "$t") (pid $pid, SSL $SVC_HOST:$POSTGRES_TLS_PORT)"
}

postgres_tls_stop() {
  if [[ -n $(_pg_version) ]] && postgres_tls_pid >/dev/null; then
    as_root pg_ctlcluster "$(_pg_version)" "$PG_TLS_CLUSTER" stop -m fast </dev/null \
      >>"$SVC_LOG_DIR/postgres-tls-ctl.log" 2>&1 9>&- || die "postgres-tls: stop failed"
    say "postgres-tls: stopped"
  else
    say "postgres-tls: not running"
  fi
}

postgres_tls_status_line() {
  local pid
  if pid=$(postgres_tls_pid) && postgres_tls_ready; then
    printf '%-12s running  postgresql://%s@%s:%s/%s (SSL only)  pid %s\n' postgres-tls \
      "$PG_TLS_ROLE" "$SVC_HOST" "$POSTGRES_TLS_PORT" "$PG_TLS_DB" "$pid"
  else
    printf '%-12s stopped  %s:%s\n' postgres-tls "$SVC_HOST" "$POSTGRES_TLS_PORT"
    return 1
  fi
}

# ------------------------------------------------------------------ env

tls_env() {
  cat <<EOF
export NATSCONN_TLS_DIR=$TLS_DIR
export NATS_TLS_URL=tls://$SVC_HOST:$NATS_TLS_PORT
export NATS_AUTH_URL=nats://$SVC_HOST:$NATS_AUTH_PORT
export NATS_TOKEN_URL=nats://$SVC_HOST:$NATS_TOKEN_PORT
export NATS_JWT_URL=nats://$SVC_HOST:$NATS_JWT_PORT
export KAFKA_SSL_BOOTSTRAP=$SVC_HOST:$KAFKA_TLS_PORT
export REDIS_TLS_URL=rediss://$SVC_HOST:$REDIS_TLS_PORT/0
export POSTGRES_TLS_DSN=postgresql://$PG_TLS_ROLE:$PG_TLS_PASSWORD@$SVC_HOST:$POSTGRES_TLS_PORT/$PG_TLS_DB
EOF
}
