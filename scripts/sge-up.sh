#!/usr/bin/env bash
# Start a one-node Grid Engine (SGE 8.1, Debian's gridengine) cluster on this host: qmaster,
# execd and a queue all.q of 8 slots, for sfxflow's SGE test. Idempotent: when a test job runs,
# it changes nothing. Installs gridengine with apt-get when absent (needs root).
#   usage: scripts/sge-up.sh            start (or confirm) the cluster
#          scripts/sge-up.sh --down     stop the daemons
# Exit status: 0 up; 1 could not start (the reason is printed; the SGE test then skips).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
HOST="$(hostname)"
QMASTER_PID=/var/spool/gridengine/qmaster/qmaster.pid
t0=$SECONDS

say() { echo "sge-up: $*"; }
fail() { echo "sge-up: FAILED: $*" >&2; exit 1; }
# a pid file names a live daemon of ours (not a reused pid after an unclean stop)
alive() { [[ -s "$1" ]] && [[ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" == sge_* ]]; }
execd_pid() { echo "/var/spool/gridengine/execd/$1/execd.pid"; }
job_runs() { timeout 90 qsub -sync y -b y -j y -o /dev/null -q all.q /bin/true >/dev/null 2>&1; }

if [[ "${1:-}" == "--down" ]]; then
    for f in "$(execd_pid "$HOST")" "$(execd_pid localhost)" "$QMASTER_PID"; do
        if alive "$f"; then
            pid="$(cat "$f")"
            kill "$pid"
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            say "stopped pid $pid"
        fi
    done
    exit 0
fi

[[ "$(id -u)" == 0 ]] || fail "needs root (it installs packages and starts system daemons)"

if ! command -v sge_qmaster >/dev/null; then
    say "installing gridengine with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    debconf-set-selections <<EOF
gridengine-common shared/gridenginemaster string $HOST
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridengineconfig boolean true
gridengine-client shared/gridenginemaster string $HOST
EOF
    # shellcheck source=scripts/apt-install.sh
    source "$HERE/apt-install.sh"
    apt_install 600 gridengine-master gridengine-exec gridengine-client \
        || fail "the packages could not be installed (above)"
fi
[[ -d "$SGE_ROOT/$SGE_CELL/common" ]] || fail "no cell $SGE_ROOT/$SGE_CELL (gridengine's set-up did not run)"

if alive "$QMASTER_PID" && timeout 10 qstat -f 2>/dev/null | grep -q "^all.q@" && job_runs; then
    say "already up ($(qstat -f | grep '^all.q@' | awk '{print $1, $3}') slots); nothing to do"
    exit 0
fi

# the host's name resolves to 127.0.0.1, which resolves back to "localhost": one host for SGE
if [[ "$HOST" != localhost ]]; then echo "$HOST localhost" > "$SGE_ROOT/$SGE_CELL/common/host_aliases"; fi

if ! alive "$QMASTER_PID"; then
    timeout 60 /usr/sbin/sge_qmaster || fail "sge_qmaster did not start (see /var/spool/gridengine/qmaster/messages)"
    say "sge_qmaster started"
fi
for _ in $(seq 30); do timeout 5 qconf -sh >/dev/null 2>&1 && break; sleep 1; done
timeout 10 qconf -sh >/dev/null || fail "qmaster does not answer (see /var/spool/gridengine/qmaster/messages)"

# root submits the test jobs: allow uid/gid 0 (the default minimum is 1000)
conf="$(mktemp -d)"
trap 'rm -rf "$conf"' EXIT
timeout 10 qconf -sconf global > "$conf/global"
if grep -qE '^min_(uid|gid) +[1-9]' "$conf/global"; then
    sed -i -E 's/^(min_uid|min_gid)( +).*/\1\20/' "$conf/global"
    timeout 10 qconf -Mconf "$conf/global" >/dev/null
fi
timeout 10 qconf -ss 2>/dev/null | grep -qx "$HOST" || timeout 10 qconf -as "$HOST" >/dev/null
if ! timeout 10 qconf -sel 2>/dev/null | grep -qx "$HOST"; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' \
        "$HOST" > "$conf/exec"
    timeout 10 qconf -Ae "$conf/exec" >/dev/null
fi
if ! timeout 10 qconf -shgrpl 2>/dev/null | grep -qx "@allhosts"; then
    printf 'group_name @allhosts\nhostlist %s\n' "$HOST" > "$conf/hgrp"
    timeout 10 qconf -Ahgrp "$conf/hgrp" >/dev/null
fi
if ! timeout 10 qconf -sql 2>/dev/null | grep -qx "all.q"; then
    timeout 10 qconf -Aq "$HERE/sge/all.q" >/dev/null
fi

# execd reads the global configuration when it starts: (re)start it after the change above
for f in "$(execd_pid "$HOST")" "$(execd_pid localhost)"; do
    if alive "$f"; then
        pid="$(cat "$f")"
        kill "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
done
timeout 60 /usr/sbin/sge_execd || fail "sge_execd did not start"
say "sge_execd started"
for _ in $(seq 30); do
    timeout 5 qstat -f 2>/dev/null | grep "^all.q@" | grep -qv -- "-NA-" && break
    sleep 1
done
timeout 10 qmod -c all.q >/dev/null 2>&1 || true  # clear an error state left by an earlier run
job_runs || fail "a test job did not run (qstat -f: $(qstat -f 2>&1 | tail -n +3 | head -n 3))"
say "up in $((SECONDS - t0)) s: queue all.q on $HOST, test job ran"
