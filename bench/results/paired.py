# The datapath bench's JSON as the pooling scripts beside it read it: one metric's values per round
# and system, and bootstrap 95 % intervals of a list of paired ratios.
import json,random,statistics as st
from collections import defaultdict

def per_round(path,metric,key=lambda x:(x['policies'],x['round']),name=lambda x:x['system']):
    """{key(sample): {name(sample): value}} over the samples without error that have `metric`
    (a dict's `per_second`, or `gbps` for `stream`)."""
    d=json.load(open(path)); s=d['samples'] if isinstance(d,dict) else d
    r=defaultdict(dict)
    for x in s:
        v=x.get(metric)
        if isinstance(v,dict): v=v.get('per_second',v.get('gbps'))
        if v and not x.get('error'): r[key(x)][name(x)]=v
    return r

def by_underlay(x):
    """(policies, round, underlay) of a sample whose system is named `system+underlay`."""
    return (x['policies'],x['round'],x['system'].partition('+')[2])

def system_only(x):
    return x['system'].partition('+')[0]

def intervals(rs,means=False):
    """95 % bootstrap intervals (4000 resamples, seed 1) of the median of `rs`, and with `means`
    then of its mean: [lo, hi] or [lo, hi, mean lo, mean hi]."""
    random.seed(1)
    out=[]
    for f in [st.median]+([st.mean] if means else []):
        b=sorted(f(random.choices(rs,k=len(rs))) for _ in range(4000))
        out+=[b[100],b[3899]]
    return out
