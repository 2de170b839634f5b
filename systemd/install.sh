#!/bin/sh
# Install thzedge as a systemd service: user, directories, config, CURVE server key, unit.
#
#   sudo systemd/install.sh [--venv /opt/thzedge/venv] [--instance scanner0] [--no-start]
#   systemd/install.sh --root /tmp/stage --venv /opt/thzedge/venv   # stage files only (no root)
#
# Idempotent: existing config and keys are kept. The unit is checked with
# `systemd-analyze verify` (failing on any stderr output) before systemd sees it.
set -eu

VENV=/opt/thzedge/venv
INSTANCE=
START=1
ROOT=
HERE=$(cd "$(dirname "$0")" && pwd)

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$2; shift 2 ;;
        --instance) INSTANCE=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --root) ROOT=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

THZEDGE="$VENV/bin/thzedge"
if [ ! -x "$ROOT$THZEDGE" ] && [ ! -x "$THZEDGE" ]; then
    echo "install.sh: $THZEDGE not found; create the venv and 'pip install .' first (see README)" >&2
    exit 69
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or use --root DIR to stage the files)" >&2
    exit 77
fi

# Ownership only applies to a real install; a staged tree keeps the caller's ownership.
own() { [ -z "$ROOT" ] && chown "$@" || true; }

if [ -z "$ROOT" ] && ! getent passwd thzedge >/dev/null; then
    useradd --system --home-dir /var/lib/thzedge --no-create-home --shell /usr/sbin/nologin thzedge
    echo "created system user thzedge"
fi
if [ -z "$ROOT" ]; then
    for g in video render; do
        getent group "$g" >/dev/null && usermod -a -G "$g" thzedge || true
    done
fi

umask 077
install -d -m 0750 "$ROOT/etc/thzedge"; own root:thzedge "$ROOT/etc/thzedge"
install -d -m 0700 "$ROOT/etc/thzedge/keys"; own root:root "$ROOT/etc/thzedge/keys"
install -d -m 0750 "$ROOT/etc/thzedge/clients"; own root:thzedge "$ROOT/etc/thzedge/clients"
install -d -m 0750 "$ROOT/var/lib/thzedge"; own thzedge:thzedge "$ROOT/var/lib/thzedge"
# The engine cache (the unit's StateDirectory thzedge/engines): exists before the first start so
# `sudo -u thzedge thzedge export engine` can fill it; the daemon only reads it.
install -d -m 0700 "$ROOT/var/lib/thzedge/engines"; own thzedge:thzedge "$ROOT/var/lib/thzedge/engines"

if [ ! -e "$ROOT/etc/thzedge/thzedge.toml" ]; then
    install -m 0640 "$HERE/thzedge.toml" "$ROOT/etc/thzedge/thzedge.toml"
    own root:thzedge "$ROOT/etc/thzedge/thzedge.toml"
    echo "wrote $ROOT/etc/thzedge/thzedge.toml (edit [sources] and [model])"
fi

# The unit loads this file with LoadCredential=, so it must exist even while CURVE is off.
if [ ! -e "$ROOT/etc/thzedge/keys/server.key_secret" ]; then
    BIN="$THZEDGE"; [ -x "$ROOT$THZEDGE" ] && BIN="$ROOT$THZEDGE"
    "$BIN" keys generate --out "$ROOT/etc/thzedge/keys" --name server
fi

# The storage key (recordings and galleries at rest, R-SEC-7), also a LoadCredential= of the unit.
if [ ! -e "$ROOT/etc/thzedge/keys/storage.key" ]; then
    BIN="$THZEDGE"; [ -x "$ROOT$THZEDGE" ] && BIN="$ROOT$THZEDGE"
    "$BIN" keys generate --kind storage --out "$ROOT/etc/thzedge/keys"
fi

UNIT_DIR="$ROOT/etc/systemd/system"
install -d -m 0755 "$UNIT_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/opt/thzedge/venv#$VENV#g" "$HERE/thzedge@.service" > "$tmp/thzedge@.service"

if command -v systemd-analyze >/dev/null 2>&1; then
    # verify needs an instance name and an existing ExecStart binary.
    check="$tmp/check"; mkdir -p "$check"
    if [ -x "$THZEDGE" ]; then
        cp "$tmp/thzedge@.service" "$check/thzedge@verify.service"
    else
        sed "s#$THZEDGE#$ROOT$THZEDGE#g" "$tmp/thzedge@.service" > "$check/thzedge@verify.service"
    fi
    err=$(systemd-analyze verify --man=no "$check/thzedge@verify.service" 2>&1 >/dev/null) || true
    if [ -n "$err" ]; then
        echo "install.sh: systemd-analyze verify reported problems:" >&2
        echo "$err" >&2
        exit 78
    fi
    echo "unit verified (systemd-analyze verify: no warnings)"
fi
install -m 0644 "$tmp/thzedge@.service" "$UNIT_DIR/thzedge@.service"
echo "installed $UNIT_DIR/thzedge@.service"

[ -n "$ROOT" ] && exit 0
systemctl daemon-reload
if [ -n "$INSTANCE" ]; then
    "$THZEDGE" --config /etc/thzedge/thzedge.toml config validate
    if [ "$START" -eq 1 ]; then
        systemctl enable --now "thzedge@$INSTANCE.service"
        systemctl --no-pager status "thzedge@$INSTANCE.service" || true
    else
        systemctl enable "thzedge@$INSTANCE.service"
    fi
fi
