//! Logs go to stderr, human-readable by default or one JSON object per line; stdout is kept
//! for the command-line contract lines.
//!
//! The JSON format is the one of the spec (section 7.2): every line is a flat object with exactly
//! `timestamp` (UTC, RFC 3339 with milliseconds), `level`, `event` (the message), `tunnel_id`
//! (from the event, else the nearest enclosing span, else `null`) and `details` (every other
//! field of the event and its spans, plus `target`).

use std::io::Write;
use std::time::SystemTime;

use serde_json::{Map, Number, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line: `timestamp`, `level`, `event`, `tunnel_id`, `details`.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub(crate) fn init(format: LogFormat) {
    match format {
        LogFormat::Human => tracing_subscriber::fmt()
            .with_env_filter(default_filter())
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal, never in files or pipes.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            if let Err(e) = json_subscriber(default_filter(), std::io::stderr).try_init() {
                eprintln!("warning: cannot install the log subscriber: {e}");
            }
        }
    }
}

/// `RUST_LOG` if set and valid, else `info`.
fn default_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A subscriber that filters with `filter` and writes JSON lines to `make_writer`.
fn json_subscriber<W>(filter: EnvFilter, make_writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(JsonLayer::new(make_writer))
}

/// Name of the field carrying the tunnel id, lifted to the top level of each line.
const TUNNEL_ID: &str = "tunnel_id";
/// Name of the field tracing uses for an event's message.
const MESSAGE: &str = "message";
/// Field set by `tracing-log` on events bridged from the `log` crate: the real target.
const LOG_TARGET: &str = "log.target";
/// Other bookkeeping fields set by `tracing-log`, dropped from `details`.
const LOG_NOISE: [&str; 3] = ["log.module_path", "log.file", "log.line"];

/// A [`tracing_subscriber::Layer`] writing each event as one flat JSON object per line.
///
/// Span fields are kept (as a JSON map) in the span's extensions, so the layer needs a
/// subscriber implementing [`LookupSpan`] (the [`tracing_subscriber::registry()`]).
pub(crate) struct JsonLayer<W> {
    /// Where lines go; one writer is made per event.
    make_writer: W,
}

impl<W> JsonLayer<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    /// A layer writing to `make_writer` (e.g. `std::io::stderr`).
    pub(crate) fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

/// The recorded fields of one span, stored in its extensions.
struct SpanFields(Map<String, Value>);

