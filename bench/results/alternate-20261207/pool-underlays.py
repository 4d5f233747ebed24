# New connections of `datapath-bench run --alternate --systems none,palisade --underlays
# routed-direct,overlay`, pooled over runs: palisade / none on each underlay, the policy's cost over
# the overlay / over direct routes, and none's overlay / direct; paired medians by round with
# bootstrap 95 % intervals. Usage: python3 pool-underlays.py alt-ov1.json alt-ov2.json
# With --stream first: the bulk throughput of `stream-alternate` (`--iperf-every N` with --alternate)
# instead of new connections.
import json,os,statistics as st,sys
sys.path.insert(0,os.path.join(os.path.dirname(os.path.abspath(__file__)),'..'))
from paired import intervals
args=sys.argv[1:]
stream=args[:1]==['--stream']
if stream: args=args[1:]
r={}
for i,f in enumerate(args):
    for x in json.load(open(f)):
        if x.get('error'): continue
        v=(x.get('stream') or {}).get('gbps') if stream else (x.get('crr') or {}).get('per_second')
        if v: r.setdefault((i,x['round']),{})[x['system']]=v
def show(name,f):
    rs=[f(v) for v in r.values()]
    lo,hi=intervals(rs)
    print(f"{name}: n={len(rs)} median {st.median(rs):.3f} ({lo:.3f}-{hi:.3f}) sd {st.stdev(rs):.3f}")
d,o='+routed-direct','+overlay'
show("palisade / none, direct routes",lambda v:v['palisade'+d]/v['none'+d])
show("palisade / none, overlay",lambda v:v['palisade'+o]/v['none'+o])
show("the policy's cost, overlay / direct",lambda v:(v['palisade'+o]/v['none'+o])/(v['palisade'+d]/v['none'+d]))
show("no policy: overlay / direct",lambda v:v['none'+o]/v['none'+d])
show("palisade: overlay / direct",lambda v:v['palisade'+o]/v['palisade'+d])
