#!/usr/bin/env bash
# Copy a finished study's small outputs from its run directory into results/cpu-bench/ (no weights, no data, no
# generations): report.md, results.json, specialisation.json, plots/ and the fused model's card.
#   bash results/cpu-bench/collect.sh /work/runs/cpu-bench
set -euo pipefail
run="${1:?usage: collect.sh RUN_DIR, the directory of the study run, e.g. /work/runs/cpu-bench}"
here="$(cd "$(dirname "$0")" && pwd)"
for f in report.md results.json specialisation.json fused/README.md; do
  [[ -f "$run/$f" ]] || { echo "collect.sh: no $run/$f; finish the study first (h3fusion run ... resumes it)" >&2; exit 2; }
done
cp "$run/report.md" "$run/results.json" "$run/specialisation.json" "$here/"
cp "$run/fused/README.md" "$here/model_card.md"
rm -rf "$here/plots" && cp -r "$run/plots" "$here/plots"
echo "collected into $here: report.md results.json specialisation.json model_card.md plots/"
