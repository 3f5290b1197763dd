#!/usr/bin/env bash
# The test command (see README): every tier. Tiers that need root or a kernel
# feature skip with the reason printed; the kernel tier boots User-Mode Linux.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python)}"

# Lint and strict typing first; a failure fails the run, but the tests still
# run so one report shows both.
lint_status=0
"$PY" -m ruff check proto agent controller tests bench || lint_status=1
"$PY" -m mypy || lint_status=1

"$PY" -m pytest -q -p no:cacheprovider tests/unit tests/integration tests/system
status=$?

if [ -x tests/kernel/run-uml.sh ]; then
  bash tests/kernel/run-uml.sh "$PY"
  kstatus=$?
  # 77: User-Mode Linux could not start here; the script printed why (a skip, not a pass)
  if [ $kstatus -ne 0 ] && [ $kstatus -ne 77 ]; then status=$kstatus; fi
fi
if [ $status -eq 0 ] && [ $lint_status -ne 0 ]; then status=$lint_status; fi
exit $status
