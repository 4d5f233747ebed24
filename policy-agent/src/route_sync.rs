//! Routes to the other nodes' pods, on their own schedule: converges our pod routes and the overlay
//! (VXLAN devices, FDB, neighbours) to the validated Nodes after commits and at resync. Failures are
//! logged, counted and retried with the routes' own backoff ([`Schedule::routes_failed`]); they
//! never fail or delay a policy commit.

use crate::metrics::Metrics;
use crate::overlay::{self, Desired, Mode, Overlay};
use crate::routes::{PodRoute, Refused, RoutePlan, Routes};
use crate::schedule::Schedule;
use crate::tunnel_guard;
use palisade_policy::model::Node;
use std::collections::BTreeMap;
use std::time::Instant;
use tracing::{info, warn};

/// Our routes and overlay, and what we last made of them.
pub struct RouteSync {
    routes: Routes,
    /// The overlay edge; `None`: every other node is reached directly.
    overlay: Option<Overlay>,
    node_name: String,
    encapsulation: Mode,
    rt: tokio::runtime::Handle,
    /// What the last successful sync converged to; `None`: unknown (check next time).
    applied: Option<Desired>,
    /// What the last failed sync tried to reach: while it is still what we want, only the retry
    /// timer tries again; a different want is tried at once.
    attempted: Option<Desired>,
    /// The podCIDRs refused last time (logged when they change).
    refused: Vec<Refused>,
    /// Whether the last plan sent some route over the overlay; `None` before the first.
    over_overlay: Option<bool>,
}

impl RouteSync {
    pub fn new(
        routes: Routes,
        node_name: String,
        encapsulation: Mode,
        rt: tokio::runtime::Handle,
    ) -> Self {
        RouteSync {
            routes,
            overlay: None,
            node_name,
            encapsulation,
            rt,
            applied: None,
            attempted: None,
            refused: Vec::new(),
            over_overlay: None,
        }
    }

    /// Reach other nodes through the overlay edge (`--encapsulation`).
    pub fn with_overlay(mut self, overlay: Overlay) -> Self {
        self.overlay = Some(overlay);
        self
    }

    /// Whether pods leave this node through the overlay (for the pod MTU).
    pub fn overlay_in_use(&self) -> bool {
        self.overlay.is_some() && self.encapsulation != Mode::Never
    }

    /// What the overlay asks of our table: the device's port guarded while it exists, and its
    /// outer packets untracked while some route goes over it (the last plan's answer; before the
    /// first plan, assumed so: an untrack chain too many costs a hook's entry, one too few leaves
    /// unreplied conntrack entries until the plan comes, a reconcile later).
    pub fn overlay_use(&self) -> tunnel_guard::Use {
        let device = self.overlay_in_use();
        tunnel_guard::Use {
            device,
            carries_routes: device && self.over_overlay.unwrap_or(true),
        }
    }

    /// Our links and addresses (for the MTU and the overlay plan).
    pub fn local(&self) -> crate::error::Result<overlay::Local> {
        match &self.overlay {
            Some(o) => self.rt.block_on(o.local()),
            None => Ok(overlay::Local::default()),
        }
    }

    /// Forget what was converged: the next sync checks everything again.
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// What routes, devices and peers the Nodes call for: the plan's routes (validated, via
    /// InternalIPs) split into direct and overlay ones by `--encapsulation` and our links, and an
    /// `unreachable` route under each of our own podCIDRs.
    fn want(
        &self,
        nodes: &BTreeMap<String, Node>,
        plan: &RoutePlan,
    ) -> crate::error::Result<Desired> {
        let mode = if self.overlay.is_some() {
            self.encapsulation
        } else {
            Mode::Never
        };
        let local = match &self.overlay {
            Some(o) if mode != Mode::Never => self.rt.block_on(o.local())?,
            _ => overlay::Local::default(),
        };
        let mut want = overlay::plan(&plan.routes, nodes, &self.node_name, mode, &local);
        want.routes
            .extend(plan.own.iter().copied().map(PodRoute::unreachable));
        Ok(want)
    }

    /// Notes whether `want` sends a route over the overlay (see [`Self::overlay_use`]).
    fn planned(&mut self, want: Desired) -> Desired {
        self.over_overlay = Some(want.devices.iter().any(|d| !d.peers.is_empty()));
        want
    }

