//! The agent as a process of the bed: start, stop, kill, and read its JSON log.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Node, enter, wait_until};

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The agent binary under test: `AMBIT_AGENT_BIN`, or the workspace's debug build.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("AMBIT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ambit-agent"))
}

/// One `connection closed`/`connection failed` line of the agent's log.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionRecord {
    pub direction: String,
    pub src_workload: String,
    pub src_addr: String,
    pub dst_workload: String,
    /// `namespace/name` of the service whose virtual IP was dialled, or "-".
    pub dst_service: String,
    pub dst_addr: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<String>,
    /// Carried over mTLS (HBONE).
    pub mtls: bool,
    /// SPIFFE IDs, "-" where a side has none (a plaintext peer).
    pub src_identity: String,
    pub dst_identity: String,
    /// `allow`, `deny`, `connect_failure` or `allow_error`.
    pub decision: String,
    /// The authorization rule that decided (`namespace/name rule N`), or "-".
    pub policy: String,
    /// Same-node connections: `kernel` or `relay`; "-" otherwise.
    pub fast_path: String,
}

impl ConnectionRecord {
    fn from_log(line: &Value) -> Option<Self> {
        if line.get("target")?.as_str()? != "ambit::conn" || line.get("direction").is_none() {
            return None;
        }
        let text = |key: &str| line.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
        let number = |key: &str| line.get(key).and_then(Value::as_u64).unwrap_or_default();
        Some(ConnectionRecord {
            direction: text("direction"),
            src_workload: text("src_workload"),
            src_addr: text("src_addr"),
            dst_workload: text("dst_workload"),
            dst_service: text("dst_service"),
            dst_addr: text("dst_addr"),
            bytes_sent: number("bytes_sent"),
            bytes_received: number("bytes_received"),
            error: line.get("error").and_then(Value::as_str).map(str::to_string),
            mtls: line.get("mtls").and_then(Value::as_bool).unwrap_or(false),
            src_identity: text("src_identity"),
            dst_identity: text("dst_identity"),
            decision: text("decision"),
            policy: text("policy"),
            fast_path: text("fast_path"),
        })
    }
}

pub struct Agent {
    pub node: String,
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `cmd` (the agent binary, with the arguments of its mode and
    /// any extra ones) as `node`'s agent.
    pub(crate) fn start(
        mut cmd: Command,
        node: &Node,
        cgroup: &Path,
        attach: &Path,
        dir: &Path,
        state_dir: &Path,
    ) -> Result<Agent> {
        let log = dir.join(format!("agent-{}-{}.log", node.name, LOG_COUNTER.fetch_add(1, Ordering::SeqCst)));
        cmd.args(["--node", &node.name, "--log-format", "json"])
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--cgroup")
            .arg(attach)
            .env("AMBIT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::options().append(true).open(&log)?);
        enter(&mut cmd, &Path::new("/run/netns").join(&node.netns), Some(cgroup))?;
        let child = cmd.spawn().with_context(|| format!("start {}", cmd.get_program().display()))?;
        Ok(Agent { node: node.name.clone(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log as text, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON line logged so far.
    pub fn lines(&self) -> Vec<Value> {
        self.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Every connection the agent has logged so far.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.lines().iter().filter_map(ConnectionRecord::from_log).collect()
    }

    /// Waits for a log line matching `pred`, failing if the agent exits.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut found = None;
        let result = wait_until(timeout, what, || {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                found = Some(line);
                return Ok(true);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("agent on {} exited ({status})", self.node);
            }
            Ok(false)
        });
        result.map_err(|e| e_with_log(e, self))?;
        Ok(found.expect("wait_until succeeded only after a line matched"))
    }

    /// Waits for `agent ready`.
    pub fn wait_ready(&mut self) -> Result<()> {
        self.wait_for("agent ready", Duration::from_secs(20), |l| message(l) == "agent ready").map(drop)
    }

    /// Waits for a log line with `message` about `pod` (e.g. "pod enrolled"),
    /// counting from the `nth` such line (0-based).
    pub fn wait_pod_event(&mut self, event: &str, pod: &str, nth: usize) -> Result<()> {
        let what = format!("{event} {pod} (#{nth})");
        let timeout = Duration::from_secs(15);
        wait_until(timeout, &what, || {
            let count = self
                .lines()
                .iter()
                .filter(|l| message(l) == event && l.get("pod").and_then(Value::as_str) == Some(pod))
                .count();
            Ok(count > nth)
        })
        .map_err(|e| e_with_log(e, self))
    }

    /// Waits until the agent has applied a change of its configuration
    /// directory `nth + 1` times (0-based; loading it at start is not a change).
    pub fn wait_applied(&self, nth: usize) -> Result<()> {
        wait_until(Duration::from_secs(10), "configuration applied", || {
            Ok(self.lines().iter().filter(|l| message(l) == "configuration applied").count() > nth)
        })
        .map_err(|e| e_with_log(e, self))
    }

    /// Waits until at least `n` connection records match `pred`.
    pub fn wait_connections(
        &mut self,
        n: usize,
        pred: impl Fn(&ConnectionRecord) -> bool,
    ) -> Result<Vec<ConnectionRecord>> {
        let mut matched = Vec::new();
        wait_until(Duration::from_secs(20), &format!("{n} matching connection records"), || {
            matched = self.connections().into_iter().filter(|c| pred(c)).collect();
            Ok(matched.len() >= n)
        })
        .map_err(|e| e_with_log(e, self))?;
        Ok(matched)
    }

    /// Graceful stop (SIGTERM), as Kubernetes does.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), nix::sys::signal::Signal::SIGTERM)?;
        wait_until(Duration::from_secs(10), "agent exit", || Ok(self.child.try_wait()?.is_some()))?;
        Ok(self.child.wait()?)
    }

    /// Crash (SIGKILL): no clean-up code runs.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the agent to exit on its own (e.g. a start-up failure).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_until(timeout, "agent exit", || Ok(self.child.try_wait()?.is_some()))?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `message` field of a log line.
pub fn message(line: &Value) -> &str {
    line.get("message").and_then(Value::as_str).unwrap_or_default()
}

fn e_with_log(e: anyhow::Error, agent: &Agent) -> anyhow::Error {
    e.context(format!("agent log ({}):\n{}", agent.log.display(), agent.log_text()))
}
