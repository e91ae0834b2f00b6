//! `tracing` events from the agent, at the controller's subscriber.
//!
//! Right after the hello, the controller tells the agent the most verbose
//! level its own subscriber wants ([`Message::TraceLevel`]). The agent's
//! subscriber ([`Forwarder`]) enables exactly the events at that level or
//! above, so the others are never even built, and sends each as a
//! [`TraceEvent`]. The controller emits it again as an event of its own
//! (target `chopsticks::agent`) with a `host` field (the chain of hosts,
//! `outer > inner`, when the agent is nested), the agent-side target in
//! `remote_target`, the event's fields in `fields`, and its message.
//!
//! [`Message::TraceLevel`]: crate::protocol::Message::TraceLevel

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::protocol::{MAX_PEER_TEXT, Message, bounded_text};
use crate::wire::{OutFrame, Outbox};

/// The target of the events the controller emits for the agent's.
pub const AGENT_TARGET: &str = "chopsticks::agent";

/// One `tracing` event of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// 1 (error) to 5 (trace).
    pub level: u8,
    /// The event's target on the agent.
    pub target: String,
    /// The event's message.
    pub message: String,
    /// Its other fields, as `name=value` separated by spaces.
    pub fields: String,
    /// The hosts it came through below the agent that sent it (nested agents).
    pub hosts: Vec<String>,
}

/// The number a level travels as: 1 (error) to 5 (trace); 0 is off.
pub fn level_number(level: Option<Level>) -> u8 {
    match level {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

/// The level number the controller's subscribers want at most, now.
pub fn wanted_level() -> u8 {
    level_number(tracing::level_filters::LevelFilter::current().into_level())
}

/// Events this process's [`Forwarder`] has sent (for tests, which read it
/// on the agent).
pub static EVENTS_FORWARDED: AtomicU64 = AtomicU64::new(0);

/// Emits the agent's `event`, received from `host`, to this process's subscriber.
pub(crate) fn emit(host: &str, event: TraceEvent) {
    let mut chain = host.to_string();
    for below in event
        .hosts
        .iter()
        .take(crate::agent_env::MAX_DEPTH as usize)
    {
        chain.push_str(" > ");
        chain.push_str(&bounded_text(below, 256));
    }
    let target = bounded_text(&event.target, 256);
    let fields = bounded_text(&event.fields, MAX_PEER_TEXT);
    let message = bounded_text(&event.message, MAX_PEER_TEXT);
    macro_rules! at {
        ($level:expr) => {
            tracing::event!(
                target: "chopsticks::agent",
                $level,
                host = %chain,
                remote_target = %target,
                fields = %fields,
                "{message}"
            )
        };
    }
    match event.level {
        1 => at!(Level::ERROR),
        2 => at!(Level::WARN),
        3 => at!(Level::INFO),
        4 => at!(Level::DEBUG),
        _ => at!(Level::TRACE),
    }
}

/// The agent's subscriber: sends every event at or above the controller's
/// level to the controller as a [`TraceEvent`]. Spans are not forwarded.
#[derive(Debug)]
pub struct Forwarder {
    outbox: Outbox,
    level: AtomicU8,
}

impl Forwarder {
    /// A forwarder sending on `outbox`, off until [`set_level`](Self::set_level).
    pub fn new(outbox: Outbox) -> Forwarder {
        Forwarder {
            outbox,
            level: AtomicU8::new(0),
        }
    }

    /// Forwards events at level number `level` (see [`level_number`]) or above.
    pub fn set_level(&self, level: u8) {
        if self.level.swap(level.min(5), Ordering::Relaxed) != level {
            tracing::callsite::rebuild_interest_cache();
        }
    }

    fn wants(&self, level: &Level) -> bool {
        level_number(Some(*level)) <= self.level.load(Ordering::Relaxed)
    }
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && self.wants(metadata.level())
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match self.level.load(Ordering::Relaxed) {
            0 => tracing::level_filters::LevelFilter::OFF,
            1 => tracing::level_filters::LevelFilter::ERROR,
            2 => tracing::level_filters::LevelFilter::WARN,
            3 => tracing::level_filters::LevelFilter::INFO,
            4 => tracing::level_filters::LevelFilter::DEBUG,
            _ => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let forwarded = if metadata.target() == AGENT_TARGET {
            // An event of a nested agent, emitted again here: pass it on
            // with its chain of hosts.
            TraceEvent {
                level: level_number(Some(*metadata.level())),
                target: fields.remote_target,
                message: fields.message,
                fields: fields.fields,
                hosts: fields.host.split(" > ").map(str::to_string).collect(),
            }
        } else {
            TraceEvent {
                level: level_number(Some(*metadata.level())),
                target: metadata.target().to_string(),
                message: fields.message,
                fields: fields.others,
                hosts: Vec::new(),
            }
        };
        EVENTS_FORWARDED.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .outbox
            .send(OutFrame::message(&Message::Trace(forwarded)));
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// An event's fields as text.
#[derive(Default)]
struct Fields {
    message: String,
    others: String,
    host: String,
    remote_target: String,
    fields: String,
}

impl Fields {
    fn put(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        let text = value.to_string();
        let name = field.name();
        if name == "message" {
            self.message = text;
            return;
        }
        match name {
            "host" => self.host.clone_from(&text),
            "remote_target" => self.remote_target.clone_from(&text),
            "fields" => self.fields.clone_from(&text),
            _ => {}
        }
        if !self.others.is_empty() {
            self.others.push(' ');
        }
        let _ = write!(self.others, "{name}={text}");
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_travel_as_numbers_and_off_is_zero() {
        assert_eq!(level_number(None), 0);
        assert_eq!(level_number(Some(Level::ERROR)), 1);
        assert_eq!(level_number(Some(Level::TRACE)), 5);
    }
}
