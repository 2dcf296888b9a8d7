#!/bin/bash
# A/B: cluster fan-in on 1 node, EVALSHA (stash) vs FCALL (working tree), alternating
cd /work/main
for i in 1 2; do
  git stash -q && .venv/bin/python bench/cluster.py --nodes 1 --no-lmdb --only fanin,latency --no-build --max-load 9 --out /tmp/s2/cl-evalsha-$i > /tmp/s2/cl-evalsha-$i.log 2>&1; git stash pop -q
  .venv/bin/python bench/cluster.py --nodes 1 --no-lmdb --only fanin,latency --no-build --max-load 9 --out /tmp/s2/cl-fcall-$i > /tmp/s2/cl-fcall-$i.log 2>&1
done
echo done
