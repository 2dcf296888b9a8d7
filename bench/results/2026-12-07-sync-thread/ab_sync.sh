#!/bin/bash
cd /work/main
for i in 1 2 3; do
  for side in after before; do
    [ $side = before ] && git stash -q
    for rate in 0 30000; do echo "$side $(/tmp/s2/fanin.sh $rate 8 16 16 async)"; done
    [ $side = before ] && git stash pop -q
  done
done
