#!/usr/bin/env bash
# Installs the real servers that Meterline's integration tests start (see testkit/):
#   * ClickHouse server + client from Debian's package (18.16.1 on bookworm);
#   * Apache Kafka 4.1.1's jars, copied once by Maven from Maven Central and cached under
#     ${METERLINE_CACHE:-$HOME/.cache/meterline}/kafka-4.1.1/libs (testkit runs them with java);
#   * Prometheus and promtool from Debian's package (2.42 on bookworm);
#   * boto3 1.44.x (the AWS SDK for Python) in a virtualenv cached under
#     ${METERLINE_CACHE:-$HOME/.cache/meterline}/boto3-venv, for tests/it/boto3.rs.
# Idempotent: anything already present and working is reused, so running it again is cheap.
# Tests never use the ClickHouse system service; testkit starts its own server processes on
# free loopback ports, so the service is kept from starting during the package install.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${METERLINE_CACHE:-$HOME/.cache/meterline}"
# Kept in step with testkit/kafka/pom.xml, testkit/src/bins.rs and deploy/compose.yaml.
KAFKA_VERSION="4.1.1"
KAFKA_ROOT="$CACHE/kafka-$KAFKA_VERSION"

step() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Installs Debian packages ($2…) for step $1 without letting their postinst start a system
# service (tests start their own servers): a policy-rc.d is added only when none exists, and
# exactly what was added is removed. Stale lists are refreshed once and the install retried.
apt_install_without_starting() {
    local name="$1" added_policy=""
    shift
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        added_policy="yes"
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    step "$name: installing $* with apt-get"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        # Stale lists point at package versions the mirror no longer has: refresh once, retry.
        step "$name: install failed, running apt-get update and retrying once"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
    if [ -n "$added_policy" ]; then
        as_root rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
}

