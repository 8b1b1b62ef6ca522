#!/usr/bin/env bash
# Start a one-node Slurm cluster on this Debian 12 machine for RunPilot's Slurm tests (run as root).
#
# Usage: bash tests/slurm/setup.sh
#
# Installs Debian's slurm-wlm and munge, writes /etc/slurm/slurm.conf from this machine's facts (hostname -s,
# nproc, memory), starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node ready for jobs.
# Idempotent: installed packages, a current slurm.conf and daemons that answer are kept, so a second run takes
# 0.2 s. Daemons that died (stale pid files) are started again; a changed slurm.conf restarts the
# Slurm daemons. Accounting is off on purpose (`sacct` fails), as the tests must not depend on it.
#
# The daemons fork into the background and stay up after this script ends; their logs are
# /var/log/slurmctld.log, /var/log/slurmd.log and /var/log/munge/munged.log.
set -euo pipefail

readonly APT_PACKAGES=(slurm-wlm munge)
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PID=/run/munge/munged.pid
readonly MUNGE_LOG=/var/log/munge/munged.log
readonly SLURMCTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly SLURMCTLD_LOG=/var/log/slurmctld.log
readonly SLURMD_LOG=/var/log/slurmd.log
# A fresh cluster is ready at once here, a restarted slurmctld within 5 s; 60 s means something is wrong.
readonly READY_WAIT_S=60
# Every client call below answers at once when the daemons are up; 10 s means "not answering".
readonly CALL_TIMEOUT_S=10

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

CONF_CHANGED=no
STEP_NAMES=()
STEP_TIMES=()
STEP_START="$(date +%s.%N)"

# Record how long the step that just ended took, under NAME.
took() {
    local end
    end="$(date +%s.%N)"
    STEP_NAMES+=("$1")
    STEP_TIMES+=("$(awk -v a="$STEP_START" -v b="$end" 'BEGIN { printf "%.1f", b - a }')")
    STEP_START="$end"
}

print_timings() {
    local i
    printf 'slurm setup timings:\n'
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %6s s  %s\n' "${STEP_TIMES[$i]}" "${STEP_NAMES[$i]}"
    done
}

die() {
    printf 'slurm setup: error: %s\n' "$*" >&2
    exit 1
}

# Print the last lines of each log that exists, to explain a failure.
show_logs() {
    local log
    for log in "$@"; do
        [[ -f "$log" ]] || continue
        printf -- '--- last lines of %s ---\n' "$log" >&2
        tail -n 20 "$log" >&2
    done
}

# ==== processes ====

# Print the pid in PIDFILE when that process is alive and is the program NAME; else print nothing, fail.
# A killed daemon can linger as a zombie of its name until pid 1 reaps it, which was not immediate here.
live_pid() {
    local name="$1" pidfile="$2" pid stat
    pid="$(cat "$pidfile" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "${stat##*) }" != [ZX]* ]] || return 1
    echo "$pid"
}

# Stop the daemon NAME recorded in PIDFILE (SIGTERM, then SIGKILL after 10 s); remove a stale PIDFILE.
stop_daemon() {
    local name="$1" pidfile="$2" pid i
    if pid="$(live_pid "$name" "$pidfile")"; then
        echo "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            live_pid "$name" "$pidfile" >/dev/null || break
            sleep 0.1
        done
        ! live_pid "$name" "$pidfile" >/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# ==== steps ====

install_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "packages already installed: ${APT_PACKAGES[*]} ($(sinfo --version))"
        return 0
    fi
    echo "installing: ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "${APT_PACKAGES[@]}"
}

munge_answers() {
    timeout "$CALL_TIMEOUT_S" munge -n 2>/dev/null | timeout "$CALL_TIMEOUT_S" unmunge >/dev/null 2>&1
}

start_munged() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        echo "creating $MUNGE_KEY"  # Debian's postinst makes it; a key removed by hand is made again
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if munge_answers; then
        echo "munged already answering"
        return 0
    fi
    stop_daemon munged "$MUNGE_PID"  # alive but not answering, or a stale pid file
    mkdir -p /run/munge "$(dirname "$MUNGE_LOG")"
    chown munge:munge /run/munge "$(dirname "$MUNGE_LOG")"
    # --force: start even when a dead munged left its socket behind.
    runuser -u munge -- /usr/sbin/munged --force || { show_logs "$MUNGE_LOG"; die "munged did not start"; }
    local started=$SECONDS
    until munge_answers; do
        if ((SECONDS - started >= READY_WAIT_S)); then
            show_logs "$MUNGE_LOG"
            die "munged did not answer 'munge -n | unmunge' within ${READY_WAIT_S} s"
        fi
        sleep 0.1
    done
    echo "munged started (pid $(live_pid munged "$MUNGE_PID" || echo '?'))"
}

