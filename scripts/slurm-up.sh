#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munge, slurmctld, slurmd) from
# scripts/slurm/slurm.conf, for sfxflow's Slurm tests. Idempotent: when the node already answers,
# it does nothing. Installs slurm-wlm and munge with apt-get when they are absent (needs root).
#   usage: scripts/slurm-up.sh            start (or confirm) the cluster
#          scripts/slurm-up.sh --down     stop the daemons this script started
# Exit status: 0 up; 1 could not start (the reason is printed; the Slurm tests then skip).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF_SRC="$HERE/slurm/slurm.conf"
CONF=/etc/slurm/slurm.conf
MARKER="sfxflow-test-cluster"
RUN=/run/sfxflow-slurm
t0=$SECONDS

say() { echo "slurm-up: $*"; }
fail() { echo "slurm-up: FAILED: $*" >&2; exit 1; }

node_ready() {
    local state
    state="$(timeout 10 sinfo -h -n localhost -o %T 2>/dev/null | head -n1)" || return 1
    [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]]
}

# a pid file names a live daemon of ours (not a reused pid after an unclean stop)
alive() { [[ -s "$1" ]] && [[ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" == "$2" ]]; }

stop_pidfile() {
    local f="$1"
    if alive "$f" "$(basename "$f" .pid)"; then
        kill "$(cat "$f")" && say "stopped $(basename "$f" .pid)"
    fi
    rm -f "$f"
}

if [[ "${1:-}" == "--down" ]]; then
    stop_pidfile "$RUN/slurmd.pid"
    stop_pidfile "$RUN/slurmctld.pid"
    stop_pidfile /run/munge/munged.pid
    exit 0
fi

[[ "$(id -u)" == 0 ]] || fail "needs root (it installs packages and starts system daemons)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge with apt-get"
    # shellcheck source=scripts/apt-install.sh
    source "$HERE/apt-install.sh"
    apt_install 600 slurm-wlm munge || fail "the packages could not be installed (above)"
fi

if [[ -e "$CONF" ]] && ! head -n1 "$CONF" | grep -q "$MARKER"; then
    fail "$CONF exists and is not ours (no '$MARKER' marker): not replacing a site's Slurm"
fi
changed=0
if ! cmp -s "$CONF_SRC" "$CONF"; then
    install -D -m 0644 "$CONF_SRC" "$CONF"
    changed=1
fi

if [[ "$changed" == 0 ]] && node_ready; then
    say "already up (node localhost: $(sinfo -h -n localhost -o %T)); nothing to do"
    exit 0
fi

mkdir -p "$RUN" /var/spool/sfxflow-slurm/ctld /var/spool/sfxflow-slurm/d /var/log/sfxflow-slurm

# munge: the authentication every Slurm message carries
if ! timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do
        timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    timeout 5 munge -n </dev/null | timeout 5 unmunge >/dev/null || fail "munge does not answer"
    say "munged started"
fi

if [[ "$changed" == 1 ]]; then  # a new configuration: restart what runs with the old one
    stop_pidfile "$RUN/slurmd.pid"
    stop_pidfile "$RUN/slurmctld.pid"
    sleep 1
fi
if ! alive "$RUN/slurmctld.pid" slurmctld; then
    /usr/sbin/slurmctld -f "$CONF" || fail "slurmctld did not start (see /var/log/sfxflow-slurm/slurmctld.log)"
    say "slurmctld started"
fi
for _ in $(seq 60); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
timeout 5 scontrol ping | grep -q UP \
    || fail "slurmctld does not answer (see /var/log/sfxflow-slurm/slurmctld.log)"
if ! alive "$RUN/slurmd.pid" slurmd; then
    /usr/sbin/slurmd -f "$CONF" -N localhost || fail "slurmd did not start (see /var/log/sfxflow-slurm/slurmd.log)"
    say "slurmd started"
fi
for _ in $(seq 60); do node_ready && break; sleep 1; done
if ! node_ready; then
    # a node that was down (an unclean stop) comes back with an explicit resume
    timeout 10 scontrol update nodename=localhost state=resume 2>/dev/null || true
    for _ in $(seq 15); do node_ready && break; sleep 1; done
fi
node_ready || fail "node localhost is $(sinfo -h -n localhost -o '%T %E' 2>&1) (see /var/log/sfxflow-slurm/slurmd.log)"

# a one-line job proves the whole path: submit, run as root on localhost, finish
out="$(timeout 60 srun --quiet -N1 -n1 -t 1 hostname 2>&1)" || fail "a test job did not run: $out"
say "up in $((SECONDS - t0)) s: partition $(sinfo -h -o %P | head -n1), node localhost $(sinfo -h -n localhost -o '%c cpus, %T'), test job ran on $out"
