#!/usr/bin/env bash
# Installs the qrgate reader on Raspberry Pi OS Bookworm (arm64) as a systemd service.
#
#   sudo scripts/install.sh                  install or upgrade (idempotent)
#   sudo scripts/install.sh --uninstall      remove the service and /opt/qrgate; keep the config
#                                            (/etc/qrgate) and the journal (/var/lib/qrgate)
#   sudo scripts/install.sh --uninstall --purge   ... and remove those and the qrgate user too
#   scripts/install.sh --root DIR            write the files under DIR instead of / (no apt-get,
#                                            useradd, chown or systemctl: says what it would run)
#
# Layout: /opt/qrgate/releases/<version>/ is a venv (with the system site packages, for
# Debian's python3-picamera2, python3-lgpio and python3-systemd) holding qrgate <version>;
# /opt/qrgate/current links to the release in use and is switched atomically (rename over the
# old link), so the service always starts a complete release. /etc/qrgate/qrgate.toml: the
# reader's config (an example is written only when there is none). /var/lib/qrgate: journal
# and state. The units qrgate.service and qrgate-updater.service (the over-the-air updater,
# root; it starts once /etc/qrgate/ota-root.json is installed and [ota] repo_url is set) go to
# /etc/systemd/system and are enabled.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install.sh [--root DIR] [--python PY] [--no-pip] [--uninstall [--purge]] [-h]

  --root DIR     install into DIR (a staging folder or a mounted SD card) instead of /:
                 apt-get, useradd/usermod, chown and systemctl are not run, only printed
  --python PY    the Python the release venv is made from (default /usr/bin/python3:
                 Debian's, so the venv sees python3-picamera2 and python3-lgpio)
  --no-pip       make the release venv but do not pip-install qrgate into it (tests, offline
                 staging; install a wheel into it by hand)
  --uninstall    stop and remove the service and /opt/qrgate; /etc/qrgate and
                 /var/lib/qrgate are kept
  --purge        with --uninstall: also remove /etc/qrgate, /var/lib/qrgate and the qrgate user
  -h, --help     this text
EOF
}

ARGS="$*"
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
ROOT_GIVEN=0
PYTHON=/usr/bin/python3
PIP=1
UNINSTALL=0
PURGE=0

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || { usage >&2; exit 2; }; ROOT=$2; ROOT_GIVEN=1; shift 2 ;;
    --root=*) ROOT=${1#--root=}; ROOT_GIVEN=1; shift ;;
    --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; PYTHON=$2; shift 2 ;;
    --python=*) PYTHON=${1#--python=}; shift ;;
    --no-pip) PIP=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'install.sh: unknown option %s\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done
# an empty --root (an unset variable in a caller's script) must not mean "this machine"
if [ "$ROOT_GIVEN" = 1 ] && { [ -z "$ROOT" ] || [ "${ROOT#-}" != "$ROOT" ]; }; then
  printf 'install.sh: --root needs a folder, found %s\n' "'${ROOT}'" >&2
  exit 2
fi
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
  printf 'install.sh: --purge goes with --uninstall\n' >&2
  exit 2
fi

# "/" (or nothing) is the live system; anything else is a staging folder
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=""
fi
LIVE=1
[ -n "$ROOT" ] && LIVE=0

SERVICE=qrgate.service
UPDATER=qrgate-updater.service
USER_NAME=qrgate
GROUPS_EXTRA=(gpio video)
DEB_PACKAGES=(python3-picamera2 libzbar0 python3-lgpio python3-venv python3-systemd)
OPT=$ROOT/opt/qrgate
ETC=$ROOT/etc/qrgate
STATE=$ROOT/var/lib/qrgate
UPDATER_STATE=$ROOT/var/lib/qrgate-updater
UNIT_DIR=$ROOT/etc/systemd/system

