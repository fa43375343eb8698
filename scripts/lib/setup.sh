# Shared set-up for scripts/test and scripts/demo: the virtualenv with the
# project installed, and (when asked) the system packages the tests use.
# Source it from the project root; it defines ensure_venv and ensure_system_packages.

VENV="${VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtualenv $VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    fi
    local stamp="$VENV/.installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "==> installing the project${extras:+ with [$extras]} into $VENV"
        if ! "$VENV/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}" \
                >"$VENV/pip.log" 2>&1; then
            tail -n 30 "$VENV/pip.log" >&2
            echo "error: pip could not install the project (full log: $VENV/pip.log)" >&2
            return 1
        fi
        "$VENV/bin/python" -c "import sheep, dog, lmdb, mmh3, sortedcontainers, click" \
            || { echo "error: the project did not install into $VENV" >&2; return 1; }
        touch "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}

# Debian packages and a command (or file) that shows each is installed.
SYSTEM_PACKAGES=(
    "nbdkit:nbdkit"
    "nbdkit-plugin-python:/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so"
    "qemu-utils:qemu-img"
    "qemu-system-x86:qemu-system-x86_64"
    "libnbd-bin:nbdinfo"
    "fio:fio"
    "zookeeper:/usr/share/zookeeper/bin/zkServer.sh"
    "tcpdump:tcpdump"
    "gnutls-bin:psktool"
    "python3-cryptography:/usr/lib/python3/dist-packages/cryptography"
    "ceph-common:rbd"
)

_present() {
    case "$1" in
        /*) [ -e "$1" ] || compgen -G "/usr/lib/*/nbdkit/plugins/$(basename "$1")" >/dev/null ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

ensure_system_packages() {
    local missing=() entry package probe
    for entry in "${SYSTEM_PACKAGES[@]}"; do
        package="${entry%%:*}"
        probe="${entry#*:}"
        _present "$probe" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing system packages: ${missing[*]}"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
               && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                  "${missing[@]}" >/dev/null; }; then
            echo "warning: apt-get could not install ${missing[*]}; tests that need them fail" >&2
        fi
    else
        echo "note: these system packages are missing: ${missing[*]}" >&2
        echo "      install them with: sudo apt-get install -y ${missing[*]}" >&2
    fi
}
