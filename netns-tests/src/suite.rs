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

/// Failed tests: (name, what went wrong).
pub type Failures = Vec<(String, String)>;

impl CaseSuite {
    fn name(&self, c: &Case) -> String {
        format!("{}::{} {}", self.prefix, c.id, c.title)
    }

    /// Runs the suite with the test binary's arguments ([`Selection`]): one lab for each
    /// model the cases name (`crate::model`), in the order they first name it; `setup` prepares a
    /// lab for its model, `after` looks at it once its cases ran.
    pub fn main(
        mut self,
        args: &[String],
        setup: impl Fn(&mut Lab, Model) -> Result<(), String>,
        after: impl Fn(&Lab) -> Result<(), String>,
    ) -> ExitCode {
        let selection = Selection::of(args);
        let cases = std::mem::take(&mut self.cases);
        let cases: Vec<Case> = cases
            .into_iter()
            .filter(|c| selection.selects(&self.name(c)))
            .collect();
        let names: Vec<String> = cases.iter().map(|c| self.name(c)).collect();
        if let Some(done) = selection.announce(&names) {
            return done;
        }
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
            let names: Vec<String> = cases.iter().map(|c| self.name(c)).collect();
            return (passed, setup_failed(self.prefix, &e, &names));
        }
        println!(
            "lab {} up with {} pods in {:.1}s",
            lab.name(),
            lab.pods().count(),
            lab_started.elapsed().as_secs_f64()
        );
        for c in cases {
            match run_one(lab, self.name(c), |lab| cases::run_case(lab, c)) {
                Ok(()) => passed += 1,
                Err(f) => failed.push(f),
            }
        }
        if let Err(e) = after(lab) {
            failed.push((format!("{}::after all cases", self.prefix), e));
        }
        (passed, failed)
    }
}

/// Which tests the binary's arguments select, as libtest reads them: `[FILTER...]` (a name
/// containing any filter; the name itself with `--exact`), `--list` to name them instead.
pub struct Selection {
    filters: Vec<String>,
    exact: bool,
    list: bool,
}

impl Selection {
    pub fn of(args: &[String]) -> Self {
        Self {
            filters: args
                .iter()
                .filter(|a| !a.starts_with('-'))
                .cloned()
                .collect(),
            exact: args.iter().any(|a| a == "--exact"),
            list: args.iter().any(|a| a == "--list"),
        }
    }

    pub fn selects(&self, name: &str) -> bool {
        self.filters.is_empty()
            || self.filters.iter().any(|f| {
                if self.exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            })
    }

    /// Before the selected tests (`names`) run: with `--list` names them, with none says so as
    /// libtest does; either way the binary is done (`Some`). Else says how many will run.
    pub fn announce(&self, names: &[String]) -> Option<ExitCode> {
        if self.list {
            for n in names {
                println!("{n}: test");
            }
            return Some(ExitCode::SUCCESS);
        }
        if names.is_empty() {
            println!("running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored");
            return Some(ExitCode::SUCCESS);
        }
        println!("running {} tests", names.len());
        None
    }
}

/// Runs one test against `lab`: libtest's line with its time, and on failure (name, the error
/// and what each agent logged while the test ran).
pub fn run_one(
    lab: &mut Lab,
    name: String,
    test: impl FnOnce(&mut Lab) -> Result<(), String>,
) -> Result<(), (String, String)> {
    let t0 = Instant::now();
    let mark = lab.agent_log_mark();
    let r = test(lab);
    let secs = t0.elapsed().as_secs_f64();
    match r {
        Ok(()) => {
            println!("test {name} ... ok ({secs:.1}s)");
            Ok(())
        }
        Err(e) => {
            println!("test {name} ... FAILED ({secs:.1}s)");
            let logs = lab.agent_logs_since(&mark, crate::lab::REPORT_LINES);
            Err((name, format!("{e}\n{logs}")))
        }
    }
}

/// A lab's setup failed (`error`): every test meant for it (`names`) fails with that said.
pub fn setup_failed(prefix: &str, error: &str, names: &[String]) -> Failures {
    eprintln!("{prefix}: lab setup failed, every test fails:\n{error}");
    names
        .iter()
        .map(|n| (n.clone(), "lab setup failed".to_string()))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::Selection;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    /// As libtest reads its arguments: a filter selects the names containing it, `--exact` only
    /// the name itself, no filter every test; options are never filters.
    #[test]
    fn a_selection_reads_filters_and_exact_as_libtest_does() {
        let name = "upstream::T02 should support a 'default-deny-all' policy";
        for (given, selects) in [
            (&[][..], true),
            (&["T02"][..], true),
            (&["T03"][..], false),
            (&["T03", "deny-all"][..], true),
            (&["--exact", "T02"][..], false),
            (&["--exact", name][..], true),
            (&["--nocapture"][..], true),
        ] {
            assert_eq!(
                Selection::of(&args(given)).selects(name),
                selects,
                "{given:?}"
            );
        }
    }
}
