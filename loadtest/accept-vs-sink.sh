#!/usr/bin/env bash
# Accept rate of etrn-relay (fsync on) against Postfix's smtp-sink (stores nothing) in the same
# run, with Postfix's own client: smtp-source -s 20 -m N -l 1024 (a new connection per message).
# With BASE=<another etrn-relay binary> each round also measures that build (e.g. the previous
# release), so a change is reported as a ratio against its baseline measured minutes apart.
# Loopback only. Usage: [BIN=...] [BASE=...] loadtest/accept-vs-sink.sh [messages] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}; ROUNDS=${2:-3}
BIN=${BIN:-target/release/etrn-relay}
BASE=${BASE:-}
[ -x "$BIN" ] || cargo build --release
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || { echo "apt-get install postfix"; exit 1; }
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
RPORT=$((20000 + RANDOM % 20000)); SPORT=$((RPORT + 1))
rate() { python3 -c "print(f'{$1/($3-$2):.0f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
# measure BINARY SHARDS: prints msg/s of one smtp-source run against a fresh relay
measure() {
  rm -rf "$W/spool"
  printf 'hostname = "relay.test"\nspool_dir = "%s/spool"\nshards = %s\n[smtp]\nlisten = ["127.0.0.1:%s"]\n[[node]]\nname = "node1.test"\n' "$W" "$2" "$RPORT" > "$W/r.toml"
  ETRN_RELAY_LOG=warn "$1" serve --config "$W/r.toml" 2>"$W/log" & local rp=$!
  for _ in $(seq 1 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$RPORT),1)" 2>/dev/null && break; sleep 0.05; done
  local s e; s=$(date +%s.%N); /usr/sbin/smtp-source -s 20 -m "$N" -l 1024 -f a@client.test -t x@node1.test 127.0.0.1:$RPORT; e=$(date +%s.%N)
  kill -TERM $rp; wait $rp || true
  rate "$N" "$s" "$e"
}
/usr/sbin/smtp-sink -u nobody 127.0.0.1:$SPORT 256 & sleep 0.5
for shards in 2 1; do
  for r in $(seq 1 "$ROUNDS"); do
    relay=$(measure "$BIN" "$shards")
    base=""; [ -n "$BASE" ] && base=$(measure "$BASE" "$shards")
    s=$(date +%s.%N); /usr/sbin/smtp-source -s 20 -m "$N" -l 1024 -f a@client.test -t x@node1.test 127.0.0.1:$SPORT; e=$(date +%s.%N)
    sink=$(rate "$N" "$s" "$e")
    line="shards=$shards round=$r relay=$relay msg/s sink=$sink msg/s relay/sink=$(ratio "$relay" "$sink")"
    [ -n "$base" ] && line="$line base=$base msg/s base/sink=$(ratio "$base" "$sink") relay/base=$(ratio "$relay" "$base")"
    echo "$line"
  done
done
