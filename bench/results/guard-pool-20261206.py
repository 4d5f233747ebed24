# Paired ratio a/b of one metric per (policies, round), pooled over runs, with bootstrap 95 % intervals of the median and mean.
# Usage: python3 guard-pool-20261206.py crr palisade palisade-no-source-guard FILES...
import statistics as st,sys
from paired import per_round,intervals
metric,a,b=sys.argv[1:4]; files=sys.argv[4:]
rs=[]
for f in files:
    rs+=[v[a]/v[b] for v in per_round(f,metric).values() if a in v and b in v]
lo,hi,mlo,mhi=intervals(rs,means=True)
print(f"{metric} {a}/{b}: median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) mean {st.mean(rs):.3f} ({mlo:.3f}-{mhi:.3f}) n={len(rs)}")
