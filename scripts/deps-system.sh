#!/usr/bin/env bash
# Install the Debian packages named as arguments, but only those that are missing.
# Each package is checked by what it provides (a binary), so nothing is run when all are
# present; otherwise one `apt-get update` and one `apt-get install` for the missing ones.
set -euo pipefail

have() {  # have PACKAGE: is what PACKAGE provides already here?
  case "$1" in
    nats-server) [ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null ;;
    postgresql) command -v pg_ctl >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null ;;
    chromium) command -v chromium >/dev/null ;;
    prometheus) command -v prometheus >/dev/null ;;
    *) dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' ;;
  esac
}

missing=()
for pkg in "$@"; do
  have "$pkg" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps-system: installing missing Debian packages: ${missing[*]}" >&2
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
