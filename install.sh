#!/usr/bin/env bash
# Installs facekd and everything it needs into the current Python environment (a venv when one is active).
# Idempotent: what is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# torch first: DeepSpeed's build imports the torch it will run with (hence --no-build-isolation below,
# which also keeps pip from fetching a second, multi-GB torch into a build environment).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install "torch==2.13.0"
fi
if ! "$PYTHON" -m pip show deepspeed >/dev/null 2>&1; then
    "$PYTHON" -m pip install setuptools wheel
    "$PYTHON" -m pip install --no-build-isolation "deepspeed>=0.15"
fi
"$PYTHON" -m pip install -e ".[test]"

# Debian's headless Chromium renders `facekd report`'s page in the tests (they skip, saying so, without it)
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
    else
        echo "note: /usr/bin/chromium is missing and cannot be installed here (needs apt-get and root);" \
             "the test that renders facekd report's page in a browser will be skipped"
    fi
fi