    /// Converges our routes to the validated Nodes (`plan`: their routes, `routes::desired_routes`
    /// of `nodes`, which the engine derives again only after a Node event), route by route.
    /// Unless `retry`, a want that already failed is left to its retry time.
    pub fn sync(
        &mut self,
        nodes: &BTreeMap<String, Node>,
        plan: RoutePlan,
        sched: &mut Schedule,
        metrics: &Metrics,
        retry: bool,
    ) {
        if plan.refused != self.refused {
            for x in plan.refused.iter().filter(|x| !self.refused.contains(x)) {
                warn!(node = %x.node, cidr = %x.cidr, reason = x.reason.label(), "{x}");
            }
            let mut by_reason = BTreeMap::new();
            for x in &plan.refused {
                *by_reason.entry(x.reason.label()).or_insert(0u64) += 1;
            }
            metrics.refused_pod_cidrs(by_reason);
            self.refused = plan.refused.clone();
        }
        let want = match self.want(nodes, &plan) {
            Ok(w) => self.planned(w),
            Err(e) => {
                metrics.error(e.kind());
                let retry_in = sched.routes_failed(Instant::now());
                warn!(error = %e, ?retry_in, "cannot read our links and addresses to place routes; retrying on the routes' own schedule");
                self.applied = None;
                return;
            }
        };
        if self.applied.as_ref() == Some(&want) {
            return;
        }
        if !retry && sched.routes_retry_pending() && self.attempted.as_ref() == Some(&want) {
            return; // failed before; its retry is scheduled
        }
        for w in plan.warnings.iter().chain(&want.warnings) {
            warn!("{w}");
        }
        let retry_in = sched.route_backoff();
        let failed = match self.rt.block_on(overlay::converge(
            &self.routes,
            self.overlay.as_ref(),
            &want,
        )) {
            Ok(converged) => {
                for d in &converged.overlay.done {
                    info!("{d}");
                }
                for e in &converged.overlay.failed {
                    metrics.error(e.kind());
                    warn!(error = %e, ?retry_in,
                        "cannot converge the overlay; retrying on the routes' own schedule, policies are not held up");
                }
                let overlay_failed = converged.overlay.failed.len();
                let changes = converged.routes;
                for a in &changes.added {
                    info!(route = %a, "pod route added");
                }
                for d in &changes.removed {
                    info!(route = %d, "stale pod route removed");
                }
                for (f, e) in &changes.failed {
                    metrics.error(e.kind());
                    warn!(route = %f, error = %e, ?retry_in,
                        "cannot change pod route; retrying on its own schedule, other routes and policies are not held up");
                }
                changes.failed.len() + overlay_failed
            }
            Err(e) => {
                metrics.error(e.kind());
                warn!(error = %e, ?retry_in, "cannot list our routes; retrying");
                1
            }
        };
        metrics.route_failures(failed as u64);
        if failed == 0 {
            self.applied = Some(want);
            self.attempted = None;
            sched.routes_converged();
        } else {
            self.applied = None;
            self.attempted = Some(want);
            sched.routes_failed(Instant::now());
        }
    }

    /// At resync: when our routes or overlay entries differ from what the Nodes call for (`plan`:
    /// their validated routes), a route sync is scheduled (on the routes' own schedule: a failing
    /// route keeps its backoff).
    pub fn check(
        &mut self,
        nodes: &BTreeMap<String, Node>,
        plan: &RoutePlan,
        sched: &mut Schedule,
    ) {
        self.applied = None;
        let want = match self.want(nodes, plan) {
            Ok(w) => self.planned(w),
            Err(err) => {
                warn!(error = %err, "cannot read our links and addresses");
                sched.routes_soon(Instant::now());
                return;
            }
        };
        let overlay_differs = match &self.overlay {
            Some(o) => self.rt.block_on(o.differs(&want)),
            None => Ok(false),
        };
        let have = self.rt.block_on(self.routes.ours());
        match (have, overlay_differs) {
            (Ok(have), Ok(false)) if have == want.routes => {
                self.applied = Some(want);
            }
            (Ok(_), Ok(_)) => {
                warn!("pod routes or overlay entries differ from the cluster's Nodes; converging");
                sched.routes_soon(Instant::now());
            }
            (Err(err), _) | (_, Err(err)) => {
                warn!(error = %err, "cannot list our routes or overlay entries");
                sched.routes_soon(Instant::now());
            }
        }
    }
}
