#!/usr/bin/env bash
# The offline GPU check (issue 19): scripts/gpu-check.sh OUTDIR [--device cpu] [--wheels DIR] [--budget S]
#                                                               [--plan FILE] [--force]
# For one GPU with a preinstalled CUDA torch and no network: installs nothing from the network (with --wheels,
# only the wheels of DIR, `pip install --no-index`), then runs `cab gpu-check` from this checkout (no install
# of cab needed) within the plan's time budget (configs/gpu-check.yaml: 8 minutes; --device cpu: the tiny
# rehearsal, configs/gpu-check-cpu.yaml). OUTDIR gets the store, the leaderboard, summary.md and this log,
# at most 8 files of at most 16 MiB. Exit status: cab gpu-check's (0 all ok, 1 a failure, 124 hard deadline).
set -euo pipefail
export CAB_GPU_CHECK_T0="${CAB_GPU_CHECK_T0:-$(date +%s.%N)}"  # the budget counts from here (wheels included)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
OUTDIR="" WHEELS="" ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage 0 ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --device|--budget|--plan) ARGS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --force|--no-report) ARGS+=("$1"); shift ;;
        -*) echo "gpu-check.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$OUTDIR" ] || { echo "gpu-check.sh: one OUTDIR only" >&2; usage; }; OUTDIR="$1"; shift ;;
    esac
done
[ -n "$OUTDIR" ] || usage
mkdir -p "$OUTDIR"

if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "[gpu-check.sh] installing ${#wheels[@]} wheels from $WHEELS (--no-index: no network)"
        # a wheel that cannot install is reported and the check goes on: it needs none of them itself
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-warn-script-location -q "${wheels[@]}" \
            || echo "[gpu-check.sh] warning: pip could not install every wheel of $WHEELS" >&2
    else
        echo "[gpu-check.sh] warning: no wheels in $WHEELS" >&2
    fi
fi

# this checkout's cab, installed or not
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
set +e
"$PYTHON" -u -m cab.cli gpu-check "$OUTDIR" "${ARGS[@]}" 2>&1 | tee "$OUTDIR/gpu-check.log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
