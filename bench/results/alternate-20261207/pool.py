# Paired ratio a/b of new connections per round of `datapath-bench run --alternate`, pooled over
# runs: median and mean with bootstrap 95 % intervals, the per-round spread, and the medians of
# even and odd rounds apart (the labs trade rulesets every round: a lab's bias would split them).
# Usage: python3 pool.py palisade palisade-no-source-guard alt-g1.json alt-g2.json
# (--stream first: the bulk throughput of stream-alternate instead of new connections).
import os,statistics as st,sys
sys.path.insert(0,os.path.join(os.path.dirname(os.path.abspath(__file__)),'..'))
from paired import per_round,intervals
args=sys.argv[1:]
metric='crr'
if args[:1]==['--stream']: metric,args='stream',args[1:]
a,b=args[:2]
rs=[];ev=[];od=[]
for f in args[2:]:
    for (p,r),v in sorted(per_round(f,metric).items()):
        if a in v and b in v:
            x=v[a]/v[b]; rs.append(x); (ev if r%2==0 else od).append(x)
lo,hi,mlo,mhi=intervals(rs,means=True)
print(f"{a}/{b}: n={len(rs)} median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) mean {st.mean(rs):.3f} "
      f"({mlo:.3f}-{mhi:.3f}) sd {st.stdev(rs):.3f}; even rounds {st.median(ev):.3f}, odd {st.median(od):.3f}")
