#!/usr/bin/env bash
# A script written against Codex's REST API, in the style of Codex's own docs (curl only):
# upload, list, download (local and network), space, delete. tests/api.rs runs it
# unchanged against a codexfs node: CODEX_API is the only thing it is told.
set -euo pipefail
API=${CODEX_API:-http://localhost:8080/api/codex/v1}
WORK=${WORK:-$(mktemp -d)}

head -c 1000000 /dev/urandom > "$WORK/file.txt"

CID=$(curl --silent --fail --request POST \
  --header 'Content-Type: application/octet-stream' \
  --header 'Content-Disposition: filename="file.txt"' \
  --data-binary @"$WORK/file.txt" \
  "$API/data")
echo "uploaded $CID"

curl --silent --fail "$API/data" > "$WORK/list.json"
python3 - "$WORK/list.json" "$CID" <<'PY'
import json, sys
content = json.load(open(sys.argv[1]))["content"]
item = next(i for i in content if i["cid"] == sys.argv[2])
m = item["manifest"]
assert m["datasetSize"] == 1000000 and m["filename"] == "file.txt", m
assert set(m) >= {"treeCid", "datasetSize", "blockSize", "protected"}, m
PY

curl --silent --fail "$API/data/$CID" --output "$WORK/local.txt"
cmp "$WORK/file.txt" "$WORK/local.txt"
curl --silent --fail "$API/data/$CID/network/stream" --output "$WORK/stream.txt"
cmp "$WORK/file.txt" "$WORK/stream.txt"
curl --silent --fail "$API/data/$CID/network/manifest" | python3 -c \
  'import json,sys; assert json.load(sys.stdin)["manifest"]["datasetSize"] == 1000000'

curl --silent --fail "$API/space" | python3 -c \
  'import json,sys; s = json.load(sys.stdin); assert s["quotaUsedBytes"] >= 1000000 and s["totalBlocks"] >= 17, s'

status=$(curl --silent --output /dev/null --write-out '%{http_code}' --request DELETE "$API/data/$CID")
[ "$status" = 204 ]
status=$(curl --silent --output /dev/null --write-out '%{http_code}' "$API/data/$CID")
[ "$status" = 404 ]
curl --silent --fail "$API/space" | python3 -c \
  'import json,sys; s = json.load(sys.stdin); assert s["quotaUsedBytes"] == 0, s'
echo "all good"
