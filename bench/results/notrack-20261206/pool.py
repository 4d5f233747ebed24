# Paired with-notrack / without ratios per round and underlay, pooled over runs whose A/B sides differ:
# python3 pool.py iperf_gbps|crr notrack1.json:after notrack2.json:palisade
# (FILE:SIDE names the system that had the outer packets untracked in that file.)
import json,sys,random,statistics as st
from collections import defaultdict
metric=sys.argv[1]
r=defaultdict(list)
for arg in sys.argv[2:]:
    f,side=arg.split(':'); side={'after':'palisade-after','palisade':'palisade'}[side]
    other='palisade' if side=='palisade-after' else 'palisade-after'
    rounds=defaultdict(dict)
    d=json.load(open(f)); s=d['samples'] if isinstance(d,dict) else d
    for x in s:
        v=x.get(metric)
        if isinstance(v,dict): v=v.get('per_second')
        if v and not x.get('error'):
            sysname,_,und=x['system'].partition('+')
            rounds[(x['policies'],x['round'],und)][sysname]=v
    for k,v in rounds.items():
        if side in v and other in v and 'none' in v:
            r[(k[2],'untracked/tracked')].append(v[side]/v[other])
            r[(k[2],'untracked/none')].append(v[side]/v['none'])
            r[(k[2],'tracked/none')].append(v[other]/v['none'])
for (u,what),rs in sorted(r.items()):
    random.seed(1)
    meds=sorted(st.median(random.choices(rs,k=len(rs))) for _ in range(4000))
    print(f"{metric:10} {u:14} {what:18} median {st.median(rs):.3f} ({meds[100]:.3f}-{meds[3899]:.3f}) mean {st.mean(rs):.3f} n={len(rs)}")
