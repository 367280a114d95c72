//! `cargo xtask test`: lints, the fuzz corpora replayed, every test (unit
//! and end to end), then a check that no test left a netns, cgroup or
//! kernel program behind.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{build_agent, cargo, exec, setup};

pub fn run(cargo_args: &[String]) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["fmt", "--all", "--check"])).context("formatting differs: run `cargo fmt --all`")?;
    exec(cargo().args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]))?;
    // Every input that once crashed a fuzz target, or found new code in it.
    crate::fuzz::replay()?;
    let agent = build_agent(false)?;
    // The end-to-end tests start this binary in the simulated nodes. In CI
    // (CI=true) they fail instead of skipping when something is missing.
    let mut test = cargo();
    test.arg("test").args(cargo_args).env("AMBIT_AGENT_BIN", &agent).stdout(Stdio::piped());
    let mut child = test.spawn().context("start cargo test")?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    let leftovers = ambit_testbed::leftovers();
    println!("{} passed, {} failed", totals.passed, totals.failed);
    if !leftovers.is_empty() {
        bail!(
            "tests left these behind (remove them, then find the test that leaked them):\n  {}",
            leftovers.join("\n  ")
        );
    }
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Sums the `test result:` lines of every test binary.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(summary) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in summary.split([';', '.']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(kind)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                match kind {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn sums_test_result_lines() {
        let mut totals = Totals::default();
        totals.add("test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 10.88s");
        totals.add("test result: FAILED. 7 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add("running 8 tests");
        assert_eq!((totals.passed, totals.failed), (15, 1));
    }
}
