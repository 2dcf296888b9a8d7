# usage (from the repo root): perf_stat.sh RATE [CMD]: perf stat (task-clock, context switches) of the server during a fan-in run; CMD is run with each non-main thread id (e.g. "chrt -b -p 0")
pkill -f "tsmsg serve --port 7812"; sleep 0.5
export TSMSG_SECRET=bench-run-secret-bench-run-secret-0123456789
for k in FRAME SEND CHANNEL_SEND; do for p in RATE BURST; do export TSMSG_LIMITS_${k}_${p}=1000000; done; done
D=/tmp/d_p; rm -rf $D
taskset -c 0 ${TSMSG_BIN:-.venv/bin/tsmsg} serve --port 7812 --data-dir $D --durability ${TIER:-async} > /tmp/srv.log 2>&1 &
SP=$!; sleep 1.5
if [ -n "$2" ]; then for t in /proc/$SP/task/*; do tid=${t##*/}; [ "$tid" != "$SP" ] && $2 $tid; done; fi
R=""; [ "$1" != "0" ] && R="--rate $1"
(sleep 2; perf stat -e task-clock,context-switches -p $SP -- sleep 3 2>&1) > /tmp/perf.txt &
PP=$!
taskset -c 1 target/loadgen/loadgen --addr 127.0.0.1:7812 --opt secret=$TSMSG_SECRET --workload fanin --publishers 16 --window 16 --size 100 --duration 5 --warmup 1 $R --server-pid $SP > /tmp/lg.json 2>/dev/null
wait $PP
kill $SP; wait $SP 2>/dev/null
grep -E "task-clock|switches" /tmp/perf.txt | awk '{print $1, $2}' | tr '\n' ' '
python3 -c "import json;d=json.load(open('/tmp/lg.json'))['result'];l=d['ack_latency'];print('%.0f msg/s p50 %.2f p99 %.2f p999 %.2f'%(d['throughput_msgs_s'],l['p50_ms'],l['p99_ms'],l['p999_ms']))"
