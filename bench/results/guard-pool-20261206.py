# Paired ratio a/b of one metric per (policies, round), pooled over runs, with bootstrap 95 % intervals of the median and mean.
# Usage: python3 guard-pool-20261206.py crr palisade palisade-no-source-guard FILES...
import json,sys,random,statistics as st
from collections import defaultdict
metric,a,b=sys.argv[1:4]; files=sys.argv[4:]
rs=[]
for f in files:
    d=json.load(open(f)); s=d['samples'] if isinstance(d,dict) else d
    r=defaultdict(dict)
    for x in s:
        v=x.get(metric)
        if isinstance(v,dict): v=v.get('per_second')
        if v and not x.get('error'): r[(x['policies'],x['round'])][x['system']]=v
    rs+=[v[a]/v[b] for v in r.values() if a in v and b in v]
random.seed(1)
meds=sorted(st.median(random.choices(rs,k=len(rs))) for _ in range(4000))
means=sorted(st.mean(random.choices(rs,k=len(rs))) for _ in range(4000))
print(f"{metric} {a}/{b}: median {st.median(rs):.3f} ({meds[100]:.3f}-{meds[3899]:.3f}) mean {st.mean(rs):.3f} ({means[100]:.3f}-{means[3899]:.3f}) n={len(rs)}")
