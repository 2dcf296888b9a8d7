# usage (from the repo root): OLD=<worktree of the other version, extension copied in> ab_fanin.sh PAIRS RATE TIER
# alternating old/new, 16 publishers x 16 in flight, 5 s each
for i in $(seq $1); do
  echo -n "old "; PYTHONPATH=$OLD/python bash $(dirname $0)/fanin.sh $2 5 16 16 $3 | tail -1
  echo -n "new "; bash $(dirname $0)/fanin.sh $2 5 16 16 $3 | tail -1
done
