//! The restore progress bar: bytes and objects, drawn only for a person at a terminal.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use walstream_restore::Progress;

struct Bar {
    bar: ProgressBar,
    /// Objects downloaded, of how many.
    objects: std::sync::Mutex<(u64, u64)>,
}

impl Progress for Bar {
    fn start(&self, objects: u64, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.set_message(format!("0/{objects} objects"));
        self.bar.set_style(ProgressStyle::with_template("restoring {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left) {msg}").expect("valid template"));
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

/// A bar on stderr when stderr is a terminal; nothing otherwise, so logs stay clean.
pub(crate) fn bar_if_terminal() -> Option<Arc<dyn Progress>> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    Some(Arc::new(Bar { bar: ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()), objects: Default::default() }))
}
