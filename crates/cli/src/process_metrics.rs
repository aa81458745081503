//! The standard `process_*` series (the Prometheus client libraries' names), read from `/proc`
//! at scrape time: walstream's own memory, CPU and descriptors beside the app's, which is how
//! a user sees it cost the app nothing. Written here rather than with the `prometheus` crate's
//! `process` feature, which would add the `procfs` crate and its dependencies for six numbers.

use std::fmt::Write;

/// Appends the series in Prometheus text format; a field `/proc` does not give is left out.
pub(crate) fn render(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
    let cpu = field(11).zip(field(12)).map(|(user, system)| (user + system) / ticks);
    let start = field(19).and_then(|since_boot| Some(boot_time()? + since_boot / ticks));
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).ok();
    let max_fds = {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we pass.
        (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur as f64)
    };
    let series: [(&str, &str, &str, Option<f64>); 7] = [
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kib("VmRSS:").map(|b| b as f64)),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", kib("VmSize:").map(|b| b as f64)),
        ("process_open_fds", "gauge", "Number of open file descriptors.", open_fds),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()),
        ),
    ];
    for (name, kind, help, value) in series {
        if let Some(value) = value {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        }
    }
}

/// When the machine booted, in seconds since the epoch (`btime` in `/proc/stat`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}
