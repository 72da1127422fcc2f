#!/usr/bin/env bash
# etrn-relay against Postfix 3.7 (and smtp-sink, the no-storage ceiling) with Postfix's own
# tools, every target measured in the same run, loopback only:
#   accept: smtp-source -s 20 -m A -l 1024 into the relay (fsync on), Postfix (mail held until
#           ETRN) and smtp-sink, ROUNDS times each;
#   flush:  F queued 1 KiB messages for node1.test, one ETRN, time until smtp-sink -c has all of
#           them: the relay (MX of node1.test -> 127.0.0.2, a smtp-sink there) and Postfix (its
#           etrnsmtp transport -> the peers' smtp-sink on 127.0.0.1:2626).
# Needs the peers of shared/peers/setup.sh, installed and started (`setup.sh install`, `start`):
# Postfix on 127.0.0.1:2525, smtp-sink -c on :2626 (run/sink.out), smtp-sink on :2727, DNS on :5353.
# Usage: loadtest/postfix-compare.sh [A=20000] [F=10000] [ROUNDS=3]   (BIN= overrides the relay;
# SHARDS=n sets its shards, default one per CPU; A=0 or F=0 skips those rounds)
# LAYOUT=pinned runs every round with each server under test (the relay, Postfix's master
# and so every daemon it forks, smtp-sink) on CPU 1 and smtp-source on CPU 0, so the client has
# a core of its own and each server gets the same single core; the relay, on its default
# `shards = 0`, then starts one shard (one per CPU it may use). Default: everything unbound.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:-20000}; F=${2:-10000}; ROUNDS=${3:-3}
BIN=${BIN:-target/release/etrn-relay}
PEERS=${PEERS:-/tmp/peers}
SRC=/usr/sbin/smtp-source; SINKBIN=/usr/sbin/smtp-sink
[ -x "$BIN" ] || cargo build --release -p etrn-relay
[ -x "$SRC" ] || { echo "smtp-source missing: apt-get install postfix"; exit 1; }
postfix status >/dev/null 2>&1 || { echo "Postfix is not running: bash shared/peers/setup.sh install && bash shared/peers/setup.sh start"; exit 1; }
ALL_CPUS="0-$(($(nproc) - 1))"
LAYOUT=${LAYOUT:-unbound}
case "$LAYOUT" in
  unbound) SERVER_CPUS=$ALL_CPUS; CLIENT_CPUS=$ALL_CPUS ;;
  pinned) [ "$(nproc)" -ge 2 ] || { echo "LAYOUT=pinned needs 2 CPUs"; exit 1; }; SERVER_CPUS=1; CLIENT_CPUS=0 ;;
  *) echo "LAYOUT is unbound or pinned"; exit 1 ;;
esac
# pin_servers CPUS: Postfix (master, and the daemons running now; new ones inherit master's
# affinity) and the peers' smtp-sink processes onto CPUS.
pin_servers() {
  local p
  for p in $(pgrep -x master) $(pgrep -U postfix) $(pgrep -x smtp-sink); do taskset -pc "$1" "$p" >/dev/null 2>&1 || true; done
}
W=$(mktemp -d); RP=""; FSP=""
cleanup() { [ -n "$RP" ] && kill "$RP" 2>/dev/null; [ -n "$FSP" ] && kill "$FSP" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap 'cleanup; [ "$LAYOUT" = unbound ] || pin_servers "$ALL_CPUS"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RPORT=$(free_port); FPORT=$(free_port)
queued() { find /var/spool/postfix/{incoming,active,deferred,maildrop} -type f 2>/dev/null | wc -l; }
deferred() { find /var/spool/postfix/deferred -type f 2>/dev/null | wc -l; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/($3-$2):.0f}')"; }
src() { taskset -c "$CLIENT_CPUS" "$SRC" "$@"; }
pin_servers "$SERVER_CPUS"

start_relay() {
  rm -rf "$W/spool"
  cat > "$W/relay.toml" <<EOF
hostname = "relay.test"
spool_dir = "$W/spool"
shards = ${SHARDS:-0}
[smtp]
listen = ["127.0.0.1:$RPORT"]
[dns]
nameservers = ["127.0.0.1:5353"]
[delivery]
port = $FPORT
[[node]]
name = "node1.test"
EOF
  ETRN_RELAY_LOG=warn taskset -c "$SERVER_CPUS" "$BIN" serve --config "$W/relay.toml" 2>>"$W/relay.log" & RP=$!
  for _ in $(seq 1 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$RPORT),1)" 2>/dev/null && break; sleep 0.05; done
}
stop_relay() { kill -TERM "$RP"; wait "$RP" || true; RP=""; }

