#!/usr/bin/env bash
# Make .venv with everything freevlm needs. torch comes first and pinned: the CPU build of 2.13.0 is what this
# machine provides, and any unpinned torch requirement would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# headless Chromium renders the demo report's HTML in tests/test_demo_report.py (skipped without it)
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[demo,serve,smolvlm,test]"
