#!/bin/bash
# usage: ab2.sh RATE DUR PUBS WINDOW [tier] [extra serve args]
cd /tmp/s1 && . ./env.sh
TIER=${5:-async}
rm -rf /tmp/s1/d_$$
taskset -c 0 ${TSMSG_BIN:-/work/main/.venv/bin/tsmsg} serve --port 7812 --data-dir /tmp/s1/d_$$ --durability $TIER $6 > srv_$$.log 2>&1 &
SP=$!; sleep 1.5
R=""; [ "$1" != "0" ] && R="--rate $1"
taskset -c 1 /work/main/target/loadgen/loadgen --addr 127.0.0.1:7812 --opt secret=$TSMSG_SECRET --workload fanin --publishers $3 --window $4 --size 100 --duration $2 --warmup 1 $R --server-pid $SP > ab_$$.json 2>/dev/null
kill $SP; wait $SP 2>/dev/null
python3 -c "
import json;d=json.load(open('ab_$$.json'))['result'];l=d['ack_latency'];c=d['cpu']
print('rate=$1 pubs=$3x$4 $TIER: %.0f msg/s p50 %.2f p99 %.2f p999 %.2f ms, %.1f us/msg, cpu %.0f%%'%(d['throughput_msgs_s'],l['p50_ms'],l['p99_ms'],l['p999_ms'],c['server_cpu_s_per_million_msgs'],100*c['server_cpu_share']))"
rm -rf /tmp/s1/d_$$ ab_$$.json srv_$$.log
