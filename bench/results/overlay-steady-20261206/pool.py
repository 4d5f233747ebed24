import json,sys,random,statistics as st
from collections import defaultdict
metric=sys.argv[1]; files=sys.argv[2:]
rs=[]
for f in files:
    d=json.load(open(f)); s=d['samples'] if isinstance(d,dict) else d
    r=defaultdict(dict)
    for x in s:
        v=x.get(metric)
        if isinstance(v,dict): v=v.get('per_second')
        if v and not x.get('error'): r[(x['policies'],x['round'])][x['system']+x.get('underlay','')]=v
    rs+=[v['palisade+overlay']/v['none+overlay']/(v['palisade+routed-direct']/v['none+routed-direct']) for v in r.values() if all(k in v for k in ('palisade+overlay','none+overlay','palisade+routed-direct','none+routed-direct'))]
random.seed(1)
meds=sorted(st.median(random.choices(rs,k=len(rs))) for _ in range(4000))
means=sorted(st.mean(random.choices(rs,k=len(rs))) for _ in range(4000))
print(f"{metric}: pooled overlay cost/direct cost median {st.median(rs):.3f} ({meds[100]:.3f}-{meds[3899]:.3f}) mean {st.mean(rs):.3f} ({means[100]:.3f}-{means[3899]:.3f}) n={len(rs)}")
