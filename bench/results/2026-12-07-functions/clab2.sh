#!/bin/bash
cd /work/main
for i in 3 4; do
  .venv/bin/python bench/cluster.py --nodes 1 --no-lmdb --only fanin --no-build --max-load 9 --out /tmp/s2/cl-fcall-$i > /tmp/s2/cl-fcall-$i.log 2>&1
  git stash -q && .venv/bin/python bench/cluster.py --nodes 1 --no-lmdb --only fanin --no-build --max-load 9 --out /tmp/s2/cl-evalsha-$i > /tmp/s2/cl-evalsha-$i.log 2>&1; git stash pop -q
done
