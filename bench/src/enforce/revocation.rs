//! Revocation of an established flow: a stream allowed by a policy, then the policy removed; how
//! long until the flow is cut.

use super::*;

/// Revocation of an established TCP flow at one size and churn rate, in milliseconds: grant = allow
/// policy written → the stream connects; revoke = policy removed → send time of the first message
/// of the (still open) connection whose echo never came.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevocationResult {
    pub pods: usize,
    pub policies: usize,
    pub churn_per_second: u32,
    pub grant_ms: Vec<f64>,
    pub revoke_ms: Vec<f64>,
    /// Trials whose flow was not cut (or not granted) within [`FLIP_TIMEOUT`].
    pub failures: usize,
}

/// Measures [`RevocationResult`]: `trials` times, the allow-stream policy is written, the stream
/// connects and runs for 20-50 ms, then the policy is removed and the stream must fail.
pub(super) fn established_flow(
    lab: &Lab,
    exe: &str,
    store: &Store,
    (pods, policies, churn): (usize, usize, u32),
    trials: usize,
    seed: u64,
) -> Result<RevocationResult> {
    // The client pod exists (the allow-stream peer), no other allow policy.
    Scenario::Policy.setup(store)?;
    store.clear(F_ALLOW_STREAM);
    let mut stream = Probe::stream(lab, exe)?;
    if stream.wait_for(false, Duration::from_secs(10)).is_none() {
        return Err(Error::Invalid(
            "the established-flow stream connects without its allow policy".into(),
        ));
    }
    let mut res = RevocationResult {
        pods,
        policies,
        churn_per_second: churn,
        grant_ms: Vec::new(),
        revoke_ms: Vec::new(),
        failures: 0,
    };
    let mut rng = Rng::new(seed);
    for _ in 0..trials {
        match stream.measure(true, || store.put(F_ALLOW_STREAM, &allow_stream_policy()))? {
            Some(ms) => res.grant_ms.push(ms),
            None => {
                res.failures += 1;
                store.clear(F_ALLOW_STREAM);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(30) as u64));
        match stream.measure(false, || store.remove(F_ALLOW_STREAM))? {
            Some(ms) => res.revoke_ms.push(ms),
            None => {
                // The flow outlived its deny: count it, start a fresh stream (blocked).
                res.failures += 1;
                tracing::warn!(
                    pods,
                    churn,
                    "an established flow was not cut within the timeout"
                );
                stream = Probe::stream(lab, exe)?;
                let _ = stream.wait_for(false, Duration::from_secs(10));
            }
        }
        std::thread::sleep(Duration::from_millis(10 + rng.below(20) as u64));
        if res.failures > 5 {
            break;
        }
    }
    Ok(res)
}
