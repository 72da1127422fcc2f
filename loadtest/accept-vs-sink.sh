#!/usr/bin/env bash
# Accept rate of etrn-relay (fsync on) against Postfix's smtp-sink (stores nothing) in the same
# run, with Postfix's own client: smtp-source -s 20 -m N -l 1024 (a new connection per message).
# Loopback only. Usage: loadtest/accept-vs-sink.sh [messages] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}; ROUNDS=${2:-3}
BIN=${BIN:-target/release/etrn-relay}
[ -x "$BIN" ] || cargo build --release
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || { echo "apt-get install postfix"; exit 1; }
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
RPORT=$((20000 + RANDOM % 20000)); SPORT=$((RPORT + 1))
rate() { python3 -c "print(f'{$1/($3-$2):.0f}')"; }
/usr/sbin/smtp-sink -u nobody 127.0.0.1:$SPORT 256 & sleep 0.5
for shards in 2 1; do
  for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$W/spool"
    printf 'hostname = "relay.test"\nspool_dir = "%s/spool"\nshards = %s\n[smtp]\nlisten = ["127.0.0.1:%s"]\n[[node]]\nname = "node1.test"\n' "$W" "$shards" "$RPORT" > "$W/r.toml"
    ETRN_RELAY_LOG=warn $BIN serve --config "$W/r.toml" 2>"$W/log" & RP=$!; sleep 1
    s=$(date +%s.%N); /usr/sbin/smtp-source -s 20 -m "$N" -l 1024 -f a@client.test -t x@node1.test 127.0.0.1:$RPORT; e=$(date +%s.%N)
    relay=$(rate "$N" "$s" "$e")
    kill -TERM $RP; wait $RP || true
    s=$(date +%s.%N); /usr/sbin/smtp-source -s 20 -m "$N" -l 1024 -f a@client.test -t x@node1.test 127.0.0.1:$SPORT; e=$(date +%s.%N)
    sink=$(rate "$N" "$s" "$e")
    echo "shards=$shards round=$r relay=$relay msg/s sink=$sink msg/s ratio=$(python3 -c "print(f'{$relay/$sink:.2f}')")"
  done
done