# ETRN node1.test at HOST PORT, then wait until the smtp-sink -c output file SINKOUT counts N
# more messages. Prints the ETRN reply time and the flush time and rate.
etrn_and_wait() {
  python3 - "$@" <<'EOF'
import re, smtplib, sys, time
host, port, path, want = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def count():
    with open(path, 'rb') as f:
        f.seek(0, 2); n = f.tell(); f.seek(max(0, n - 200)); t = f.read().decode(errors='replace')
    m = re.findall(r'mesg=(\d+)', t)
    return int(m[-1]) if m else 0
base = count()
s = smtplib.SMTP(host, port); s.ehlo('flush.client.test')
t0 = time.time(); code, text = s.docmd('ETRN', 'node1.test'); t1 = time.time(); s.quit()
while count() - base < want and time.time() - t0 < 900:
    time.sleep(0.002)
t2 = time.time(); got = count() - base
print(f"ETRN reply {code} {text.decode()!r} in {1000*(t1-t0):.2f} ms; {got} delivered in {t2-t0:.3f} s = {got/(t2-t0):.0f} msg/s")
EOF
}

echo "# machine: $(nproc) CPUs, $(uname -r); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# accept: smtp-source -s 20 -m $A -l 1024 (a new connection per message); layout $LAYOUT: servers on CPUs $SERVER_CPUS, smtp-source on $CLIENT_CPUS"
for r in $(seq 1 "$([ "$A" -gt 0 ] && echo "$ROUNDS" || echo 0)"); do
  start_relay
  s=$(now); src -s 20 -m "$A" -l 1024 -f sender@client.test -t user@node1.test "127.0.0.1:$RPORT"; e=$(now)
  relay=$(rate "$A" "$s" "$e"); stop_relay
  # smtp-sink before Postfix: Postfix goes on working through what it accepted (cleanup,
  # qmgr) after smtp-source ends, and a target measured then would share the CPUs with it.
  s=$(now); src -s 20 -m "$A" -l 1024 -f sender@client.test -t user@node1.test 127.0.0.1:2727; e=$(now)
  sink=$(rate "$A" "$s" "$e")
  postsuper -d ALL >/dev/null 2>&1 || true; sync; sleep 2
  s=$(now); src -s 20 -m "$A" -l 1024 -f sender@client.test -t user@node1.test 127.0.0.1:2525; e=$(now)
  pf=$(rate "$A" "$s" "$e")
  echo "accept round $r: relay=$relay postfix=$pf smtp-sink=$sink msg/s; relay/postfix=$(python3 -c "print(f'{$relay/$pf:.1f}')") relay/sink=$(python3 -c "print(f'{$relay/$sink:.2f}')")"
  for _ in $(seq 1 120); do [ "$(queued)" -ge "$A" ] && break; sleep 0.5; done
  postsuper -d ALL >/dev/null 2>&1 || true; sleep 2
done

[ "$F" -gt 0 ] || exit 0
echo "# flush: $F queued 1 KiB messages for node1.test, one ETRN, until smtp-sink -c has them all"
taskset -c "$SERVER_CPUS" $SINKBIN -c -u nobody "127.0.0.2:$FPORT" 256 > "$W/fsink.out" 2>&1 & FSP=$!
sleep 0.3
for r in $(seq 1 "$ROUNDS"); do
  start_relay
  src -s 20 -m "$F" -l 1024 -f sender@client.test -t user@node1.test "127.0.0.1:$RPORT"
  printf 'flush round %s relay:   ' "$r"; etrn_and_wait 127.0.0.1 "$RPORT" "$W/fsink.out" "$F"
  stop_relay
  postsuper -d ALL >/dev/null 2>&1 || true; sleep 2
  src -s 20 -m "$F" -l 1024 -f sender@client.test -t user@node1.test 127.0.0.1:2525
  for _ in $(seq 1 600); do [ "$(deferred)" -ge "$F" ] && [ "$(queued)" -eq "$(deferred)" ] && break; sleep 0.5; done
  printf 'flush round %s postfix: ' "$r"; etrn_and_wait 127.0.0.1 2525 "$PEERS/run/sink.out" "$F"
  for _ in $(seq 1 120); do [ "$(queued)" -eq 0 ] && break; sleep 0.5; done
done
