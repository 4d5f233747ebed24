# Paired ratios per round and underlay of a datapath-bench run with none, palisade and palisade-after:
# python3 abpair.py iperf_gbps|crr FILES...
import os,statistics as st,sys
sys.path.insert(0,os.path.join(os.path.dirname(os.path.abspath(__file__)),'..'))
from paired import per_round,by_underlay,system_only,intervals
metric=sys.argv[1]; files=sys.argv[2:]
r={}
for f in files:
    for k,v in per_round(f,metric,key=by_underlay,name=system_only).items():
        r[(f,)+k]=v
for u in ['overlay','routed-direct','']:
  for a,b in [('palisade-after','palisade'),('palisade','none'),('palisade-after','none')]:
    rs=[v[a]/v[b] for k,v in r.items() if k[3]==u and a in v and b in v]
    if not rs: continue
    lo,hi=intervals(rs)
    print(f"{metric:10} {u or 'flat':14} {a}/{b}: median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) mean {st.mean(rs):.3f} n={len(rs)}")
