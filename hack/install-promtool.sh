#!/usr/bin/env bash
# Unpack Prometheus' promtool into the given folder, from the Debian archive's `prometheus` package, without
# installing it (no root): `apt-get download` fetches the .deb the configured sources offer, `dpkg-deb -x`
# unpacks it. The chart's alert tests evaluate the rendered rules with `promtool test rules`.
set -euo pipefail
dest=${1:-.tools/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The package lists a machine image ships with can name a version the archive has since replaced: then the
# download fails, and the lists are refreshed once (this needs root, as CI has) before trying again.
if ! (cd "$work" && apt-get download prometheus); then
    apt-get update -qq
    (cd "$work" && apt-get download prometheus)
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/pkg"
mkdir -p "$dest"
install -m 0755 "$work/pkg/usr/bin/promtool" "$dest/promtool"
# No `| head` here: under pipefail, promtool could die of SIGPIPE when head exits first.
"$dest/promtool" --version >/dev/null
echo "promtool installed in $dest"