# Print slurm.conf for this machine. Node values must not exceed what slurmd detects, or the node is drained;
# memory is taken from the total (not the free figure, which moves) so the file stays the same between runs.
slurm_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb="$(free -m | awk '/^Mem:/ { printf "%d", $2 * 0.9 }')"
    cat <<EOF
# Written by RunPilot's tests/slurm/setup.sh for host $host: a one-node cluster for the Slurm tests.
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
# No cgroup plugins: this VM's cgroups are hybrid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it every job asks for all the memory and jobs run one at a time.
DefMemPerCPU=1024
# No slurmdbd: sacct answers "accounting storage is disabled", as on a cluster without accounting.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# scontrol show job keeps a finished job this long (s): the only source of its final state without accounting.
MinJobAge=600
# Seconds between SIGTERM and SIGKILL at scancel or the time limit (Slurm's default, written out).
KillWait=30
ReturnToService=2
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$SLURMCTLD_LOG
SlurmdLogFile=$SLURMD_LOG
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

# Write slurm.conf when it differs, and then set CONF_CHANGED=yes.
write_slurm_conf() {
    local wanted
    wanted="$(slurm_conf)"
    if [[ -f "$SLURM_CONF" && "$(cat "$SLURM_CONF")" == "$wanted" ]]; then
        echo "$SLURM_CONF is current"
        return 0
    fi
    mkdir -p "$(dirname "$SLURM_CONF")"
    printf '%s\n' "$wanted" >"$SLURM_CONF.tmp"
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
    CONF_CHANGED=yes
    echo "wrote $SLURM_CONF:"
    grep -E '^(SlurmctldHost|NodeName)=' "$SLURM_CONF"
}

slurmctld_answers() {
    timeout "$CALL_TIMEOUT_S" scontrol ping 2>/dev/null | grep -q 'is UP'
}

slurmd_answers() {
    timeout "$CALL_TIMEOUT_S" scontrol show slurmd >/dev/null 2>&1
}

# Start slurmctld and slurmd unless they answer; restart both when slurm.conf changed.
start_slurm() {
    mkdir -p /var/spool/slurmd /var/spool/slurmctld
    if [[ "$CONF_CHANGED" == yes ]]; then
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$SLURMCTLD_PID"
    fi
    ensure_daemon slurmctld "$SLURMCTLD_PID" slurmctld_answers "$SLURMCTLD_LOG"
    ensure_daemon slurmd "$SLURMD_PID" slurmd_answers "$SLURMD_LOG"
}

# Start daemon NAME (pid file PID_FILE) unless it lives and ANSWERS (a function); LOG is shown if it fails.
ensure_daemon() {
    local name="$1" pid_file="$2" answers="$3" log="$4"
    if live_pid "$name" "$pid_file" >/dev/null && "$answers"; then
        echo "$name already answering"
        return 0
    fi
    stop_daemon "$name" "$pid_file"
    "$name" || { show_logs "$log"; die "$name did not start"; }
    echo "$name started"
}

# Print the node's state as sinfo reports it (idle, mixed, allocated, down*, drained...), or nothing.
node_state() {
    timeout "$CALL_TIMEOUT_S" sinfo -h -N -n "$(hostname -s)" -o '%T' 2>/dev/null | head -n 1
}

wait_until_ready() {
    local started=$SECONDS state="" resumed=no
    while true; do
        state="$(node_state)"
        case "$state" in
            # slurmctld notices a dead slurmd only after minutes; ask slurmd itself too.
            idle | mixed | allocated | completing) slurmd_answers && break ;;
            drained | draining | down)
                # A node left drained or down by an earlier run (slurmd killed mid-job) is put back once.
                if [[ "$resumed" == no ]]; then
                    echo "node is $state, resuming it"
                    scontrol update NodeName="$(hostname -s)" State=RESUME || true
                    resumed=yes
                fi
                ;;
        esac
        if ((SECONDS - started >= READY_WAIT_S)); then
            show_logs "$SLURMCTLD_LOG" "$SLURMD_LOG"
            timeout "$CALL_TIMEOUT_S" scontrol show node "$(hostname -s)" >&2 || true
            die "node $(hostname -s) not ready within ${READY_WAIT_S} s (sinfo state: '${state:-no answer}')"
        fi
        sleep 0.2
    done
    sinfo
}

main() {
    [[ $(id -u) -eq 0 ]] || die "run as root: it installs packages and starts the Slurm daemons"
    install_packages
    took "apt packages"
    start_munged
    took "munged"
    write_slurm_conf
    start_slurm
    took "slurmctld + slurmd"
    wait_until_ready
    took "node ready"
    print_timings
}

main "$@"
