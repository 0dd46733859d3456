#!/usr/bin/env bash
# A real single-node SLURM on loopback, for trying and testing profiles/slurm on one machine.
#
#   scripts/local_slurm.sh start    install (apt, if missing) and start munged, MariaDB, slurmdbd,
#                                   slurmctld and slurmd; returns once the node is idle
#   scripts/local_slurm.sh status   one line per daemon; exit 0 only if the cluster answers
#   scripts/local_slurm.sh stop     stop what `start` started, in reverse order
#
# Needs root (it installs packages, writes /etc/slurm and runs slurmd as root). No systemd is
# needed: every daemon runs as a plain background process whose pid is recorded in the state
# directory ($MPQFLOW_SLURM_DIR, default /tmp/mpqflow-slurm), next to its log, spool and the
# MariaDB data. `start` is idempotent: a daemon whose pidfile names a live process is left alone.
# Only loopback is used: the node is `localhost` at 127.0.0.1 and MariaDB has no TCP listener.
# (Slurm 22.05 binds its ports 6817-6819 on all interfaces; it cannot bind to loopback only.)
#
# Exit status: 0 ok, 1 a daemon did not come up in time (its log is printed), 2 SLURM cannot be
# brought up here (not root, or not installed and no apt-get, or the install failed), 3 (status)
# the cluster does not answer.
set -euo pipefail

STATE=${MPQFLOW_SLURM_DIR:-/tmp/mpqflow-slurm}
CLUSTER=mpqflow
PARTITION=main
CONF_DIR=/etc/slurm
MARKER="# Written by mpqflow scripts/local_slurm.sh"
TIMEOUT=${MPQFLOW_SLURM_TIMEOUT:-60}  # seconds each daemon gets to answer
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs it backwards
MYSQL_SOCKET=$STATE/mysql/mysqld.sock
DB_PASS=mpqflow-local  # reachable only through a root-owned unix socket in $STATE

die() { echo "local_slurm: $*" >&2; exit "${2:-1}"; }
say() { echo "local_slurm: $*"; }

pid_of() {  # the live pid recorded for daemon $1 (a process of that name, not a reused pid), or fail
    local f=$STATE/run/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] && echo "$pid"
}

