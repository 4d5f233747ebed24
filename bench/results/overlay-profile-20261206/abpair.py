# Paired ratios per round and underlay of a datapath-bench run with none, palisade and palisade-after:
# python3 abpair.py iperf_gbps|crr FILES...
import json,sys,random,statistics as st
from collections import defaultdict
metric=sys.argv[1]; files=sys.argv[2:]
r=defaultdict(dict)
for f in files:
    d=json.load(open(f)); s=d['samples'] if isinstance(d,dict) else d
    for x in s:
        v=x.get(metric)
        if isinstance(v,dict): v=v.get('per_second')
        if v and not x.get('error'):
            sysname,_,und=x['system'].partition('+')
            r[(f,x['policies'],x['round'],und)][sysname]=v
for u in ['overlay','routed-direct']:
  for a,b in [('palisade-after','palisade'),('palisade','none'),('palisade-after','none')]:
    rs=[v[a]/v[b] for k,v in r.items() if k[3]==u and a in v and b in v]
    if not rs: continue
    random.seed(1)
    meds=sorted(st.median(random.choices(rs,k=len(rs))) for _ in range(4000))
    print(f"{metric:10} {u:14} {a}/{b}: median {st.median(rs):.3f} ({meds[100]:.3f}-{meds[3899]:.3f}) mean {st.mean(rs):.3f} n={len(rs)}")
