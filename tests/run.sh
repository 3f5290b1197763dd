#!/usr/bin/env bash
# The test command (see README): every tier. Tiers that need root or a kernel
# feature skip with the reason printed; the kernel tier boots User-Mode Linux.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python)}"

"$PY" -m pytest -q -p no:cacheprovider tests/unit tests/integration tests/system
status=$?

if [ -x tests/kernel/run-uml.sh ]; then
  PYTHON="$PY" bash tests/kernel/run-uml.sh
  kstatus=$?
  # 77: User-Mode Linux could not start here; the script printed why (a skip, not a pass)
  if [ $kstatus -ne 0 ] && [ $kstatus -ne 77 ]; then status=$kstatus; fi
fi
exit $status
