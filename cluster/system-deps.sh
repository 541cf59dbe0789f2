#!/usr/bin/env bash
# Debian packages that the cluster layer and its tests use: SLURM (slurmctld, slurmd, sbatch),
# munge (SLURM's authentication), curl (WebDataset streams http shards with it), pdsh
# (DeepSpeed's ssh launcher), iproute2 (network namespaces in the tests), PostgreSQL (the MLflow
# server's database) and Chromium (the tests look at the MLflow UI in it, headless). Root only; CI runs it.
set -euo pipefail
packages=(slurm-wlm munge curl pdsh iproute2 postgresql chromium)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: needs root and apt-get; install ${packages[*]} yourself (the cluster tests skip without them)."
    exit 0
fi
missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
