#!/usr/bin/env bash
# Installs the real third-party peers the test suite talks to (Debian/Ubuntu, as root or with
# sudo): dnsmasq (MX records), Postfix's smtp-sink/smtp-source, fetchmail and msmtp (ETRN
# clients), swaks with its TLS modules, filefrag. Leaves no daemon running: the tests start
# what they need on loopback.
set -euo pipefail
need=()
have() { [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ] || command -v "$1" >/dev/null 2>&1; }
have dnsmasq    || need+=(dnsmasq-base)
have smtp-sink  || need+=(postfix)
have fetchmail  || need+=(fetchmail)
have msmtp      || need+=(msmtp)
have swaks      || need+=(swaks)
# swaks --tls needs Net::SSLeay (only a Recommends of swaks, which --no-install-recommends skips).
perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null || need+=(libnet-ssleay-perl libio-socket-ssl-perl)
have filefrag   || need+=(e2fsprogs)   # FIEMAP extent flags in the spool zero-fill test
if [ ${#need[@]} -eq 0 ]; then
  echo "test peers already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
echo "postfix postfix/mailname string relay.test" | $SUDO debconf-set-selections
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
# Postfix's package may start its daemon; the tests only use smtp-sink/smtp-source.
$SUDO postfix stop >/dev/null 2>&1 || true
echo "installed: ${need[*]}"
