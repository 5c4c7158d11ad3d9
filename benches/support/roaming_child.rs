//! Child processes of the roaming benchmark: the new device runs in a process of its own, so its
//! peak memory is its own. The benchmark binary re-runs itself with [`ROLE_ENV`] naming the
//! role; the child writes one JSON object per line on stdout (`{"metric":"…","value":…}`), and
//! the parent collects them. A child that fails (a device that did not get every message)
//! exits non-zero, and the parent panics with it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// Names the role of a child process; unset in the parent.
pub const ROLE_ENV: &str = "ROAMING_ROLE";

/// What a child reported, by metric name.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// A metric the child must have reported.
    pub fn get(&self, name: &str) -> f64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("the child did not report {name}"))
    }
}

/// Reports one metric to the parent.
pub fn report(metric: &str, value: f64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{\"metric\":\"{metric}\",\"value\":{value}}}").expect("stdout");
    out.flush().expect("stdout");
}

/// This process's peak and current resident set (`VmHWM`, `VmRSS` in /proc/self/status), in
/// kB.
pub fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Reports this process's peak and current memory as `peak_rss_kb` and `end_rss_kb`.
pub fn report_memory() {
    let (peak, now) = memory_kb();
    report("peak_rss_kb", peak as f64);
    report("end_rss_kb", now as f64);
}

/// Parses one line a child wrote, if it is a metric.
fn parse(line: &str) -> Option<(String, f64)> {
    let rest = line.trim().strip_prefix("{\"metric\":\"")?;
    let (name, rest) = rest.split_once("\",\"value\":")?;
    let value = rest.strip_suffix('}')?.parse().ok()?;
    Some((name.to_owned(), value))
}

/// Runs this benchmark binary again as `role` with `env` set, and collects what it reports.
/// Blocks until the child exits; call it off the async executor (the parent's devices and relay
/// must keep running meanwhile).
///
/// # Panics
///
/// If the child cannot start or exits unsuccessfully.
pub fn run_child(role: &str, env: &[(&str, String)]) -> Metrics {
    let exe = std::env::current_exe().expect("the benchmark binary");
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the child starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut metrics = Metrics::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("the child's output");
        match parse(&line) {
            Some((name, value)) => {
                metrics.0.insert(name, value);
            }
            None => eprintln!("{role}: {line}"),
        }
    }
    let status = child.wait().expect("the child ends");
    assert!(status.success(), "child {role} failed: {status}");
    metrics
}

/// An environment variable the parent must have set for this child.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set in the child"))
}
