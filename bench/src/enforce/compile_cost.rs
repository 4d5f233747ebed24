//! The compiler's cost per change in this process (apply + compile + diff + netlink messages), the path the
//! agent runs, beside the full compile.

use super::*;

/// Per-change cost of the compiler as the agent uses it (apply one change, compile the node, diff
/// against the last ruleset), under the same churn as `Churn`; one figure per change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompileCost {
    pub pods: usize,
    pub policies: usize,
    pub initial_compile_ms: f64,
    pub initial_batch_bytes: usize,
    /// The agent's path: `IncrementalCompiler::stage` + `take_batch` (netlink messages built).
    pub change_ms: Vec<f64>,
    /// The same change by full compile of the node + diff, for comparison.
    pub full_change_ms: Vec<f64>,
    pub batch_bytes: Vec<f64>,
    pub batch_commands: Vec<f64>,
}

/// Measures [`CompileCost`] for `changes` churn changes (role flips of random pods; every tenth is a
/// policy created or deleted): each through the incremental compiler, as the agent does, and the same
/// change through a full compile + diff beside it. The two batches must be equal (the property the
/// compiler's tests hold); a difference fails the bench.
pub fn compile_cost(
    pods: usize,
    policies: usize,
    changes: usize,
    seed: u64,
) -> Result<CompileCost> {
    use palisade_policy::model::Change;
    let cluster = Cluster::generate_shape(Shape::for_pods(pods, policies), seed)?;
    let mut state = k8s::cluster_state(&cluster)?;
    let t = Instant::now();
    let mut last = palisade_policy::compile(&state, AGENT_NODE);
    let initial_batch = last.ruleset.full_replace();
    let initial_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut inc = palisade_policy::IncrementalCompiler::new(state.clone(), AGENT_NODE);
    let _ = inc.take_batch();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let others: Vec<_> = cluster
        .pods
        .iter()
        .filter(|p| p.namespace != "bench")
        .collect();
    let mut out = CompileCost {
        pods: cluster.pods.len(),
        policies,
        initial_compile_ms,
        initial_batch_bytes: initial_batch.bytes(),
        change_ms: Vec::new(),
        full_change_ms: Vec::new(),
        batch_bytes: Vec::new(),
        batch_commands: Vec::new(),
    };
    let extra = allow_policy("churn-allow", json!({"app": "client"}));
    let mut extra_present = false;
    for i in 0..changes {
        let change = if i % 10 == 9 {
            extra_present = !extra_present;
            if extra_present {
                k8s::change(&extra)?
            } else {
                Change::DeletePolicy {
                    namespace: "bench".into(),
                    name: "churn-allow".into(),
                }
            }
        } else {
            let mut pod = others[rng.below(others.len())].clone();
            pod.labels
                .insert("role".into(), format!("r{}", rng.below(20)));
            k8s::change(&k8s::pod(&pod))?
        };
        let t = Instant::now();
        inc.stage(change.clone());
        let batch = inc.take_batch();
        // The agent commits the batch's netlink messages; its JSON is rendered here only to
        // check it against the full compile's.
        out.change_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let text = batch.to_json_string();
        let t = Instant::now();
        state.apply(change);
        let next = palisade_policy::compile(&state, AGENT_NODE);
        let full = palisade_policy::diff(&last.ruleset, &next.ruleset);
        out.full_change_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let full_text = full.to_json_string();
        if text != full_text {
            return Err(Error::Check(format!(
                "change {i}: the incremental batch differs from the full compile's diff"
            )));
        }
        out.batch_bytes.push(batch.bytes() as f64);
        out.batch_commands.push(batch.commands() as f64);
        last = next;
    }
    Ok(out)
}