# Path of a working ClickHouse server binary, or nothing.
find_clickhouse() {
    local candidate
    # Debian's 18.16 package ships /usr/sbin/clickhouse-server (libclickhouse.so holds the code);
    # upstream packages ship the multi-call /usr/bin/clickhouse with a clickhouse-server symlink.
    for candidate in "${METERLINE_CLICKHOUSE_BIN:-}" /usr/bin/clickhouse /usr/bin/clickhouse-server \
        /usr/sbin/clickhouse-server; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# The package's candidate version is known only after an `apt-get update` has fetched lists.
# (The output is captured first: `grep -q` closing the pipe early would trip pipefail.)
apt_knows_clickhouse() {
    local policy
    policy="$(apt-cache policy clickhouse-server 2>/dev/null || true)"
    case "$policy" in
        *"Candidate: "[0-9]*) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# 1. ClickHouse
# ---------------------------------------------------------------------------------------------
if CLICKHOUSE_BIN="$(find_clickhouse)"; then
    step "clickhouse: found $CLICKHOUSE_BIN, skipping install"
else
    command -v apt-get >/dev/null 2>&1 || die "clickhouse is missing and apt-get is not available; install clickhouse-server and set METERLINE_CLICKHOUSE_BIN"
    if apt_knows_clickhouse; then
        step "clickhouse: apt lists already know clickhouse-server, skipping apt-get update"
    else
        step "clickhouse: running apt-get update"
        as_root apt-get update -qq
    fi

    apt_install_without_starting clickhouse clickhouse-server clickhouse-client

    CLICKHOUSE_BIN="$(find_clickhouse)" || die "clickhouse-server installed but none of /usr/bin/clickhouse, /usr/bin/clickhouse-server, /usr/sbin/clickhouse-server found"
    step "clickhouse: installed $CLICKHOUSE_BIN"
fi

# The 18.16 server binary has no --version flag; ask the multi-call binary, the client, or dpkg.
CLICKHOUSE_VERSION=""
if [ "$(basename "$CLICKHOUSE_BIN")" = "clickhouse" ]; then
    CLICKHOUSE_VERSION="$("$CLICKHOUSE_BIN" server --version 2>/dev/null | head -n1 || true)"
fi
if [ -z "$CLICKHOUSE_VERSION" ] && command -v clickhouse-client >/dev/null 2>&1; then
    CLICKHOUSE_VERSION="$(clickhouse-client --version 2>/dev/null | head -n1 || true)"
fi
if [ -z "$CLICKHOUSE_VERSION" ] && command -v dpkg-query >/dev/null 2>&1; then
    CLICKHOUSE_VERSION="clickhouse-server package $(dpkg-query -W -f='${Version}' clickhouse-server 2>/dev/null || true)"
fi
step "clickhouse: $CLICKHOUSE_VERSION"

# ---------------------------------------------------------------------------------------------
# 2. Apache Kafka (KRaft), resolved from Maven Central by testkit/kafka/pom.xml into the cache.
#    testkit runs it as `java -cp "$KAFKA_LIBS/*" kafka.Kafka` after Kafka's own StorageTool
#    formats the node. The folder is complete once the marker file exists, so an interrupted
#    copy is redone rather than trusted.
# ---------------------------------------------------------------------------------------------
KAFKA_LIBS="$KAFKA_ROOT/libs"
if [ -f "$KAFKA_ROOT/.complete" ] && [ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]; then
    step "kafka: found $KAFKA_LIBS, skipping download"
else
    command -v mvn >/dev/null 2>&1 || die "Maven (mvn) is needed to fetch Apache Kafka $KAFKA_VERSION from Maven Central"
    command -v java >/dev/null 2>&1 || die "Java 17 or newer is needed to run Apache Kafka $KAFKA_VERSION"
    rm -rf "$KAFKA_ROOT"
    mkdir -p "$KAFKA_LIBS"
    step "kafka: copying Apache Kafka $KAFKA_VERSION and its dependencies with Maven into $KAFKA_LIBS"
    if ! mvn -q -B -f testkit/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
        -Dkafka.version="$KAFKA_VERSION" -DoutputDirectory="$KAFKA_LIBS" >"$CACHE/kafka-maven.log" 2>&1; then
        tail -n 30 "$CACHE/kafka-maven.log" >&2 || true
        die "mvn could not resolve Apache Kafka $KAFKA_VERSION (full log: $CACHE/kafka-maven.log)"
    fi
    [ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] || die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is not in $KAFKA_LIBS"
    touch "$KAFKA_ROOT/.complete"
    step "kafka: installed $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars"
fi
step "kafka: $(java -version 2>&1 | head -n1), Apache Kafka $KAFKA_VERSION"

# ---------------------------------------------------------------------------------------------
# 3. Prometheus (server + promtool) from Debian's package: tests/it/observability.rs scrapes the
#    pipeline with a real server; scripts/test.sh runs `promtool check/test rules`. The package's
#    service is kept from starting, as for ClickHouse (testkit starts its own on loopback).
# ---------------------------------------------------------------------------------------------
if [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; then
    step "prometheus: found /usr/bin/prometheus and /usr/bin/promtool, skipping install"
else
    command -v apt-get >/dev/null 2>&1 || die "prometheus is missing and apt-get is not available; install Debian's prometheus package"
    apt_install_without_starting prometheus prometheus
    [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ] || die "prometheus installed but /usr/bin/prometheus or /usr/bin/promtool is missing"
fi
step "prometheus: $(/usr/bin/prometheus --version 2>&1 | head -n1)"

# ---------------------------------------------------------------------------------------------
# 4. boto3 in a virtualenv: tests/it/boto3.rs runs tests/boto3/metering_calls.py with it against
#    `meterline serve` (a second, independent AWS client beside the Rust SDK). Reused when the
#    venv already imports a 1.44 boto3; otherwise (re)created and installed from PyPI.
# ---------------------------------------------------------------------------------------------
BOTO3_SPEC="boto3==1.44.*"
BOTO3_VENV="$CACHE/boto3-venv"
boto3_works() {
    "$BOTO3_VENV/bin/python" -c 'import boto3, sys; sys.exit(0 if boto3.__version__.startswith("1.44.") else 1)' 2>/dev/null
}
if boto3_works; then
    step "boto3: found $BOTO3_VENV, skipping install"
else
    command -v python3 >/dev/null 2>&1 || die "python3 is needed for the boto3 test client"
    if ! python3 -m venv --help >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "python3 has no venv module and apt-get is not available"
        apt_install_without_starting python3-venv python3-venv
    fi
    rm -rf "$BOTO3_VENV"
    mkdir -p "$CACHE"
    python3 -m venv "$BOTO3_VENV" || die "could not create $BOTO3_VENV"
    step "boto3: installing $BOTO3_SPEC into $BOTO3_VENV"
    "$BOTO3_VENV/bin/pip" install --quiet --disable-pip-version-check "$BOTO3_SPEC" || die "pip install $BOTO3_SPEC failed"
    boto3_works || die "boto3 was installed but does not import as 1.44.x"
fi
step "boto3: $("$BOTO3_VENV/bin/python" -c 'import boto3, botocore; print("boto3", boto3.__version__, "botocore", botocore.__version__)')"

# ---------------------------------------------------------------------------------------------
# 5. Summary: how testkit finds the binaries (these are also its defaults).
# ---------------------------------------------------------------------------------------------
step "done; testkit finds these by default, or export them explicitly:"
printf 'export METERLINE_KAFKA_LIBS=%q\n' "$KAFKA_LIBS"
printf 'export METERLINE_CLICKHOUSE_BIN=%q\n' "$CLICKHOUSE_BIN"
printf 'export METERLINE_PROMETHEUS_BIN=%q\n' /usr/bin/prometheus
