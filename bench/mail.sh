#!/usr/bin/env bash
# Mail throughput: N receipts queued in a throwaway SQLite database, delivered by
# `autopay run --drain` to a local aiosmtpd that accepts and discards (Sink), at each
# email.smtp.pool_size given; then the same count by a plain Python client on one connection to
# the same server, for the ceiling. Prints one line per run.
#
#   bench/mail.sh [N] [POOL...]        (default: 2000 receipts, pools 1 4 8)
#
# Needs target/release/autopay (cargo build --release), python3 with aiosmtpd, and sqlite3.
# Everything it makes is in a temporary folder, removed at exit.
set -euo pipefail
N=${1:-2000}; shift || true
POOLS=${*:-1 4 8}
BIN=$(cd "$(dirname "$0")/.." && pwd)/target/release/autopay
[ -x "$BIN" ] || { echo "build the release binary first: cargo build --release" >&2; exit 69; }
python3 -c 'import aiosmtpd' 2>/dev/null || { echo "install aiosmtpd: python3 -m pip install aiosmtpd" >&2; exit 69; }
command -v sqlite3 >/dev/null || { echo "install sqlite3 (Debian: apt-get install sqlite3)" >&2; exit 69; }
DIR=$(mktemp -d "${TMPDIR:-/tmp}/autopay-mail-bench-XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m aiosmtpd -n -l "127.0.0.1:$PORT" -c aiosmtpd.handlers.Sink >"$DIR/smtpd.log" 2>&1 &
SMTPD=$!
trap 'kill $SMTPD 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 1 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null && break; sleep 0.1; done
cd "$DIR"
export AUTOPAY__DATABASE__URL="sqlite://$DIR/db.sqlite" AUTOPAY__LOG__LEVEL=warn
export AUTOPAY__EMAIL__TRANSPORT=smtp AUTOPAY__EMAIL__SMTP__HOST=127.0.0.1 AUTOPAY__EMAIL__SMTP__PORT=$PORT
export AUTOPAY__EMAIL__SMTP__TLS=none AUTOPAY__EMAIL__MAX_PER_SECOND=10000 AUTOPAY__DAEMON__BATCH_SIZE=500
for POOL in $POOLS; do
    rm -f db.sqlite*
    "$BIN" migrate >/dev/null
    "$BIN" member add --account A-100200 --name "Ana Diaz" --email ana@example.org \
        --type individual-family >/dev/null
    python3 - "$N" <<'PY'
import datetime, json, sqlite3, sys, uuid
n = int(sys.argv[1])
db = sqlite3.connect("db.sqlite")
member = db.execute("SELECT id FROM members LIMIT 1").fetchone()[0]
db.execute("UPDATE notifications SET state = 'sent'")  # the member's setup email
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
payload = json.dumps({
    "payment_id": str(uuid.uuid4()), "schedule_id": str(uuid.uuid4()), "member_name": "Ana Diaz",
    "account_type": "individual-family", "amount": "125.00", "currency": "USD",
    "credit_used": "0.00", "charged_at": "2026-12-01T17:00:00Z", "card": "Visa ending 4242",
    "confirmation": "pi_3QxR7u2eZvKYlo2C1aBcDeF0",
    "bills": [{"bill_id": str(uuid.uuid4()), "reference": "INV-1001", "amount": "125.00"}],
    "next_payment_at": "2027-01-01T17:00:00Z", "time_zone": "America/Los_Angeles"})
db.executemany(
    "INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, "
    "attempts, next_attempt_at, created_at) VALUES (?, 'receipt', ?, ?, 'ana@example.org', ?, "
    "'pending', 0, ?, ?)",
    [(str(uuid.uuid4()), f"receipt:bench:{i}", member, payload, now, now) for i in range(n)])
db.commit()
PY
    start=$(date +%s.%N)
    AUTOPAY__EMAIL__SMTP__POOL_SIZE=$POOL "$BIN" run --drain >/dev/null
    end=$(date +%s.%N)
    sent=$(sqlite3 db.sqlite "SELECT COUNT(*) FROM notifications WHERE state = 'sent' AND dedupe_key LIKE 'receipt:bench:%'")
    python3 -c "print(f'autopay, email.smtp.pool_size = $POOL: $sent of $N receipts in {$end - $start:.1f} s = {$sent / ($end - $start):.0f}/s')"
done
python3 - "$N" "$PORT" <<'PY'
import smtplib, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
body = ("x" * 70 + "\r\n") * 45
msg = "From: billing@example.org\r\nTo: ana@example.org\r\nSubject: receipt\r\n\r\n" + body
s = smtplib.SMTP("127.0.0.1", port)
t = time.time()
for _ in range(n):
    s.sendmail("billing@example.org", ["ana@example.org"], msg)
s.quit()
e = time.time() - t
print(f"plain Python client, one connection: {n} messages in {e:.1f} s = {n / e:.0f}/s")
PY
