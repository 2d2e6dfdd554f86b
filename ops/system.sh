#!/usr/bin/env bash
# Sourced-or-run by ops/test.sh and ops/demo.sh: the system programs the suite and the demo
# need. Missing ones are installed from Debian's packages when we are root with apt-get;
# otherwise their packages are named and we exit 2 (nothing half-installed).
#   bash ops/system.sh [--for test|demo] [--check]   (--check: name what is missing, install nothing)
set -euo pipefail
purpose=test check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --for) purpose=$2; shift 2 ;;
    --check) check=1; shift ;;
    *) echo "usage: ops/system.sh [--for test|demo] [--check]" >&2; exit 2 ;;
  esac
done
has() { command -v "$1" >/dev/null 2>&1; }
missing() {  # the Debian packages of the programs that are not there
  need=()
  has git || need+=(git)
  has redis-server || need+=(redis-server)
  has initdb || [ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || need+=(postgresql)
  if [ "$purpose" = test ]; then
    { has promtool && has prometheus; } || need+=(prometheus)   # alert rule tests, dashboard test
    has docker-compose || need+=(docker-compose)                # compose file checks
    { has ip && has tc; } || need+=(iproute2)                   # partition tests (netns, veth, tc)
    has chromium || need+=(chromium)                            # Flower page test (headless)
  fi
}
missing
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$check" = 0 ] && [ "$(id -u)" = 0 ] && has apt-get; then
  echo "installing from Debian's packages: ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  missing  # what the packages did not bring (another distribution's names): said below
  [ ${#need[@]} -eq 0 ] && exit 0
  echo "still missing after apt-get install:" >&2
fi
echo "missing programs; install these packages first: ${need[*]}" >&2
echo "  Debian/Ubuntu: sudo apt-get install ${need[*]}" >&2
echo "  macOS:         brew install ${need[*]/redis-server/redis}" >&2
exit 2
