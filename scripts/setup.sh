#!/usr/bin/env bash
# Create .venv and install the project. `--test` adds the test tools, Redis and headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$with_test" = 1 ]; then
    .venv/bin/pip install --quiet -e '.[test]'
else
    .venv/bin/pip install --quiet -e .
fi

if [ "$with_test" = 1 ]; then
    missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "setup: please install ${missing[*]} (apt-get install ${missing[*]})" >&2
        fi
    fi
fi
