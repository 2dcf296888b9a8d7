import json
import os
import sys

pid = sys.argv[1]
out = {}
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        out[f"{name}/{tid}"] = (int(f[11]), int(f[12]))
    except OSError:
        pass
print(json.dumps(out))