impl<S, W> tracing_subscriber::Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        let mut ext = span.extensions_mut();
        match ext.get_mut::<SpanFields>() {
            Some(existing) => existing.0.extend(fields),
            None => ext.insert(SpanFields(fields)),
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut ext = span.extensions_mut();
        match ext.get_mut::<SpanFields>() {
            Some(existing) => values.record(&mut JsonVisitor(&mut existing.0)),
            None => {
                let mut fields = Map::new();
                values.record(&mut JsonVisitor(&mut fields));
                ext.insert(SpanFields(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let timestamp = tube_proto::time::rfc3339_millis(SystemTime::now());

        // Spans from the root down, so inner spans override outer ones.
        let mut details = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    details.extend(fields.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        // The innermost span's tunnel id, unless the event has its own.
        let span_tunnel_id = details.remove(TUNNEL_ID);

        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let message = match fields.remove(MESSAGE) {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let tunnel_id = fields
            .remove(TUNNEL_ID)
            .or(span_tunnel_id)
            .unwrap_or(Value::Null);
        let target = match fields.remove(LOG_TARGET) {
            Some(Value::String(t)) => t,
            _ => meta.target().to_owned(),
        };
        for noise in LOG_NOISE {
            fields.remove(noise);
        }
        details.extend(fields);
        details.insert("target".to_owned(), Value::String(target));

        let Ok(line) = render_line(
            &timestamp,
            meta.level().as_str(),
            &message,
            &tunnel_id,
            &details,
        ) else {
            return;
        };
        let mut writer = self.make_writer.make_writer_for(meta);
        // A log line that cannot be written is dropped: logging never fails the program.
        let _ = writer.write_all(&line);
    }
}

/// One output line, keys in a fixed order, ending with `'\n'`.
fn render_line(
    timestamp: &str,
    level: &str,
    event: &str,
    tunnel_id: &Value,
    details: &Map<String, Value>,
) -> serde_json::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"{\"timestamp\":");
    serde_json::to_writer(&mut buf, timestamp)?;
    buf.extend_from_slice(b",\"level\":");
    serde_json::to_writer(&mut buf, level)?;
    buf.extend_from_slice(b",\"event\":");
    serde_json::to_writer(&mut buf, event)?;
    buf.extend_from_slice(b",\"tunnel_id\":");
    serde_json::to_writer(&mut buf, tunnel_id)?;
    buf.extend_from_slice(b",\"details\":");
    serde_json::to_writer(&mut buf, details)?;
    buf.extend_from_slice(b"}\n");
    Ok(buf)
}

/// Records tracing field values into a JSON map, keeping numbers and booleans typed.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    /// Stores `value` under the field's name, replacing any earlier value.
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities have no JSON number form.
        let v =
            Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, v);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, v);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%x` fields arrive here too, wrapped so that `Debug` prints their `Display`.
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `MakeWriter` appending everything to a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    /// The writer handed out by [`Capture`].
    struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for CaptureWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = CaptureWriter;

        fn make_writer(&'a self) -> Self::Writer {
            CaptureWriter(Arc::clone(&self.0))
        }
    }

    /// Runs `f` under a scoped JSON subscriber filtered by `filter`; returns the raw output.
    fn capture_raw(filter: &str, f: impl FnOnce()) -> String {
        let capture = Capture::default();
        let subscriber = json_subscriber(EnvFilter::new(filter), capture.clone());
        tracing::subscriber::with_default(subscriber, f);
        let bytes = capture.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes).expect("utf-8 output")
    }

    /// Runs `f` under a scoped JSON subscriber; returns one parsed object per line.
    fn capture(filter: &str, f: impl FnOnce()) -> Vec<Map<String, Value>> {
        let raw = capture_raw(filter, f);
        assert!(raw.is_empty() || raw.ends_with('\n'), "output: {raw:?}");
        raw.lines()
            .map(|line| match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(map)) => map,
                other => panic!("not a JSON object: {line:?} ({other:?})"),
            })
            .collect()
    }

    /// Whether `s` looks like `2026-11-23T21:30:05.123Z`.
    fn is_timestamp(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 24
            && b.iter().enumerate().all(|(i, &c)| match i {
                4 | 7 => c == b'-',
                10 => c == b'T',
                13 | 16 => c == b':',
                19 => c == b'.',
                23 => c == b'Z',
                _ => c.is_ascii_digit(),
            })
    }

    #[test]
    fn one_line_per_event_with_exactly_the_five_keys() {
        let lines = capture("trace", || {
            tracing::error!("first");
            tracing::warn!(n = 1, "second");
            tracing::info!("third");
        });
        assert_eq!(lines.len(), 3);
        for line in &lines {
            let mut keys: Vec<&str> = line.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["details", "event", "level", "timestamp", "tunnel_id"]
            );
            let ts = line["timestamp"].as_str().expect("timestamp is a string");
            assert!(is_timestamp(ts), "bad timestamp {ts:?}");
            assert!(line["details"].is_object());
        }
    }

    #[test]
    fn keys_come_in_spec_order() {
        let raw = capture_raw("info", || tracing::info!("hello"));
        assert!(raw.starts_with("{\"timestamp\":\""), "{raw}");
        let pos = |k: &str| raw.find(&format!("\"{k}\":")).expect("key present");
        assert!(pos("timestamp") < pos("level"));
        assert!(pos("level") < pos("event"));
        assert!(pos("event") < pos("tunnel_id"));
        assert!(pos("tunnel_id") < pos("details"));
    }

    #[test]
    fn levels_and_messages() {
        let lines = capture("trace", || {
            tracing::error!("e happened");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
            tracing::info!(k = 1);
        });
        let levels: Vec<&str> = lines.iter().filter_map(|l| l["level"].as_str()).collect();
        assert_eq!(levels, ["ERROR", "WARN", "INFO", "DEBUG", "TRACE", "INFO"]);
        let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
        assert_eq!(events, ["e happened", "w", "i", "d", "t", ""]);
    }

    #[test]
    fn filter_drops_lower_levels() {
        let lines = capture("info", || {
            tracing::debug!("hidden");
            tracing::info!("shown");
        });
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["event"], "shown");
    }

    #[test]
    fn tunnel_id_from_event_span_or_null() {
        let lines = capture("info", || {
            tracing::info!(tunnel_id = "t-event", "from event");
            let span = tracing::info_span!("session", tunnel_id = "t-span");
            let guard = span.enter();
            tracing::info!("from span");
            tracing::info!(tunnel_id = "t-own", "event wins");
            drop(guard);
            tracing::info!("none");
        });
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["tunnel_id"], "t-event");
        assert_eq!(lines[1]["tunnel_id"], "t-span");
        assert_eq!(lines[2]["tunnel_id"], "t-own");
        assert_eq!(lines[3]["tunnel_id"], Value::Null);
        for line in &lines {
            assert!(line["details"].get("tunnel_id").is_none(), "{line:?}");
        }
    }

    #[test]
    fn tunnel_id_from_nearest_span_and_recorded_later() {
        let lines = capture("info", || {
            let outer = tracing::info_span!("outer", tunnel_id = "outer-t");
            let inner =
                tracing::info_span!(parent: &outer, "inner", tunnel_id = tracing::field::Empty);
            inner.in_scope(|| tracing::info!("before record"));
            inner.record("tunnel_id", "inner-t");
            inner.in_scope(|| tracing::info!("after record"));
        });
        assert_eq!(lines[0]["tunnel_id"], "outer-t");
        assert_eq!(lines[1]["tunnel_id"], "inner-t");
    }

    #[test]
    fn details_keep_types_and_target() {
        let addr = "10.0.0.1:443";
        let lines = capture("info", || {
            tracing::info!(
                bytes = 42u64,
                delta = -3i64,
                ratio = 0.5f64,
                ok = true,
                name = "svc",
                %addr,
                reason = ?Some(1),
                "typed"
            );
        });
        let d = lines[0]["details"].as_object().expect("details object");
        assert_eq!(d["bytes"], Value::from(42u64));
        assert!(d["bytes"].is_u64());
        assert_eq!(d["delta"], Value::from(-3i64));
        assert_eq!(d["ratio"], Value::from(0.5f64));
        assert_eq!(d["ok"], Value::Bool(true));
        assert_eq!(d["name"], "svc");
        assert_eq!(d["addr"], "10.0.0.1:443");
        assert_eq!(d["reason"], "Some(1)");
        assert_eq!(d["target"], module_path!());
        assert!(d.get("message").is_none());
        assert_eq!(d.len(), 8);
    }

    #[test]
    fn details_merge_spans_inner_overrides_outer() {
        let lines = capture("info", || {
            let outer = tracing::info_span!("outer", conn_id = 1u64, hop = "outer", who = "o");
            let inner = tracing::info_span!(parent: &outer, "inner", hop = "inner", peer = true);
            inner.in_scope(|| tracing::info!(who = "event", "merged"));
        });
        let d = lines[0]["details"].as_object().expect("details object");
        assert_eq!(d["conn_id"], Value::from(1u64));
        assert_eq!(d["hop"], "inner");
        assert_eq!(d["peer"], Value::Bool(true));
        assert_eq!(d["who"], "event");
        assert!(d.contains_key("target"));
    }
}
