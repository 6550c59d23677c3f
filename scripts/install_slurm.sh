#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client) and munge, which the real-SLURM tests
# (tests/test_slurm.py, tests/slurm_cluster.py) start as a one-node cluster on localhost.
# Needs root and apt-get; without them it says so and changes nothing (those tests then skip
# with the reason). Idempotent: nothing is fetched when the programs are already there.
set -euo pipefail
need=(sbatch squeue scontrol scancel sinfo slurmctld slurmd munged mungekey)
missing=()
for program in "${need[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[slurm] installed: slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "(version unknown)")"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[slurm] not installed (${missing[*]} missing) and this is not root with apt-get: the SLURM tests will skip"
  exit 0
fi
echo "[slurm] installing slurmctld slurmd slurm-client munge"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "[slurm] installed: slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "(version unknown)")"
