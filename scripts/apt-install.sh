# Sourced by the set-up scripts: apt_install SECONDS PACKAGE... installs Debian packages with
# apt-get, refreshing the package index at most once per CI run (a stamp in /run: one boot).
# Returns 1 after printing which step failed on stderr; the caller decides what that means.
apt_install() {
    local limit="$1"
    shift
    export DEBIAN_FRONTEND=noninteractive
    if ! find /run/sfxflow-apt-updated -mmin -120 2>/dev/null | grep -q .; then
        if ! timeout 300 apt-get -q -o DPkg::Lock::Timeout=120 update >/dev/null; then
            echo "apt-get update failed" >&2
            return 1
        fi
        touch /run/sfxflow-apt-updated
    fi
    if ! timeout "$limit" apt-get -q -y -o DPkg::Lock::Timeout=120 install \
            --no-install-recommends "$@" >/dev/null; then
        echo "apt-get install $* failed" >&2
        return 1
    fi
}
