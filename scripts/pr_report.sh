#!/usr/bin/env bash
# Build the pull-request report: what the change did to params, metrics and plots,
# measured against BASE (a git revision whose outputs are in the DVC remote or cache).
#
#   scripts/pr_report.sh BASE [OUT_DIR]
#
# Writes OUT_DIR/report.md (default: pr-report/), the sample grids it references, and
# one Vega-Lite spec per line plot (OUT_DIR/vega/*.json) for rendering to PNG.
set -euo pipefail
base=${1:?usage: scripts/pr_report.sh BASE [OUT_DIR]}
out=${2:-pr-report}
rm -rf "$out" && mkdir -p "$out/vega" "$out/grids"

# Reproduce only what changed; stages whose inputs are unchanged come from the remote.
dvc repro --pull --allow-missing

report="$out/report.md"
{
  echo "## Metrics (vs \`$base\`)"
  echo
  dvc metrics diff "$base" --md --all
  echo
  echo "## Params (vs \`$base\`)"
  echo
  dvc params diff "$base" --md
  echo
  echo "## Sample grids"
  echo
} >"$report"

if compgen -G "data/samples/grids/*.png" >/dev/null; then
  for grid in data/samples/grids/*.png; do
    cp "$grid" "$out/grids/"
    echo "![$(basename "$grid" .png)](grids/$(basename "$grid"))" >>"$report"
  done
else
  echo "_No sample grids._" >>"$report"
fi

echo >>"$report"
echo "## Training curves" >>"$report"
echo >>"$report"
for target in $(dvc plots show --json 2>/dev/null | python -c '
import json, sys
data = json.load(sys.stdin)["data"]
for name, entries in data.items():
    if any(e.get("type") == "vega" for e in entries):
        print(name)
'); do
  slug=$(echo "$target" | tr -c "A-Za-z0-9_.-" "_")
  dvc plots diff "$base" --targets "$target" --show-vega >"$out/vega/$slug.json"
  echo "![$target](plots/$slug.png)" >>"$report"
done
echo "report: $report"
