#!/usr/bin/env bash
# Install the Debian packages the test suite drives for real (NBD clients,
# qemu tools, fio, thin-provisioning-tools), skipping what is already there.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have fio || need+=(fio)
have nbdinfo || need+=(libnbd-bin)
have nbdsh || need+=(python3-libnbd libnbd-bin)
have qemu-img || need+=(qemu-utils)
have nbdkit || need+=(nbdkit)
have era_check || need+=(thin-provisioning-tools)
have openssl || need+=(openssl)
have mount || need+=(mount)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
