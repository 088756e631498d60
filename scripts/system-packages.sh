#!/usr/bin/env bash
# system-packages.sh COMMAND=PACKAGE...: installs the Debian package of each
# missing command (as root, or with sudo), or says what to install.
set -euo pipefail
missing=()
for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif sudo -n true 2>/dev/null; then
    sudo="sudo"
else
    echo "missing: ${missing[*]} (Debian packages); install them, e.g. sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
