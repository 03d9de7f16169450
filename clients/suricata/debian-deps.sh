#!/bin/sh
# Installs, on Debian 12, what building and testing the plugin needs:
# Suricata 7 from bookworm-backports and its source (configured only: the
# plugin needs the headers and the generated config header, not a build).
#   debian-deps.sh SRCDIR      (as root; safe to run again)
set -eu
src=$(realpath -m "$1")
list=/etc/apt/sources.list.d/pktipc-bookworm-backports.sources
debs="suricata build-essential rustc cargo libpcap-dev libyaml-dev libjansson-dev
      libpcre2-dev zlib1g-dev libmagic-dev libhtp-dev dpkg-dev"

need_root() {
    [ "$(id -u)" = 0 ] || { echo "run as root to install $1" >&2; exit 1; }
}

if ! grep -rqs '^Suites:.*bookworm-backports' /etc/apt/sources.list.d/*.sources &&
   ! grep -rqs '^deb .* bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*.list; then
    # The mirror (and key) that serve bookworm itself, in the same deb822 format.
    set -- $(awk 'FNR == 1 || /^$/ { u = ""; k = ""; s = 0 }
                  /^URIs:/ { u = $2 } /^Signed-By:/ { k = $2 }
                  /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") s = 1 }
                  s && u && k { print u, k; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null)
    uri=${1:-http://deb.debian.org/debian}
    key=${2:-/usr/share/keyrings/debian-archive-keyring.gpg}
    need_root "the bookworm-backports apt source"
    printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$uri" "$key" > "$list"
    apt-get update -qq
fi

missing=
for p in $debs; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    need_root "them"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports $missing
fi

version=$(suricata -V | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p')
mkdir -p "$src"
if [ ! -f "$src/suricata-$version/configure" ]; then
    # The archive has the orig tarball (apt checks it against its index) but
    # not the .dsc: apt-get exits 1 after downloading it, which is expected.
    (cd "$src" && apt-get source -qq --download-only -t bookworm-backports "suricata=$(dpkg-query -W -f='${Version}' suricata)" || true)
    tarball=$(ls "$src"/suricata_"$version".orig.tar.* 2>/dev/null | head -1)
    [ -n "$tarball" ] || { echo "apt-get source fetched no suricata_$version.orig.tar.*" >&2; exit 1; }
    tar -C "$src" -xf "$tarball"
fi
if [ ! -f "$src/suricata-$version/config.status" ]; then
    # The tarball ships an autoconf.h of its maker's machine: configure for this one.
    (cd "$src/suricata-$version" && ./configure -q --enable-non-bundled-htp --prefix=/usr \
        --sysconfdir=/etc --localstatedir=/var >configure.log 2>&1) ||
        { tail -20 "$src/suricata-$version/configure.log" >&2; exit 1; }
fi
