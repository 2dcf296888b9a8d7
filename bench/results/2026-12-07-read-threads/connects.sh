#!/bin/bash
# usage: connects.sh N [spy]  (from the repository root, after make bench; TSMSG_BIN: the tsmsg to run; WS=1: over ws://; TLS=DIR: TLS with DIR's tls-{cert,key,ca}.pem, as bench/run.py's make_pki writes them; ENGINE=URL: on that engine, e.g. redis://127.0.0.1:7392; THREADS=1: CPU per connect of each of the server's threads, named by py-spy dump; SETTLE=S: S seconds after the load generator ends before the CPU is read, so that the disconnects count too)  -- N idle plain connections, 100 at a time; server CPU0, loadgen CPU1
# prints connects/s and the server's CPU µs per connect (utime+stime over the opening)
N=${1:-3000}
export TSMSG_SECRET=bench-run-secret-bench-run-secret-0123456789 TSMSG_IP_CONNECT_RATE=1000000 TSMSG_IP_CONNECT_BURST=1000000 TSMSG_IP_MAX_CONNECTIONS=1000000
D=${SCRATCH:-/tmp}/d_$$; rm -rf $D
ADDR=127.0.0.1:7813; WSOPT=""; [ -n "$WS" ] && { ADDR=ws://127.0.0.1:7814/connect; WSOPT="--ws 127.0.0.1:7814"; }
[ -n "$TLS" ] && { WSOPT="$WSOPT --tls-cert $TLS/tls-cert.pem --tls-key $TLS/tls-key.pem"; LGTLS="--tls --tls-ca $TLS/tls-ca.pem"; }
taskset -c 0 ${TSMSG_BIN:-./.venv/bin/tsmsg} serve --port 7813 $WSOPT --data-dir $D ${ENGINE:+--engine $ENGINE} > ${SCRATCH:-/tmp}/srv_$$.log 2>&1 &
SP=$!; sleep 1.5
CLK=$(getconf CLK_TCK)
read U0 S0 < <(awk '{print $14, $15}' /proc/$SP/stat)
cputicks() { for t in /proc/$SP/task/*; do echo "${t##*/} $(awk '{print $14+$15}' $t/stat)"; done; }
[ -n "$THREADS" ] && cputicks > ${SCRATCH:-/tmp}/t0_$$
if [ "$2" = spy ]; then ./.venv/bin/py-spy record --pid $SP --rate 500 --format raw --output ${SCRATCH:-/tmp}/conn.spy --duration 3 --threads >/dev/null 2>&1 & PS=$!; sleep 0.5; fi
taskset -c 1 ./target/loadgen/loadgen --addr $ADDR $LGTLS --opt secret=$TSMSG_SECRET --workload idle --idle $N --hold 0.2 --server-pid $SP > ${SCRATCH:-/tmp}/conn_$$.json 2>${SCRATCH:-/tmp}/lg_$$.err
sleep ${SETTLE:-0}; read U1 S1 < <(awk '{print $14, $15}' /proc/$SP/stat)
if [ -n "$THREADS" ]; then
  cputicks > ${SCRATCH:-/tmp}/t1_$$
  ./.venv/bin/py-spy dump --pid $SP 2>/dev/null | sed -nE 's/^Thread ([0-9]+).*"(.*)"$/\1 \2/p' > ${SCRATCH:-/tmp}/tn_$$
  awk -v n=$N -v clk=$CLK 'FILENAME ~ /tn_/ {name[$1]=$2; next} FILENAME ~ /t0_/ {t0[$1]=$2; next}
    {k=($1 in name) ? name[$1] : "other"; sub(/-[0-9]+$/,"-*",k); c[k]+=$2-t0[$1]}
    END {for (k in c) if (c[k]) printf "  %s %.0f us/connect\n", k, 1e6*c[k]/clk/n}' \
    ${SCRATCH:-/tmp}/tn_$$ ${SCRATCH:-/tmp}/t0_$$ ${SCRATCH:-/tmp}/t1_$$
  [ -n "$KEEP" ] || rm -f ${SCRATCH:-/tmp}/t[01n]_$$
fi
[ "$2" = spy ] && wait $PS
kill $SP; wait $SP 2>/dev/null
python3 -c "
import json;d=json.load(open('${SCRATCH:-/tmp}/conn_$$.json'))['result']
n=d['connections'];u=($U1-$U0)/$CLK;s=($S1-$S0)/$CLK
print('%d conns: %.0f connects/s, server %.0f us CPU/connect (user %.0f, sys %.0f), rss/conn %.0f'%(n,d['connects_s'],1e6*(u+s)/n,1e6*u/n,1e6*s/n,d['server_rss_per_conn_bytes']))"
rm -rf $D ${SCRATCH:-/tmp}/conn_$$.json ${SCRATCH:-/tmp}/srv_$$.log ${SCRATCH:-/tmp}/lg_$$.err
