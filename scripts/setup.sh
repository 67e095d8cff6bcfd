#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need on Debian / Raspberry Pi OS:
# Debian packages (libzbar0 for the zbar decoder), a venv in .venv, the project and its tools.
# Idempotent: re-running only does what is missing. `--test` adds what only the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
# what a reader and the demo need (mosquitto: the demo's private broker; the compiler,
# pkg-config, libsystemd-dev and python3-dev build systemd-python's sd_notify binding)
DEB_PACKAGES=(libzbar0 python3-venv mosquitto gcc libc6-dev pkg-config libsystemd-dev python3-dev)
# what only the tests need (the reference back office's PostgreSQL store, shellcheck for
# install.sh, systemd-analyze for the unit, openssl to check the fleet CA independently): `setup.sh --test`
if [ "${1:-}" = "--test" ]; then DEB_PACKAGES+=(postgresql shellcheck systemd openssl); fi

say() { printf 'qrgate setup: %s\n' "$*" >&2; }

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "Python 3.11 or newer is needed ($PY is $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11"
  exit 1
fi

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then run=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then run=(sudo -n); else run=(none); fi
  if [ "${run[0]:-}" != none ]; then
    say "installing Debian packages: ${missing[*]}"
    "${run[@]}" apt-get update -qq || say "apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "cannot install ${missing[*]} without root: run 'sudo apt-get install ${missing[*]}'"
    say "(the zbar decoder backend is unavailable until libzbar0 is installed)"
  fi
fi

stamp=$VENV/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/qrgate" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  venv_args=()
  # on a Pi, picamera2 and libcamera exist only as Debian packages: let the venv see them
  if grep -qs "Raspberry Pi" /proc/device-tree/model; then venv_args+=(--system-site-packages); fi
  "$PY" -m venv "${venv_args[@]}" "$VENV"
fi
say "installing qrgate and its dependencies into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
log=$VENV/setup.log
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  say "pip install failed (full log: $log)"
  exit 1
fi
echo "$want" > "$stamp"
