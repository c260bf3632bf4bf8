#!/bin/sh
# The appliance's console screen: address, API key, CA fingerprint and status on
# tty1 (redrawn every few seconds) and on the serial console (whenever it changes).
# The API key is shown on tty1 only: a serial line is often logged or shared (a BMC's
# serial-over-LAN, a console server), the local screen is not.
set -u
STATE=/var/lib/cube
KEY_FILE="$STATE/default-api-key"
CA="$STATE/ca/ca.pem"
PORT="$(sed -n 's/^api_port *= *\([0-9]*\).*/\1/p' "$STATE/appliance.toml" 2>/dev/null)"
PORT="${PORT:-3000}"
last=""

# The address clients reach the API at (lan_address).
. /usr/lib/cube/lan-address.sh

# What the screens show, read once per round into variables.
gather() {
  address="$(lan_address)"
  if curl -fsS --max-time 5 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
    status="running"
    # The first key is created once the service answers, then kept on CUBE-DATA.
    if [ ! -s "$KEY_FILE" ]; then
      (umask 077; cube keys create --name default --json 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])' > "$KEY_FILE.new") \
        && [ -s "$KEY_FILE.new" ] && mv "$KEY_FILE.new" "$KEY_FILE"
    fi
  else
    status="starting ($(systemctl is-active cube.service 2>/dev/null))"
  fi
  fingerprint="$(openssl x509 -noout -fingerprint -sha256 -in "$CA" 2>/dev/null | cut -d= -f2)"
  # The service's latest warnings and errors: what an operator at the console needs first.
  problems="$(journalctl -u cube.service -n 300 -o cat --no-pager 2>/dev/null \
    | grep -E ' (WARNING|ERROR|CRITICAL) |Traceback' | tail -n 6 | cut -c1-300)"
  data="$(findmnt -no SOURCE "$STATE" 2>/dev/null || echo 'RAM (no disk: lost at reboot)')"
  templates="$(ls "$STATE/templates" 2>/dev/null | tr '\n' ' ')"
}

# screen tty1|serial: the text for that console; the key itself only on tty1.
screen() {
  if [ "$1" = tty1 ]; then
    key="$(cat "$KEY_FILE" 2>/dev/null || echo '(created when the service is up)')"
  else
    key="(shown on the local console, tty1)"
  fi
  cat <<SCREEN
==================== Cube appliance ====================
Status:          $status
Address:         http://${address:-(no address yet)}:$PORT
API key:         $key
CA SHA-256:      ${fingerprint:-(created when the service is up)}
Data:            $data
Templates:       $templates

  export E2B_API_URL=http://${address:-ADDRESS}:$PORT
  export E2B_SANDBOX_URL=http://${address:-ADDRESS}:$PORT
  export E2B_API_KEY=$key
========================================================
SCREEN
  [ -z "$problems" ] || printf 'Recent warnings (journalctl -u cube):\n%s\n' "$problems"
}

while :; do
  gather
  printf '\033[H\033[2J%s\n' "$(screen tty1)" > /dev/tty1 2>/dev/null
  text="$(screen serial)"
  if [ "$text" != "$last" ]; then
    printf '\n%s\n' "$text" > /dev/ttyS0 2>/dev/null
    last="$text"
  fi
  sleep 5
done
