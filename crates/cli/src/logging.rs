//! Logs through `tracing`: text for people, or JSON lines with a `severity` field, which Cloud
//! Logging reads as the entry's level (the `level` name other formatters write is ignored there).
//!
//! Settings, strongest first: `WALSTREAM_LOG` (a filter such as `debug`) and
//! `WALSTREAM_LOG_FORMAT` (`json` or `text`), then the config file's `logging` keys when the
//! command reads one. Only the `replicate` daemon follows `logging.stderr` (stdout otherwise, as
//! Litestream); other commands print results on stdout, so their logs always go to stderr.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

/// How to log.
#[derive(Debug, Default)]
pub(crate) struct Settings {
    pub(crate) level: Option<String>,
    pub(crate) json: bool,
    pub(crate) stdout: bool,
}

impl Settings {
    /// From a config file's `logging` keys; `daemon` when the command is `replicate`.
    pub(crate) fn from_config(logging: &LoggingConfig, daemon: bool) -> Settings {
        Settings { level: logging.level.clone(), json: logging.json, stdout: daemon && !logging.stderr }
    }
}

pub(crate) fn init(settings: Settings) {
    let level = settings
        .level
        .map(|l| if l.eq_ignore_ascii_case("warning") { "warn".to_string() } else { l.to_ascii_lowercase() })
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_env("WALSTREAM_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let json = match std::env::var("WALSTREAM_LOG_FORMAT").ok().as_deref() {
        Some("json") => true,
        Some("text") => false,
        _ => settings.json,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match (json, settings.stdout) {
        (true, true) => builder.event_format(CloudJson).with_writer(std::io::stdout).init(),
        (true, false) => builder.event_format(CloudJson).with_writer(std::io::stderr).init(),
        // Colour only for a person at a terminal; log collectors get plain text.
        (false, true) => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).with_writer(std::io::stdout).init()
        }
        (false, false) => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init()
        }
    }
}

/// One JSON object per event: `time`, `severity`, `message`, then the event's fields.
struct CloudJson;

impl<S, N> FormatEvent<S, N> for CloudJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = serde_json::Map::new();
        event.record(&mut Fields(&mut fields));
        let mut line = serde_json::Map::new();
        line.insert("time".into(), walstream_restore::rfc3339_precise(std::time::SystemTime::now()).into());
        line.insert("severity".into(), severity(*event.metadata().level()).into());
        line.insert("message".into(), fields.remove("message").unwrap_or_default());
        line.extend(fields);
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// Cloud Logging's `LogSeverity` names.
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}
