#!/usr/bin/env bash
# Installs the Debian packages the gateway and its tests need, only those missing.
# Usage: scripts/install-deps.sh [run|test]   (default: test)
set -euo pipefail
mode=${1:-test}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
want() { # want COMMAND PACKAGE: queue PACKAGE when COMMAND is missing
  command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || need+=("$2")
}

want python3 python3
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
want openssl openssl
if [ "$mode" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  want runuser util-linux
  want gpgsm gpgsm
  want gpg gpg                      # python-gnupg: OpenPGP-encrypted exports
  want swaks swaks
  perl -MIO::Socket::SSL -e1 2>/dev/null || need+=(libio-socket-ssl-perl)   # swaks' STARTTLS and TLS
  perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
  want msmtp msmtp
  want curl curl
  want mutt mutt
  want mbsync isync
  want offlineimap offlineimap3
  want dnsmasq dnsmasq-base
  want /usr/sbin/postfix postfix  # a third operator in tests/interop (a standalone instance, never on port 25)
  want /usr/sbin/haproxy haproxy  # TCP load balancer with the PROXY protocol in front of the nodes (tests/haproxy.py)
  want /usr/bin/chromium chromium  # the webmail's browser tests (Playwright drives Debian's chromium)
  want node nodejs                 # axe-core, injected by the browser tests
  want npm npm
  want systemd-analyze systemd   # tests/ops/test_deployment.py verifies the unit (systemd is not started)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Postfix: "No configuration", so the package sets up no system instance and starts nothing.
  printf '%s\n' "postfix postfix/main_mailer_type select No configuration" \
    "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# axe-core (accessibility checks of the webmail's browser tests), from npm into a cache beside the
# checkout (gitignored); tests/webmail/conftest.py reads node_modules/axe-core/axe.min.js from there.
if [ "$mode" = test ]; then
  axe_dir="$(cd "$(dirname "$0")/.." && pwd)/.cache/axe"
  if [ ! -f "$axe_dir/node_modules/axe-core/axe.min.js" ]; then
    echo "== installing axe-core from npm into $axe_dir" >&2
    mkdir -p "$axe_dir"
    npm install --prefix "$axe_dir" --no-audit --no-fund --silent axe-core@4 >/dev/null
  fi
fi
