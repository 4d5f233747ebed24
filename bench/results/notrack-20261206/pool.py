# Paired with-notrack / without ratios per round and underlay, pooled over runs whose A/B sides differ:
# python3 pool.py iperf_gbps|crr notrack1.json:after notrack2.json:palisade
# (FILE:SIDE names the system that had the outer packets untracked in that file.)
import os,statistics as st,sys
from collections import defaultdict
sys.path.insert(0,os.path.join(os.path.dirname(os.path.abspath(__file__)),'..'))
from paired import per_round,by_underlay,system_only,intervals
metric=sys.argv[1]
r=defaultdict(list)
for arg in sys.argv[2:]:
    f,side=arg.split(':'); side={'after':'palisade-after','palisade':'palisade'}[side]
    other='palisade' if side=='palisade-after' else 'palisade-after'
    for k,v in per_round(f,metric,key=by_underlay,name=system_only).items():
        if side in v and other in v and 'none' in v:
            r[(k[2],'untracked/tracked')].append(v[side]/v[other])
            r[(k[2],'untracked/none')].append(v[side]/v['none'])
            r[(k[2],'tracked/none')].append(v[other]/v['none'])
for (u,what),rs in sorted(r.items()):
    lo,hi=intervals(rs)
    print(f"{metric:10} {u:14} {what:18} median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) mean {st.mean(rs):.3f} n={len(rs)}")
