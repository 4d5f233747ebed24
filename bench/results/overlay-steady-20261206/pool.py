import os,statistics as st,sys
sys.path.insert(0,os.path.join(os.path.dirname(os.path.abspath(__file__)),'..'))
from paired import per_round,intervals
metric=sys.argv[1]; files=sys.argv[2:]
rs=[]
for f in files:
    r=per_round(f,metric,name=lambda x:x['system']+x.get('underlay',''))
    rs+=[v['palisade+overlay']/v['none+overlay']/(v['palisade+routed-direct']/v['none+routed-direct']) for v in r.values() if all(k in v for k in ('palisade+overlay','none+overlay','palisade+routed-direct','none+routed-direct'))]
lo,hi,mlo,mhi=intervals(rs,means=True)
print(f"{metric}: pooled overlay cost/direct cost median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) mean {st.mean(rs):.3f} ({mlo:.3f}-{mhi:.3f}) n={len(rs)}")
