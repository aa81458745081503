//! Restore progress: a bar of bytes and objects for a person at a terminal, and a log line
//! every few seconds where none watches (Cloud Run, Kubernetes), so a long cold start shows it
//! is moving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;
use walstream_restore::Progress;

struct Bar {
    bar: ProgressBar,
    /// Objects downloaded, of how many.
    objects: std::sync::Mutex<(u64, u64)>,
}

impl Progress for Bar {
    fn start(&self, objects: u64, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.set_position(0);
        self.bar.set_message(format!("0/{objects} objects"));
        self.bar.set_style(
            ProgressStyle::with_template(
                "restoring {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left) {msg}",
            )
            .expect("valid template"),
        );
        self.bar.set_draw_target(ProgressDrawTarget::stderr());
        *self.objects.lock().expect("not poisoned") = (0, objects);
    }
    fn downloaded(&self, bytes: u64) {
        self.bar.inc(bytes);
        let mut objects = self.objects.lock().expect("not poisoned");
        objects.0 += 1;
        self.bar.set_message(format!("{}/{} objects", objects.0, objects.1));
    }
    fn downloading(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// How often [`LogLines`] logs while a restore downloads.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Progress as log lines: downloaded bytes of the total, the rate, objects, and how long the
/// side that decodes and writes has waited for the store or been busy applying.
struct LogLines {
    /// The command, first word of each line: `restore`, `verify`.
    command: &'static str,
    started: Instant,
    state: std::sync::Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    bytes: u64,
    total_bytes: u64,
    objects: u64,
    total_objects: u64,
    last_logged: Option<Instant>,
    /// [`Progress::split`]'s latest totals.
    waiting_for_store: Duration,
    applying: Duration,
}

impl LogLines {
    fn add(&self, bytes: u64, object: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.bytes += bytes;
        state.objects += u64::from(object);
        if state.last_logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            state.last_logged = Some(Instant::now());
            let seconds = self.started.elapsed().as_secs_f64();
            let percent =
                if state.total_bytes == 0 { 100.0 } else { 100.0 * state.bytes as f64 / state.total_bytes as f64 };
            info!(
                downloaded_mb = mb(state.bytes as f64),
                total_mb = mb(state.total_bytes as f64),
                percent = percent.round() as u64,
                mb_per_s = mb(rate(state.bytes, seconds)),
                objects = state.objects,
                total_objects = state.total_objects,
                waiting_for_store_s = seconds_to_tenths(state.waiting_for_store),
                applying_s = seconds_to_tenths(state.applying),
                "{} progress",
                self.command
            );
        }
    }
}

/// Megabytes, to a tenth: numbers in the log's fields (and in JSON logs), not strings.
fn mb(bytes: f64) -> f64 {
    (bytes / 1e5).round() / 10.0
}

/// Seconds, to a tenth.
fn seconds_to_tenths(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn rate(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds
    } else {
        0.0
    }
}

impl Progress for LogLines {
    fn start(&self, objects: u64, bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.total_objects, state.total_bytes) = (objects, bytes);
        // A restore that plans again (retention deleted part of its plan) starts over.
        (state.objects, state.bytes) = (0, 0);
        // The first part logs at once; then every LOG_EVERY.
        state.last_logged = None;
    }
    fn downloaded(&self, bytes: u64) {
        self.add(bytes, true);
    }
    fn downloading(&self, bytes: u64) {
        self.add(bytes, false);
    }
    fn split(&self, waiting_for_store: Duration, applying: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.waiting_for_store, state.applying) = (waiting_for_store, applying);
    }
    fn finish(&self) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seconds = self.started.elapsed().as_secs_f64();
        info!(
            downloaded_mb = mb(state.bytes as f64),
            seconds = (seconds * 100.0).round() / 100.0,
            mb_per_s = mb(rate(state.bytes, seconds)),
            objects = state.objects,
            waiting_for_store_s = seconds_to_tenths(state.waiting_for_store),
            applying_s = seconds_to_tenths(state.applying),
            "{}: everything downloaded",
            self.command
        );
    }
}

/// A bar on stderr when stderr is a terminal; log lines every few seconds otherwise, naming
/// `command`.
pub(crate) fn for_command(command: &'static str) -> Arc<dyn Progress> {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return Arc::new(Bar {
            bar: ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()),
            objects: Default::default(),
        });
    }
    Arc::new(LogLines { command, started: Instant::now(), state: Default::default() })
}
