#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for `make test-slurm` (tests/test_slurm.py): Debian's
# slurmctld, slurmd and munge, installed with apt-get when missing (needs root), configured and
# run from one scratch folder, so nothing under /etc changes beyond the packages and a system
# Slurm or munge, if any, is left alone (own ports, own munge socket and key).
#   tests/slurm/cluster.sh up     install what is missing, write the config, start the daemons
#   tests/slurm/cluster.sh down   stop the daemons `up` started (their pid files)
# Clients need SLURM_CONF=<dir>/etc/slurm.conf. The folder is SLURM_TEST_DIR, default runs/slurm.
#
# The node is this machine's CPUs and memory as slurmd reports them, plus GPUS (default 2)
# stand-in GPUs: a gpu GRES whose device files are links to /dev/null (slurmd drops a GPU
# without a device file), so `sbatch --gpus-per-node 2` is a real Slurm GPU allocation, with
# the environment a GPU node gives, while the ranks run on the CPU.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${SLURM_TEST_DIR:-$repo/runs/slurm}"
packages=(slurmctld slurmd slurm-client munge)
gpus="${GPUS:-2}"
say() { echo "cluster: $*"; }

install() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    say "${packages[*]} already installed ($(dpkg-query -W -f='${Version}' slurmd))"
    return
  fi
  [ "$(id -u)" -eq 0 ] || { say "installing ${missing[*]} needs root"; exit 1; }
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  say "installed $(dpkg-query -W -f='${Version}' slurmd)"
}

# A pid file's process, if it is still alive and still that daemon (pids are reused).
alive() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    pid="$(alive "$dir/run/$name.pid" "$name")" || continue
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    say "stopped $name ($pid)"
  done
}

configure() {
  local host node
  host="$(hostname -s)"
  mkdir -p "$dir"/{etc,run,log,state,spool,munge,jobs,dev}
  chmod 755 "$dir/munge"  # munged: clients must reach its socket; the key itself is 0600
  [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
  # slurmd's own view of the node, so the configured node matches the hardware it checks.
  node="$(slurmd -C | head -n 1)"
  cat >"$dir/etc/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster, everything under $dir.
ClusterName=omnitest
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (120 s by default).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups in a container: processes tracked through /proc; CPU binding as on most clusters.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# A requeued job becomes eligible between events: look at pending jobs every 2 s, not 60.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
GresTypes=gpu
$node Gres=gpu:$gpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  rm -f "$dir"/dev/gpu*
  for i in $(seq 0 $((gpus - 1))); do ln -s /dev/null "$dir/dev/gpu$i"; done
  echo "NodeName=$host Name=gpu File=$dir/dev/gpu[0-$((gpus - 1))]" >"$dir/etc/gres.conf"
}

up() {
  install
  stop  # daemons of an earlier run that was not taken down
  configure
  rm -f "$dir"/log/*.log
  munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  # -c: start without the jobs of an earlier run.
  slurmctld -c -f "$dir/etc/slurm.conf"
  slurmd -f "$dir/etc/slurm.conf"
  export SLURM_CONF="$dir/etc/slurm.conf"
  for _ in $(seq 120); do
    if [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then
      say "up: $(sinfo -h -N -o '%N, %c CPUs, %G')"
      return
    fi
    sleep 0.5
  done
  say "the node did not come up; logs in $dir/log"
  tail -n 20 "$dir"/log/*.log >&2
  exit 1
}

case "${1:-}" in
  up) up ;;
  down) stop ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