say() { printf 'qrgate install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# run a command on the live system; under --root only say it
run() {
  if [ "$LIVE" = 1 ]; then
    "$@"
  else
    say "would run: $(quoted "$@")"
  fi
}

# the words as a shell would need them typed: plain ones as they are, others in '...'
quoted() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./,:=@+-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# run a command on the live system when getent DATABASE NAME finds nothing
run_unless_exists() {
  local database=$1 name=$2
  shift 2
  if [ "$LIVE" = 0 ]; then
    say "would run (unless $database entry $name exists): $(quoted "$@")"
  elif ! getent "$database" "$name" >/dev/null; then
    "$@"
  fi
}

version() {
  sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$SRC/firmware/__init__.py"
}

if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo $0 $ARGS), or stage into a folder with --root DIR"
fi

uninstall() {
  local unit
  # the updater first: it must not restart the reader while it is being removed
  for unit in "$UPDATER" "$SERVICE"; do
    if [ "$LIVE" = 1 ] && command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now "$unit" 2>/dev/null || true
    else
      say "would run: systemctl disable --now $unit"
    fi
    rm -f "$UNIT_DIR/$unit" "$UNIT_DIR/multi-user.target.wants/$unit"
  done
  run systemctl daemon-reload
  rm -rf "$OPT"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$STATE" "$UPDATER_STATE"
    if [ "$LIVE" = 0 ]; then
      say "would run (when the user exists): userdel $USER_NAME"
    elif getent passwd "$USER_NAME" >/dev/null; then
      userdel "$USER_NAME"
    fi
    say "removed the service, $OPT, $ETC and $STATE"
  else
    say "removed the service and $OPT; kept $ETC and $STATE (--purge removes them)"
  fi
}

install_packages() {
  if [ "$LIVE" = 0 ]; then
    say "would run (for those missing): apt-get install -y ${DEB_PACKAGES[*]}"
    return
  fi
  if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091 # the running system's file
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [ "$codename" = bookworm ] || say "this is not Bookworm ($codename): going on, untested"
  fi
  local missing=() p
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq || say "apt-get update failed; trying the install anyway"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"; then
      die "could not install ${missing[*]}: python3-picamera2 and python3-lgpio come from the" \
        "Raspberry Pi OS archive (archive.raspberrypi.com); is this Raspberry Pi OS Bookworm?"
    fi
  fi
}

make_user() {
  local g
  for g in "${GROUPS_EXTRA[@]}"; do
    run_unless_exists group "$g" groupadd --system "$g"
  done
  run_unless_exists passwd "$USER_NAME" useradd --system --user-group --home-dir /var/lib/qrgate \
    --no-create-home --shell /usr/sbin/nologin --comment "qrgate door reader" "$USER_NAME"
  run usermod --append --groups "$(IFS=,; printf '%s' "${GROUPS_EXTRA[*]}")" "$USER_NAME"
}

# the release venv; kept when complete (the stamp file is written last), rebuilt otherwise
make_release() {
  local ver=$1 dir=$OPT/releases/$1
  if [ -f "$dir/.qrgate-release" ]; then
    say "release $ver is installed already ($dir): kept (bump firmware.__version__ for new code)"
    return
  fi
  rm -rf "$dir"
  mkdir -p "$OPT/releases"
  say "creating $dir"
  # a venv is not relocatable: it is built where it will stay; `current` moves only once it
  # is complete
  "$PYTHON" -m venv --system-site-packages "$dir"
  if [ "$PIP" = 1 ]; then
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$SRC"
    [ -x "$dir/bin/qrgate" ] || die "pip did not install $dir/bin/qrgate"
  else
    say "--no-pip: qrgate itself is not installed into $dir"
  fi
  install -m 0644 "$SRC/README.md" "$dir/README.md"
  printf '%s\n' "$ver" >"$dir/.qrgate-release"
}

switch_current() {
  local ver=$1
  # a relative link (valid under --root too), renamed over the old one: never a moment
  # without a `current`, never a half-written one
  ln -sfn "releases/$ver" "$OPT/current.new"
  mv -T "$OPT/current.new" "$OPT/current"
  say "$OPT/current -> releases/$ver"
}

