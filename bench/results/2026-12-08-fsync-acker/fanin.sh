#!/bin/bash
# usage (from the repo root): fanin.sh RATE DUR PUBS WINDOW [tier] [spy]
pkill -f "tsmsg serve --port 7812"; sleep 0.5
export TSMSG_SECRET=bench-run-secret-bench-run-secret-0123456789
for k in FRAME SEND CHANNEL_SEND; do for p in RATE BURST; do export TSMSG_LIMITS_${k}_${p}=1000000; done; done
TIER=${5:-async}
D=/tmp/d_$$; rm -rf $D
taskset -c 0 ${TSMSG_BIN:-.venv/bin/tsmsg} serve --port 7812 --data-dir $D --durability $TIER $SERVEARGS > /tmp/srv_last.log 2>&1 &
SP=$!; sleep 1.5
R=""; [ "$1" != "0" ] && R="--rate $1"
if [ "$6" = spy ]; then (sleep 1.5; .venv/bin/py-spy record --pid $SP --rate 400 --format raw --output /tmp/fanin.spy --duration 3 --threads $SPYARGS >/dev/null 2>&1) & SPY=$!; fi
(sleep 1; python3 $(dirname $0)/../2026-12-07-round-hold/threads.py $SP > /tmp/t0_$$; sleep $2; python3 $(dirname $0)/../2026-12-07-round-hold/threads.py $SP > /tmp/t1_$$) & TP=$!
taskset -c 1 target/loadgen/loadgen --addr 127.0.0.1:7812 --opt secret=$TSMSG_SECRET --workload fanin --publishers $3 --window $4 --size 100 --duration $2 --warmup 1 $R --server-pid $SP > /tmp/ab_$$.json 2>/dev/null
wait $TP; [ -n "$METRICS" ] && curl -s 127.0.0.1:7813/metrics | grep -E "tsmsg_store_fsync_seconds" | grep -v "^#"
kill $SP; wait $SP 2>/dev/null
python3 -c "
import json;d=json.load(open('/tmp/ab_$$.json'))['result'];l=d['ack_latency'];c=d['cpu']
n=d['throughput_msgs_s']*$2
a=json.load(open('/tmp/t0_$$'));b=json.load(open('/tmp/t1_$$'))
th=' '.join('%s %.1f/%.1f'%(k.split('/')[0],(b[k][0]-a[k][0])*1e4/n,(b[k][1]-a[k][1])*1e4/n) for k in b if k in a and sum(b[k])-sum(a[k])>2)
print('rate=$1 pubs=$3x$4 $TIER: %.0f msg/s p50 %.2f p99 %.2f p999 %.2f ms, %.1f us/msg, cpu %.0f%% | us/msg u/s: %s'%(d['throughput_msgs_s'],l['p50_ms'],l['p99_ms'],l['p999_ms'],c['server_cpu_s_per_million_msgs'],100*c['server_cpu_share'],th))"
rm -rf $D /tmp/ab_$$.json /tmp/t0_$$ /tmp/t1_$$
