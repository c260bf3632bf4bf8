#!/bin/sh
# The appliance's console screen: address, API key, CA fingerprint and status on
# tty1 (redrawn every few seconds) and on the serial console (whenever it changes).
set -u
STATE=/var/lib/cube
KEY_FILE="$STATE/default-api-key"
CA="$STATE/ca/ca.pem"
PORT="$(sed -n 's/^api_port *= *\([0-9]*\).*/\1/p' "$STATE/appliance.toml" 2>/dev/null)"
PORT="${PORT:-3000}"
last=""

screen() {
  # The source address of the default route (no packet is sent): not the
  # sandboxes' own host-side addresses, which are global too.
  address="$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')"
  [ -n "$address" ] || address="$(ip -4 -o addr show scope global 2>/dev/null \
    | awk '$2 !~ /^cube/ {split($4, a, "/"); print a[1]; exit}')"
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
  key="$(cat "$KEY_FILE" 2>/dev/null || echo '(created when the service is up)')"
  fingerprint="$(openssl x509 -noout -fingerprint -sha256 -in "$CA" 2>/dev/null | cut -d= -f2)"
  # The service's latest warnings and errors: what an operator at the console needs first.
  problems="$(journalctl -u cube.service -n 300 -o cat --no-pager 2>/dev/null \
    | grep -E ' (WARNING|ERROR|CRITICAL) |Traceback' | tail -n 6 | cut -c1-300)"
  data="$(findmnt -no SOURCE "$STATE" 2>/dev/null || echo 'RAM (no disk: lost at reboot)')"
  cat <<SCREEN
==================== Cube appliance ====================
Status:          $status
Address:         http://${address:-(no address yet)}:$PORT
API key:         $key
CA SHA-256:      ${fingerprint:-(created when the service is up)}
Data:            $data
Templates:       $(ls "$STATE/templates" 2>/dev/null | tr '\n' ' ')

  export E2B_API_URL=http://${address:-ADDRESS}:$PORT
  export E2B_SANDBOX_URL=http://${address:-ADDRESS}:$PORT
  export E2B_API_KEY=$key
========================================================
SCREEN
  [ -z "$problems" ] || printf 'Recent warnings (journalctl -u cube):\n%s\n' "$problems"
}

while :; do
  text="$(screen)"
  printf '\033[H\033[2J%s\n' "$text" > /dev/tty1 2>/dev/null
  if [ "$text" != "$last" ]; then
    printf '\n%s\n' "$text" > /dev/ttyS0 2>/dev/null
    last="$text"
  fi
  sleep 5
done