write_config() {
  mkdir -p "$ETC" "$STATE"
  chmod 0750 "$ETC" "$STATE"
  if [ -e "$ETC/qrgate.toml" ]; then
    say "kept $ETC/qrgate.toml"
  else
    example_config >"$ETC/qrgate.toml.new"
    chmod 0640 "$ETC/qrgate.toml.new"
    mv "$ETC/qrgate.toml.new" "$ETC/qrgate.toml"
    say "wrote an example $ETC/qrgate.toml: set the door, pins and credential files"
  fi
  run chown "root:$USER_NAME" "$ETC" "$ETC/qrgate.toml"
  run chown "$USER_NAME:$USER_NAME" "$STATE"
}

example_config() {
  cat <<'EOF'
# qrgate reader config (written by install.sh; never overwritten by it). Every key is
# described in the README's "Configuration" section. Check it with:
#   /opt/qrgate/current/bin/qrgate config check /etc/qrgate/qrgate.toml
[reader]
door = "front-door"
direction = "in"
state_dir = "/var/lib/qrgate"

[camera]
source = "picamera2"
width = 640
height = 480
fps = 30

[decoder]
backend = "zxing-cpp"

[policy]
# relative paths are in /etc/qrgate
badges = "badges.json"
hmac_key = "site.key"

[gpio]
pin_factory = "auto"           # lgpio on a Pi 5
relay_pin = 17
relay_active_high = false      # most relay boards are active-low
strike = "fail-secure"
pulse_s = 3.0
led = { red = 5, green = 6, blue = 13 }
buzzer_pin = 12

[doors]
# contact_pin = 22            # door contact (closed while shut) to GND
# exit_pin = 23               # request-to-exit button to GND
# tamper_pin = 24             # tamper switch (closed while the case is shut) to GND

[ota]
# over-the-air updates (qrgate-updater.service); jobs come over the [uplink] broker
# repo_url = "https://updates.example.org/qrgate"   # the TUF repository
# trusted_root = "/etc/qrgate/ota-root.json"        # its root.json, installed by hand
# keep = 3                    # releases kept in /opt/qrgate/releases
# health_deadline_s = 120     # a new release must be healthy within this, or it is rolled back
# quiet_s = 5                 # restart only after this long without a scan or relay pulse
EOF
}

install_unit() {
  local unit
  mkdir -p "$UNIT_DIR"
  for unit in "$SERVICE" "$UPDATER"; do
    install -m 0644 "$SRC/scripts/$unit" "$UNIT_DIR/$unit.new"
    mv "$UNIT_DIR/$unit.new" "$UNIT_DIR/$unit"
  done
  run systemctl daemon-reload
  run systemctl enable "$SERVICE" "$UPDATER"
  for unit in "$SERVICE" "$UPDATER"; do
    if [ "$LIVE" = 1 ] && systemctl is-active --quiet "$unit"; then
      say "restarting the running $unit on the new release"
      systemctl restart "$unit"
    fi
  done
}

main() {
  if [ "$UNINSTALL" = 1 ]; then
    uninstall
    return
  fi
  local ver
  ver=$(version)
  [ -n "$ver" ] || die "no __version__ in $SRC/firmware/__init__.py"
  install_packages
  make_user
  make_release "$ver"
  switch_current "$ver"
  write_config
  install_unit
  say "qrgate $ver installed${ROOT:+ under $ROOT}"
  if [ "$LIVE" = 1 ] && ! systemctl is-active --quiet "$SERVICE"; then
    say "next: edit /etc/qrgate/qrgate.toml, run 'qrgate camera check' and 'qrgate selftest'"
    say "(as: sudo -u qrgate /opt/qrgate/current/bin/qrgate ...), then 'sudo systemctl start qrgate'"
  fi
}

main
