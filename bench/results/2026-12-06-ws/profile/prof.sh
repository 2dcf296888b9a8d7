#!/bin/bash
# usage: prof.sh tcp|ws tier outdir
set -u
T=$1; TIER=$2; OUT=$3
export PYTHONPATH=/work/wt-bws/python TSMSG_SECRET=bench-run-secret-bench-run-secret-0123456789 TSMSG_LOG_LEVEL=INFO
for k in FRAME SEND CHANNEL_SEND; do for p in RATE BURST; do export TSMSG_LIMITS_${k}_${p}=1000000; done; done
export TSMSG_IP_CONNECT_RATE=1000000 TSMSG_IP_CONNECT_BURST=1000000 TSMSG_IP_MAX_CONNECTIONS=1000000
D=$(mktemp -d /tmp/bws-prof/srv-XXXX)
taskset -c 0 /work/main/.venv/bin/tsmsg serve --port 0 --ws 127.0.0.1:0 --data-dir $D/data --durability $TIER > $D/log 2>&1 &
SPID=$!
for i in $(seq 100); do grep -q "web chat page" $D/log && break; sleep 0.1; done
PORT=$(grep -o 'serving on 127.0.0.1:[0-9]*' $D/log | cut -d: -f2); WSP=$(grep -o 'http://127.0.0.1:[0-9]*' $D/log | cut -d: -f3)
if [ $T = ws ]; then A=ws://127.0.0.1:$WSP/connect; else A=127.0.0.1:$PORT; fi
[ -n "${NOSPY:-}" ] || /tmp/pyspy/bin/py-spy record --pid $SPID --nonblocking --rate 250 --format raw --threads --output $OUT/$T-$TIER.txt >/dev/null 2>&1 &
SPY=$!
taskset -c 1 /work/wt-bws/target/loadgen/loadgen --system tsmsg --addr $A --opt secret=$TSMSG_SECRET --server-pid $SPID --workload fanout --subscribers 100 --publishers 1 --window ${WINDOW:-16} --duration 5 --warmup 1 > $OUT/$T-$TIER.json 2>/dev/null
[ -n "${NOSPY:-}" ] || { kill -INT $SPY; wait $SPY; }
kill -TERM $SPID; wait $SPID
rm -rf $D
