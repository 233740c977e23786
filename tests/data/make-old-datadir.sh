#!/usr/bin/env bash
# Makes tests/data/old-datadir.tar.xz: a data dir written by codexfs before flat files
# (commit 95cd850, block bytes in RocksDB and pack files), for tests/convert.rs.
# Usage: make-old-datadir.sh OLD_CODEXFS_BINARY. The inputs are patterns that compress
# well and that the test regenerates (tests/convert.rs: `pattern`).
set -euo pipefail
OLD=$1
OUT=$(cd "$(dirname "$0")" && pwd)/old-datadir.tar.xz
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$W"
pattern() { # KIND SIZE FILE
  python3 -c "
import sys
k, n = int(sys.argv[1]), int(sys.argv[2])
sys.stdout.buffer.write(bytes((((p >> 16) * 7 + k * 13 + p % 251) & 0xff) for p in range(n)))
" "$1" "$2" > "$3"
}
pattern 1 100000 small.txt
pattern 2 $((9 * 1048576 + 123)) big.bin
head -c 300000 /dev/zero > zeros.bin
pattern 3 700000 ec.bin
mkdir -p tree/sub
pattern 4 5000 tree/a.txt
pattern 5 200000 tree/sub/b.bin
pattern 6 $((8 * 1048576)) killed.bin
pattern 7 $((6 * 1048576)) deleted.bin
D=data
up() { "$OLD" upload "$@" --data-dir $D; }
{
  echo "small $(up small.txt)"
  echo "big $(up big.bin)"
  echo "big-renamed $(up big.bin --filename other.bin)"
  echo "zeros $(up zeros.bin)"
  echo "ec $(up ec.bin --ec 3,2)"
  echo "tree $(up tree)"
} > cids.txt
del=$(up deleted.bin)
"$OLD" rm "$del" --data-dir $D
# An upload killed part way: its holds stay in the journal.
"$OLD" upload killed.bin --data-dir $D & pid=$!
sleep "${KILL_AFTER:-0.12}"
kill -9 $pid || true
wait $pid || true
# (Opening it with the old binary would roll the upload back: check a copy.)
cp -a $D check-copy
CODEXFS_LOG=info "$OLD" check --data-dir check-copy 2>&1 | grep -E "rolling back|datasets" >&2
mv cids.txt $D/
tar -cJf "$OUT" $D
echo "wrote $OUT" >&2
