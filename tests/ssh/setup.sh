#!/usr/bin/env bash
# Start two "GPU boxes" on this machine for RunPilot's SSH tests (run as root).
#
# Usage: bash tests/ssh/setup.sh
#
# Each box is a Unix user with its own home, its own sshd on a loopback port, key-only login, a pinned host
# key and its own nvidia-smi stand-in (tests/fixtures/nvidia-smi) listing a different number of GPUs:
#
#   alias         user    port   GPUs (FAKE_NVIDIA_SMI)
#   runpilot-box1 rpbox1  2201   2xh100
#   runpilot-box2 rpbox2  2202   4xh100
#
# Root reaches them with its own key (~/.ssh/id_ed25519, made if missing) through the aliases above, which
# this script keeps in a marked block of root's ~/.ssh/config, as a user's real boxes are reached by what
# their ssh config says. The boxes' users are in the docker group, so the test images are theirs too.
# RunPilot's GPU claims are machine-wide (/tmp); two boxes on one machine would share them, where two
# real boxes never do, so each box claims its GPUs in its own folder (RUNPILOT_GPU_CLAIMS).
# Idempotent: a box whose sshd answers is kept; a second run takes well under a second.
# Why each step is needed is said beside it (an account useradd leaves locked, SetEnv for a session's PATH).
set -euo pipefail

readonly APT_PACKAGES=(openssh-server openssh-client rsync)
readonly HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly STAND_IN="$HERE/../fixtures/nvidia-smi"
readonly MARK_BEGIN="# >>> runpilot test boxes (tests/ssh/setup.sh) >>>"
readonly MARK_END="# <<< runpilot test boxes <<<"
readonly BOXES=("1 2201 2xh100" "2 2202 4xh100")

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

die() {
    printf 'ssh setup: error: %s\n' "$*" >&2
    exit 1
}

install_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    echo "installing: ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
}

client_key() {
    mkdir -p -m 0700 /root/.ssh
    [[ -f /root/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
}

# Make user rpboxN with the stand-in nvidia-smi in ~/bin and root's key authorized.
make_user() {
    local user="$1"
    getent group docker >/dev/null || groupadd docker
    id "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash -G docker "$user"
    usermod -p '*' "$user"  # useradd leaves the account locked, and sshd without PAM refuses a locked one
    local home
    home="$(getent passwd "$user" | cut -d: -f6)"
    install -d -m 0700 -o "$user" -g "$user" "$home/.ssh" "$home/bin" "$home/gpu-claims"
    install -m 0600 -o "$user" -g "$user" /root/.ssh/id_ed25519.pub "$home/.ssh/authorized_keys"
    install -m 0755 -o "$user" -g "$user" "$STAND_IN" "$home/bin/nvidia-smi"
}

start_sshd() {
    local user="$1" port="$2" gpus="$3" conf="/etc/ssh/sshd_runpilot_$1.conf" home
    home="$(getent passwd "$user" | cut -d: -f6)"
    cat >"$conf.tmp" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd-runpilot-$user.pid
AllowUsers $user
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxStartups 100:30:200
MaxSessions 100
SetEnv FAKE_NVIDIA_SMI=$gpus RUNPILOT_GPU_CLAIMS=$home/gpu-claims PATH=$home/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
EOF
    local changed=no
    if ! cmp -s "$conf.tmp" "$conf"; then mv "$conf.tmp" "$conf"; changed=yes; else rm -f "$conf.tmp"; fi
    local pidfile="/run/sshd-runpilot-$user.pid"
    if [[ $changed == yes && -f $pidfile ]]; then kill "$(cat "$pidfile")" 2>/dev/null || true; sleep 0.2; fi
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 0; fi
    /usr/sbin/sshd -f "$conf"
}

client_config() {
    local block="$MARK_BEGIN" spec n port
    for spec in "${BOXES[@]}"; do
        read -r n port _ <<<"$spec"
        block+=$'\n'"Host runpilot-box$n"$'\n'"    HostName 127.0.0.1"$'\n'"    Port $port"$'\n'"    User rpbox$n"
        block+=$'\n'"    IdentityFile /root/.ssh/id_ed25519"
    done
    block+=$'\n'"$MARK_END"
    touch /root/.ssh/config /root/.ssh/known_hosts
    chmod 0600 /root/.ssh/config
    # Drop the old block, then put the current one first (ssh takes the first value it reads).
    awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' \
        /root/.ssh/config >/root/.ssh/config.tmp
    { printf '%s\n' "$block"; cat /root/.ssh/config.tmp; } >/root/.ssh/config
    rm -f /root/.ssh/config.tmp
    for spec in "${BOXES[@]}"; do
        read -r n port _ <<<"$spec"
        ssh-keygen -R "[127.0.0.1]:$port" -f /root/.ssh/known_hosts >/dev/null 2>&1 || true
        ssh-keyscan -p "$port" -t ed25519 127.0.0.1 2>/dev/null >>/root/.ssh/known_hosts
    done
}

main() {
    [[ $(id -u) -eq 0 ]] || die "run as root: it adds users and starts sshd"
    install_packages
    ssh-keygen -A >/dev/null
    mkdir -p /run/sshd
    client_key
    local spec n port gpus
    for spec in "${BOXES[@]}"; do
        read -r n port gpus <<<"$spec"
        make_user "rpbox$n"
        start_sshd "rpbox$n" "$port" "$gpus"
    done
    sleep 0.2
    client_config
    for spec in "${BOXES[@]}"; do
        read -r n _ _ <<<"$spec"
        timeout 20 ssh -o BatchMode=yes "runpilot-box$n" 'echo "$(whoami): $(nvidia-smi --query-gpu=index --format=csv,noheader,nounits | wc -l) GPUs"' ||
            die "box runpilot-box$n does not answer over ssh"
    done
}

main "$@"
