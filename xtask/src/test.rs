//! `cargo xtask test`: every test, unit and end to end, then a check that no
//! test left a netns, cgroup or kernel program behind.

use anyhow::{Result, bail};

use crate::{build_agent, cargo, exec, setup};

pub fn run(cargo_args: &[String]) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    let agent = build_agent(false)?;
    // The end-to-end tests start this binary in the simulated nodes. In CI
    // (CI=true) they fail instead of skipping when something is missing.
    let mut test = cargo();
    test.arg("test")
        .args(cargo_args)
        .env("AMBIT_AGENT_BIN", &agent);
    let result = exec(&mut test);
    let leftovers = ambit_testbed::leftovers();
    if !leftovers.is_empty() {
        bail!(
            "tests left these behind (remove them, then find the test that leaked them):\n  {}",
            leftovers.join("\n  ")
        );
    }
    result
}
