//! A custom test harness (`harness = false`) that runs a list of cases against labs: filter and
//! `--list` like libtest, bring up a lab per model the cases name, run a setup, every case, a final
//! check, tear the lab down, and fail on anything the teardown left behind (namespaces, processes).

use crate::cases::{self, Case};
use crate::lab::{Lab, LabOptions};
use crate::model::Model;
use std::process::ExitCode;
use std::time::Instant;

/// Cases run against one lab; `prefix` names them (`prefix::ID title`).
pub struct CaseSuite {
    pub prefix: &'static str,
    pub opts: LabOptions,
    pub cases: Vec<Case>,
}

type Failures = Vec<(String, String)>;

impl CaseSuite {
    fn name(&self, c: &Case) -> String {
        format!("{}::{} {}", self.prefix, c.id, c.title)
    }

    /// Runs the suite with the test binary's arguments (`[FILTER...] [--list]`): one lab for each
    /// model the cases name (`crate::model`), in the order they first name it; `setup` prepares a
    /// lab for its model, `after` looks at it once its cases ran.
    pub fn main(
        mut self,
        args: &[String],
        setup: impl Fn(&mut Lab, Model) -> Result<(), String>,
        after: impl Fn(&Lab) -> Result<(), String>,
    ) -> ExitCode {
        let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
        let cases = std::mem::take(&mut self.cases);
        let cases: Vec<Case> = cases
            .into_iter()
            .filter(|c| {
                let name = self.name(c);
                filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
            })
            .collect();
        if args.iter().any(|a| a == "--list") {
            for c in &cases {
                println!("{}: test", self.name(c));
            }
            return ExitCode::SUCCESS;
        }
        if cases.is_empty() {
            println!("running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored");
            return ExitCode::SUCCESS;
        }
        println!("running {} tests", cases.len());
        let started = Instant::now();
        let mut failed: Failures = Vec::new();
        let mut groups: Vec<(Model, Vec<Case>)> = Vec::new();
        for c in cases {
            match c.model() {
                Ok(m) => match groups.iter_mut().find(|(g, _)| *g == m) {
                    Some((_, list)) => list.push(c),
                    None => groups.push((m, vec![c])),
                },
                Err(e) => failed.push((self.name(&c), e.to_string())),
            }
        }
        let mut passed = 0;
        let mut ok = true;
        for (i, (model, cases)) in groups.iter().enumerate() {
            let mut opts = self.opts.clone();
            if i > 0 {
                opts.name = crate::lab::unique_name();
            }
            let lab_started = Instant::now();
            let mut lab = match Lab::up(&opts) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{}: the lab did not come up: {e}", self.prefix);
                    failed.extend(cases.iter().map(|c| {
                        (
                            self.name(c),
                            format!("the {} lab did not come up", model.name()),
                        )
                    }));
                    ok = false;
                    continue;
                }
            };
            let (p, f) = self.run_all(
                &mut lab,
                cases,
                |lab| setup(lab, *model),
                &after,
                lab_started,
            );
            passed += p;
            failed.extend(f);
            ok &= tear_down(lab, &opts.name);
        }
        report(passed, &failed, ok, started)
    }

    fn run_all(
        &self,
        lab: &mut Lab,
        cases: &[Case],
        setup: impl FnOnce(&mut Lab) -> Result<(), String>,
        after: &impl Fn(&Lab) -> Result<(), String>,
        lab_started: Instant,
    ) -> (usize, Failures) {
        let mut failed = Vec::new();
        let mut passed = 0;
        if let Err(e) = setup(lab) {
            eprintln!("{}: lab setup failed, every test fails:\n{e}", self.prefix);
            failed.extend(
                cases
                    .iter()
                    .map(|c| (self.name(c), "lab setup failed".to_string())),
            );
            return (passed, failed);
        }
        println!(
            "lab {} up with {} pods in {:.1}s",
            lab.name(),
            lab.pods().count(),
            lab_started.elapsed().as_secs_f64()
        );
        for c in cases {
            let name = self.name(c);
            let t0 = Instant::now();
            let mark = lab.agent_log_mark();
            let r = cases::run_case(lab, c);
            let secs = t0.elapsed().as_secs_f64();
            match r {
                Ok(()) => {
                    passed += 1;
                    println!("test {name} ... ok ({secs:.1}s)");
                }
                Err(e) => {
                    println!("test {name} ... FAILED ({secs:.1}s)");
                    let logs = lab.agent_logs_since(&mark, crate::lab::REPORT_LINES);
                    failed.push((name, format!("{e}\n{logs}")));
                }
            }
        }
        if let Err(e) = after(lab) {
            failed.push((format!("{}::after all cases", self.prefix), e));
        }
        (passed, failed)
    }
}

/// Prints the failures and libtest's summary line; success only with no failure and `ok` (the
/// teardowns' verdict).
pub fn report(passed: usize, failed: &[(String, String)], ok: bool, started: Instant) -> ExitCode {
    let ok = ok && failed.is_empty();
    if !failed.is_empty() {
        println!("\nfailures:\n");
        for (name, e) in failed {
            println!("---- {name} ----\n{e}\n");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; finished in {:.1}s",
        if ok { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Tears a lab down and checks nothing of it is left (its namespaces, its processes); false, with
/// what went wrong printed, otherwise.
pub fn tear_down(lab: Lab, lab_name: &str) -> bool {
    let mut ok = true;
    if let Err(e) = lab.down() {
        println!("teardown: {e}");
        ok = false;
    }
    for problem in leftovers(lab_name) {
        println!("{problem}");
        ok = false;
    }
    ok
}

/// What a torn-down lab left behind: its namespaces and processes, one line each.
fn leftovers(lab_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let netns: Vec<String> = std::fs::read_dir(crate::netns::NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("pl-{lab_name}-")))
                .collect()
        })
        .unwrap_or_default();
    if !netns.is_empty() {
        out.push(format!("teardown left namespaces behind: {netns:?}"));
    }
    let pids = crate::process::lab_pids(lab_name);
    if !pids.is_empty() {
        out.push(format!("teardown left processes behind: {pids:?}"));
    }
    out
}
