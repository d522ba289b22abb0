#!/usr/bin/env bash
# Unpack Prometheus' promtool into the given folder, from the Debian archive's `prometheus` package, without
# installing it (no root): `apt-get download` fetches the .deb the configured sources offer, `dpkg-deb -x`
# unpacks it. The chart's alert tests evaluate the rendered rules with `promtool test rules`.
set -euo pipefail
dest=${1:-.tools/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download prometheus)
dpkg-deb -x "$work"/prometheus_*.deb "$work/pkg"
mkdir -p "$dest"
install -m 0755 "$work/pkg/usr/bin/promtool" "$dest/promtool"
# No `| head` here: under pipefail, promtool could die of SIGPIPE when head exits first.
"$dest/promtool" --version >/dev/null
echo "promtool installed in $dest"
