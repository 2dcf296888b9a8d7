#!/bin/bash
# A/B: hold_round (working tree) vs stash, fan-in async flat out and at 10k/s, alternating
cd /work/main
for i in 1 2; do
  for side in after before; do
    [ $side = before ] && git stash -q
    for rate in 0 10000; do echo "$side $(/tmp/s2/fanin.sh $rate 5 16 16 async)"; done
    [ $side = before ] && git stash pop -q
  done
done
