//! A running process's CPU time and memory, from /proc (the replicators are measured while they
//! run, phase by phase, not only at exit).

use std::time::Duration;

use anyhow::Context;

pub struct ProcStats {
    /// User + system time so far.
    pub cpu: Duration,
    /// Peak resident set size (VmHWM).
    pub peak_rss_kib: u64,
}

pub fn read(pid: u32) -> anyhow::Result<ProcStats> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are fields 14 and 15 of the line, so 12 and 13 after the ')'.
    let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")?;
    Ok(ProcStats { cpu: Duration::from_millis(ticks * 1000 / per_second), peak_rss_kib })
}
