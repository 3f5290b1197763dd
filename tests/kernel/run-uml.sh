#!/bin/sh
# Run the kernel tier (netem) inside User-Mode Linux.
#
# Usage: tests/kernel/run-uml.sh [PYTHON]   (or FAULTLINE_PYTHON / PYTHON; default: python3 on PATH)
# Exit: pytest's status from inside the guest; 77 when UML cannot start here
# (the reason is printed), so CI can report the tier as skipped, never silently.
#
# The host root is mounted READ-ONLY through hostfs: guest writes never reach
# the host. Scratch space inside the guest is tmpfs; the only thing carried
# out is the status file on the one directory this script hands in.
set -eu

SKIP=77
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${1:-${FAULTLINE_PYTHON:-${PYTHON:-$(command -v python3)}}}
UML=${UML_KERNEL:-/usr/bin/linux.uml}
TIMEOUT_S=${UML_TIMEOUT_S:-170}

skip() { echo "kernel tier SKIPPED: $*"; exit "$SKIP"; }

[ -x "$UML" ] || skip "$UML not found (apt-get install -y user-mode-linux)"
[ -x "$PYTHON" ] || skip "python $PYTHON not found"
MODDIR=/usr/lib/uml/modules
[ -d "$MODDIR" ] || skip "$MODDIR missing (user-mode-linux modules)"

OUT=$(mktemp -d /tmp/faultline-uml.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
INIT="$OUT/init.sh"
cat > "$INIT" <<INNER
#!/bin/sh
# PID 1 inside the guest. The root is the host's, read-only.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/run 2>/dev/null || true
# /tmp is NOT covered with a tmpfs: the checkout (and its venv) may live under the
# host's /tmp (CI clones there), and the read-only host root must show it.
# Scratch goes to /run/tmp instead.
mkdir -p /run/netns /run/tmp /run/out
export TMPDIR=/run/tmp
mount -t hostfs -o $OUT hostfs /run/out
# No kmod needed (the host may lack it and /lib/modules): finit_module from the UML tree.
$PYTHON $REPO/tests/kernel/load_modules.py $MODDIR/\$(uname -r) \\
  sch_netem sch_htb sch_tbf cls_u32 veth ifb act_mirred sch_ingress
ip link set lo up
cd $REPO
HOME=/run/tmp PYTHONDONTWRITEBYTECODE=1 $PYTHON -m pytest -m kernel tests/kernel -p no:cacheprovider --color=no -q -rs --timeout 120
echo \$? > /run/out/status
sync
poweroff -f
INNER
chmod +x "$INIT"

set +e
timeout "$TIMEOUT_S" "$UML" mem=512M root=/dev/root rootfstype=hostfs rootflags=/ ro \
  init="$INIT" con0=fd:0,fd:1 con=null quiet < /dev/null
rc=$?
set -e
stty sane 2>/dev/null || true
if [ ! -f "$OUT/status" ]; then
  [ "$rc" -eq 124 ] && echo "UML run exceeded ${TIMEOUT_S}s"
  skip "UML did not run the tests to the end (linux.uml exit $rc)"
fi
status=$(cat "$OUT/status")
echo "kernel tier: pytest exit status $status"
exit "$status"
