#!/usr/bin/env sh
# Copy the Grafana dashboard and the Prometheus alert rules into the chart (Helm cannot read
# files outside the chart directory). tests/test_helm.py fails when the copies drift.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
files="$root/helm/fluidserve/files"
mkdir -p "$files/grafana" "$files/prometheus"
cp "$root/monitoring/grafana/fluidserve.json" "$files/grafana/fluidserve.json"
cp "$root/monitoring/prometheus/alerts.yml" "$files/prometheus/alerts.yml"
echo "synced monitoring/ into $files"
