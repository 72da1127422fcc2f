#!/usr/bin/env bash
# Accept rate of etrn-relay (fsync on) against Postfix's smtp-sink (stores nothing) in the same
# run, with Postfix's own client: smtp-source -s 20 -m N -l 1024 (a new connection per message).
# With BASE=<another etrn-relay binary> each round also measures that build (e.g. the previous
# release), so a change is reported as a ratio against its baseline measured minutes apart.
# Three layouts: two shards and one shard, everything unbound (the kernel places the relay,
# the sink and smtp-source on the two CPUs as it likes), and "pinned": the relay (one shard)
# and the sink on CPU 1, smtp-source on CPU 0, so the server under test has a core of its own
# and the kernel's placement is out of the figure.
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
NCPU=$(nproc)
# cpus LAYOUT ROLE: the CPU list a role (server, client) runs on in a layout
cpus() { if [ "$1" = pinned ]; then [ "$2" = server ] && echo 1 || echo 0; else echo "0-$((NCPU - 1))"; fi; }
client() { taskset -c "$(cpus "$1" client)" /usr/sbin/smtp-source -s 20 -m "$N" -l 1024 -f a@client.test -t x@node1.test "127.0.0.1:$2"; }
# measure BINARY LAYOUT: prints msg/s of one smtp-source run against a fresh relay
measure() {
  rm -rf "$W/spool"
  local shards=$2; [ "$2" = pinned ] && shards=1
  printf 'hostname = "relay.test"\nspool_dir = "%s/spool"\nshards = %s\n[smtp]\nlisten = ["127.0.0.1:%s"]\n[[node]]\nname = "node1.test"\n' "$W" "$shards" "$RPORT" > "$W/r.toml"
  ETRN_RELAY_LOG=warn taskset -c "$(cpus "$2" server)" "$1" serve --config "$W/r.toml" 2>"$W/log" & local rp=$!
  for _ in $(seq 1 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$RPORT),1)" 2>/dev/null && break; sleep 0.05; done
  local s e; s=$(date +%s.%N); client "$2" "$RPORT"; e=$(date +%s.%N)
  kill -TERM $rp; wait $rp || true
  rate "$N" "$s" "$e"
}
[ "$NCPU" -ge 2 ] || { echo "needs 2 CPUs"; exit 1; }
for layout in 2 1 pinned; do
  /usr/sbin/smtp-sink -u nobody 127.0.0.1:$SPORT 256 & SINK=$!; sleep 0.5
  taskset -pc "$(cpus "$layout" server)" "$SINK" >/dev/null
  for r in $(seq 1 "$ROUNDS"); do
    relay=$(measure "$BIN" "$layout")
    base=""; [ -n "$BASE" ] && base=$(measure "$BASE" "$layout")
    s=$(date +%s.%N); client "$layout" "$SPORT"; e=$(date +%s.%N)
    sink=$(rate "$N" "$s" "$e")
    line="shards=$layout round=$r relay=$relay msg/s sink=$sink msg/s relay/sink=$(ratio "$relay" "$sink")"
    [ -n "$base" ] && line="$line base=$base msg/s base/sink=$(ratio "$base" "$sink") relay/base=$(ratio "$relay" "$base")"
    echo "$line"
  done
  kill "$SINK"; wait "$SINK" 2>/dev/null || true
done
