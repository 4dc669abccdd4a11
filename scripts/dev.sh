#!/usr/bin/env bash
# Sets up what is missing, builds Petrel, starts the embedded dev cluster
# (3 brokers + 1 proxy, data in ./petrel-data), runs a short produce/consume
# demo against it, then keeps the cluster running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --workspace --bins
PETREL="$CARGO_TARGET_DIR/debug/petrel"
PORT="${PETREL_PORT:-7400}"
EP="127.0.0.1:$PORT"

DATA="${PETREL_DATA_DIR:-./petrel-data}"
READY_FILE="$(mktemp)"
ADMIN_PORT="${PETREL_ADMIN_PORT:-$((PORT + 9))}"
"$PETREL" --json dev --data-dir "$DATA" --port "$PORT" --admin-port "$ADMIN_PORT" >"$READY_FILE" &
DEV=$!
trap 'kill -INT $DEV 2>/dev/null; wait $DEV 2>/dev/null || true; rm -f "$READY_FILE"' EXIT INT TERM

for _ in $(seq 1 200); do
  grep -q '"ready"' "$READY_FILE" && break
  kill -0 $DEV 2>/dev/null || { echo "petrel dev exited; see the messages above" >&2; exit 1; }
  sleep 0.3
done
grep -q '"ready"' "$READY_FILE" || { echo "petrel dev did not become ready" >&2; exit 1; }
echo "Local cluster ready: 3 brokers + 1 proxy at $EP, data in $DATA"

run() { echo; echo "\$ petrel $*"; "$PETREL" --endpoint "$EP" "$@"; }
run cluster describe
"$PETREL" --endpoint "$EP" topic describe demo >/dev/null 2>&1 || run topic create demo
run topic describe demo
echo; echo "\$ printf 'hello\\nworld\\n' | petrel produce --topic demo --key greeting"
printf 'hello\nworld\n' | "$PETREL" --endpoint "$EP" produce --topic demo --key greeting
run produce --topic demo --count 5 --size 32
run consume --topic demo --group demo-readers --max 7 --wait-ms 3000
run group describe demo-readers
run message find --topic demo --key greeting

echo; echo "# FIFO: one message group's records arrive in send order"
"$PETREL" --endpoint "$EP" topic describe demo-fifo >/dev/null 2>&1 || run topic create demo-fifo --type fifo --queues 2 --replicas 3
run produce --topic demo-fifo --message-group order-7 --count 3 --size 16
run consume --topic demo-fifo --group fifo-readers --max 3 --wait-ms 3000

echo; echo "# Delay: a record sent now, delivered 2 s later"
"$PETREL" --endpoint "$EP" topic describe demo-delay >/dev/null 2>&1 || run topic create demo-delay --type delay --queues 1 --replicas 3
run produce --topic demo-delay --delay-ms 2000 --count 1 --size 16
run consume --topic demo-delay --group later --max 1 --wait-ms 5000

echo; echo "# Metrics and health of the whole embedded cluster:"
echo "#   curl http://127.0.0.1:$ADMIN_PORT/metrics   /healthz   /readyz"
echo
echo "Demo done. The cluster keeps running at $EP (Ctrl-C to stop)."
if command -v petrel >/dev/null 2>&1; then
  echo "Try it: petrel topic list   (petrel on your PATH: $(command -v petrel))"
else
  echo "Try it: $PETREL topic list"
  echo "To have 'petrel' on your PATH (in ~/.cargo/bin), in another shell:"
  echo "  source scripts/env.sh && cargo install --locked --path tools"
  echo "and shell completions: petrel completions bash > ~/.local/share/bash-completion/completions/petrel"
fi
wait $DEV || true
