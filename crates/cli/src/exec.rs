//! `replicate -exec CMD`: walstream as the container's PID 1, supervising the application.
//!
//! The app starts once replication is running, signals are passed on to it, and walstream exits
//! with its exit code, but only after the final flush, which runs however the app ended
//! (Litestream skips it when the app exits non-zero, spec §7.4).

use std::process::ExitStatus;

use anyhow::Context;
use tokio::process::{Child, Command};
use tracing::info;

/// Starts `command` (split as a shell would, without running one), with walstream's
/// environment, stdout and stderr, and no stdin.
pub(crate) fn spawn(command: &str) -> anyhow::Result<Child> {
    let words = shlex::split(command)
        .filter(|w| !w.is_empty())
        .with_context(|| format!("-exec {command:?}: cannot split into words (unbalanced quotes?)"))?;
    let mut command_line = Command::new(&words[0]);
    command_line.args(&words[1..]).stdin(std::process::Stdio::null());
    crate::fd_limit::restore_in_child(&mut command_line);
    let child = command_line.spawn().with_context(|| format!("-exec {command:?}: cannot start {:?}", words[0]))?;
    info!(pid = child.id(), command, "started -exec command");
    Ok(child)
}

/// Passes `signal` on to the child, if it is still running.
pub(crate) fn forward(child: &Child, signal: i32) {
    if let Some(pid) = child.id() {
        info!(pid, signal, "sending signal to -exec command");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

/// The exit code walstream passes on: the app's own, 0 when the signal walstream forwarded
/// ended it (a requested shutdown), or 128 + the signal that killed it otherwise.
pub(crate) fn exit_code(status: ExitStatus, forwarded: Option<i32>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) if Some(signal) == forwarded => 0,
        (None, Some(signal)) => 128 + signal,
        (None, None) => crate::exit::ERROR,
    }
}
