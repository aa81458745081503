//! SIGTERM and SIGINT: the first starts a graceful shutdown, a second exits at once.

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::exit;

/// The first SIGTERM or SIGINT received, for passing on to an `-exec` command.
pub(crate) static FIRST_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGTERM);

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. The
/// handlers are in place when this returns.
pub(crate) fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let signal = tokio::select! { _ = term.recv() => libc::SIGTERM, _ = int.recv() => libc::SIGINT };
        FIRST_SIGNAL.store(signal, std::sync::atomic::Ordering::SeqCst);
        info!(signal, "signal received, walstream shutting down");
        shutdown.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the flush");
        std::process::exit(exit::INTERRUPTED);
    });
    Ok(())
}
