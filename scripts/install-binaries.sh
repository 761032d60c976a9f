#!/usr/bin/env bash
# Installs the release binaries without their debug info, which is kept
# apart: the build carries line tables (for perf and readable backtraces),
# which make a binary several times larger than the code it runs. Each
# installed binary keeps its symbol table (function names in panics and
# profiles) and a GNU debug link to its debug file, so gdb and perf find the
# line tables under DEBUGDIR when they are wanted.
#
#   scripts/install-binaries.sh            # build first: cargo build --release --workspace --bins
#   BINDIR=/opt/cartscore/bin DEBUGDIR=/opt/cartscore/debug scripts/install-binaries.sh
#   DESTDIR=/tmp/pkg scripts/install-binaries.sh   # stage into a package root
set -euo pipefail
cd "$(dirname "$0")/.."
release=${CARGO_TARGET_DIR:-target}/release
bindir=${DESTDIR:-}${BINDIR:-/usr/local/bin}
# gdb looks for a debug link under its debug-file directory plus the
# binary's own folder: /usr/lib/debug/usr/local/bin/cartscore.debug.
debugdir=${DESTDIR:-}${DEBUGDIR:-/usr/lib/debug${BINDIR:-/usr/local/bin}}
command -v objcopy >/dev/null || { echo "objcopy (binutils) is needed" >&2; exit 1; }
install -d "$bindir" "$debugdir"
for bin in cartscore cartscore-trainer cartscore-bench cartscore-producer; do
  built="$release/$bin"
  [ -x "$built" ] || { echo "$built is missing: run cargo build --release --workspace --bins" >&2; exit 1; }
  objcopy --only-keep-debug "$built" "$debugdir/$bin.debug"
  chmod 0644 "$debugdir/$bin.debug"
  # Written beside the target and renamed, so a running service's binary is
  # replaced whole, never overwritten in place.
  tmp="$bindir/.$bin.tmp"
  objcopy --strip-debug --add-gnu-debuglink="$debugdir/$bin.debug" "$built" "$tmp"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$bindir/$bin"
  printf '%-20s %4d MB -> %3d MB (debug info in %s)\n' "$bin" \
    $(( $(stat -c %s "$built") / 1048576 )) $(( $(stat -c %s "$bindir/$bin") / 1048576 )) "$debugdir/$bin.debug"
done