wait_for() {  # wait_for NAME LOGFILE CMD...: poll CMD until it succeeds, at most $TIMEOUT seconds
    local name=$1 log=$2 deadline=$((SECONDS + TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "local_slurm: $name did not answer within ${TIMEOUT}s ($*); last lines of $log:" >&2
            tail -n 20 "$log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

mariadb_cli() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot "$@"; }
node_state() { sinfo -h -n localhost -o %T 2>/dev/null; }
node_idle() { [[ $(node_state) == idle ]]; }                          # a suffix (idle*) means trouble
node_up() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
munge_ok() { munge -n | unmunge; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd slurmdbd munged mariadbd sacctmgr; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed (missing: ${missing[*]}) and there is no apt-get" 2
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' maintainer scripts from starting services: this script starts them itself.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
    local ok=0
    if "${apt[@]}" >"$STATE/log/apt.log" 2>&1; then
        ok=1
    elif apt-get update -q >>"$STATE/log/apt.log" 2>&1 && "${apt[@]}" >>"$STATE/log/apt.log" 2>&1; then
        ok=1
    fi
    ((own_policy)) && rm -f "$policy"
    ((ok)) || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $STATE/log/apt.log)" 2; }
}

write_configs() {
    local f
    for f in slurm.conf slurmdbd.conf; do
        if [[ -e $CONF_DIR/$f ]] && ! grep -qF "$MARKER" "$CONF_DIR/$f"; then
            die "$CONF_DIR/$f exists and was not written by this script; not overwriting it"
        fi
    done
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf.tmp" <<EOF
$MARKER (state in $STATE). Edit the script, not this file.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/slurmdbd.conf.tmp" <<EOF
$MARKER (state in $STATE). Edit the script, not this file.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$CONF_DIR/slurmdbd.conf.tmp"
    chmod 600 "$CONF_DIR/slurmdbd.conf.tmp"
    mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
    mv "$CONF_DIR/slurmdbd.conf.tmp" "$CONF_DIR/slurmdbd.conf"
}

launch() {  # launch NAME CMD...: run a daemon detached from our stdio (callers may read our pipes)
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.log" 2>&1 \
        || { tail -n 20 "$STATE/log/$name.log" >&2; die "$name failed to start"; }
}

start_munged() {
    if munge_ok >/dev/null 2>&1; then return 0; fi  # a munged already answers: use it as is
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    install -o munge -g munge -m 0644 /dev/null "$STATE/log/munged.log"
    launch munged runuser -u munge -- munged --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/run/munged.seed"
    wait_for munged "$STATE/log/munged.log" munge_ok
}

start_mariadbd() {
    if [[ ! -d $STATE/mysql/data/mysql ]]; then
        install -d -o mysql -g mysql "$STATE/mysql" "$STATE/mysql/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
            || { tail -n 20 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    install -o mysql -g mysql -m 0644 /dev/null "$STATE/log/mariadbd.log"
    # --skip-networking: the unix socket is the only way in. mariadbd stays in the foreground.
    setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" --socket="$MYSQL_SOCKET" \
        --skip-networking --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
        --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    wait_for MariaDB "$STATE/log/mariadbd.log" mariadb_cli -e 'select 1'
    mariadb_cli <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
    # slurmdbd reaches MariaDB through the client library, which honours MYSQL_UNIX_PORT.
    install -o slurm -g slurm -m 0644 /dev/null "$STATE/log/slurmdbd.log"
    launch slurmdbd env MYSQL_UNIX_PORT="$MYSQL_SOCKET" slurmdbd
    wait_for slurmdbd "$STATE/log/slurmdbd.log" sacctmgr -n show cluster
    if [[ -z $(sacctmgr -n -P show cluster format=cluster where cluster=$CLUSTER 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >>"$STATE/log/slurmdbd.log" 2>&1
    fi
}

start_slurmctld() {
    install -o slurm -g slurm -m 0644 /dev/null "$STATE/log/slurmctld.log"
    launch slurmctld slurmctld
    wait_for slurmctld "$STATE/log/slurmctld.log" scontrol ping
}

start_slurmd() {
    # The machine's hostname is not `localhost`; -N names the node as slurm.conf does.
    launch slurmd slurmd -N localhost
    wait_for "slurmd (node idle)" "$STATE/log/slurmd.log" node_idle
}

start() {
    [[ $(id -u) == 0 ]] || die "starting a local SLURM needs root (packages, /etc/slurm, slurmd)" 2
    # run/ and log/ are shared by daemons running as root, munge, mysql and slurm (sticky, like /tmp).
    install -d -m 0755 "$STATE" "$STATE/spool"
    install -d -m 1777 "$STATE/run" "$STATE/log"
    install_packages
    install -d -o slurm -g slurm "$STATE/spool/ctld"
    install -d "$STATE/spool/d"
    write_configs
    local d
    for d in "${DAEMONS[@]}"; do
        if pid_of "$d" >/dev/null; then
            say "$d already running (pid $(pid_of "$d"))"
        else
            "start_$d"
            say "$d up"
        fi
    done
    # A node left DOWN by an earlier unclean stop comes back on its own (ReturnToService=2);
    # wait for it in any case so that `start` returns a usable cluster.
    wait_for "slurmd (node up)" "$STATE/log/slurmd.log" node_up
    say "cluster '$CLUSTER' ready: partition '$PARTITION', node localhost (state in $STATE)"
}

stop_one() {  # SIGTERM, wait up to 15 s, then SIGKILL
    local name=$1 pid
    pid=$(pid_of "$name") || { rm -f "$STATE/run/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 75); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/run/$name.pid"
    say "$name stopped"
}

remove_configs() {  # only the files write_configs wrote (they carry $MARKER)
    local f
    for f in slurm.conf slurmdbd.conf; do
        if [[ -e $CONF_DIR/$f ]] && grep -qF "$MARKER" "$CONF_DIR/$f"; then
            rm -f "$CONF_DIR/$f"
        fi
    done
}

stop() {
    # The configs go too: a slurm.conf naming a controller that is down makes every `scontrol` wait
    # about 9 s, and Snakemake's SLURM plugin runs `scontrol show config` whenever snakemake starts
    # (measured: `snakemake --version` 10.3 s with the stale file, 1.4 s without). `start` writes them again.
    [[ -d $STATE/run ]] || { say "nothing to stop ($STATE/run does not exist)"; remove_configs; return 0; }
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_one "${DAEMONS[i]}"
    done
    remove_configs
}

status() {
    local d pid up=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$d"); then
            echo "$d: running (pid $pid)"
        elif [[ $d == munged ]] && munge_ok >/dev/null 2>&1; then
            echo "$d: running (not started by this script)"
        else
            echo "$d: not running"
        fi
    done
    if command -v sinfo >/dev/null && node_up; then
        up=1
        sinfo -h -o "partition %P: node %N %T, %c CPUs, %m MB"
    fi
    ((up)) || { echo "cluster: not answering"; return 3; }
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
