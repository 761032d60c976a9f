//! Replays events in order through the shared core crate and collects one
//! labelled example per cart event.
//!
//! The features of a cart are built from the state before the cart plus the
//! cart itself (exactly what the appliance does when it scores a cart before
//! ingesting it). The label is 1 when the same session later purchases the
//! same product while the session is still live (idle gaps over the session
//! timeout end a session, in the trainer and the appliance alike).

use std::collections::HashMap;

use cartscore_core::features::CategoricalKeys;
use cartscore_core::state::{SESSION_IDLE_TIMEOUT_SECS, apply};
use cartscore_core::{
    EncodingTables, Event, EventType, FeatureRow, SessionState, Timestamp, UserState,
};

/// How often (in events) expired sessions and users are dropped.
const SWEEP_EVERY: u64 = 50_000;
/// Lateness (behind the newest event) up to which sweeping never changes a result.
pub const SWEEP_GRACE_SECS: i64 = 3600;

/// One labelled cart event.
#[derive(Debug, Clone)]
pub struct Example {
    pub time: Timestamp,
    pub session: Box<str>,
    pub product_id: u64,
    /// The row without its encoded string columns (filled once tables are learned).
    pub row: FeatureRow,
    /// Interned brand, category level 1 and level 2 keys.
    pub keys: [u32; 3],
    pub label: bool,
}

impl Example {
    /// The complete model row, with the string columns encoded by `tables`.
    pub fn encoded(&self, names: &Interner, tables: &EncodingTables) -> FeatureRow {
        let mut row = self.row;
        row.encode(
            CategoricalKeys {
                brand: names.name(self.keys[0]),
                category_l1: names.name(self.keys[1]),
                category_l2: names.name(self.keys[2]),
            },
            tables,
        );
        row
    }
}

#[derive(Default)]
struct SessionTrack {
    state: SessionState,
    /// Carts still waiting for a purchase of the same product: (product, example index).
    awaiting: Vec<(u64, u32)>,
}

/// Interns the categorical keys so examples stay small.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<String, u32>,
    pub names: Vec<String>,
}

impl Interner {
    fn intern(&mut self, key: &str) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(key.to_owned());
        self.ids.insert(key.to_owned(), id);
        id
    }

    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// The replay's state: live sessions and users, and the examples so far.
#[derive(Default)]
pub struct Replay {
    /// By `core::SessionKey`: a session is its user's.
    sessions: HashMap<(u64, String), SessionTrack>,
    users: HashMap<u64, UserState>,
    pub examples: Vec<Example>,
    pub interner: Interner,
    pub events: u64,
    pub peak_sessions: usize,
    clock: Timestamp,
    fingerprint: blake3::Hasher,
}

impl Replay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event in; for a cart, first records its example.
    pub fn push(&mut self, event: &Event) {
        self.hash(event);
        self.events += 1;
        self.clock = self.clock.max(event.event_time);
        let track = self
            .sessions
            .entry((event.user_id, event.user_session.clone()))
            .or_default();
        if !track.state.is_live_at(event.event_time) {
            track.awaiting.clear();
        }
        let user = self.users.entry(event.user_id).or_default();
        match event.event_type {
            EventType::Cart => {
                let row = FeatureRow::from_state(Some(&track.state), Some(user), event);
                let keys = CategoricalKeys::of(event);
                let keys = [
                    self.interner.intern(keys.brand),
                    self.interner.intern(keys.category_l1),
                    self.interner.intern(keys.category_l2),
                ];
                let index = self.examples.len() as u32;
                self.examples.push(Example {
                    time: event.event_time,
                    session: event.user_session.as_str().into(),
                    product_id: event.product_id,
                    row,
                    keys,
                    label: false,
                });
                track.awaiting.push((event.product_id, index));
            }
            EventType::Purchase => {
                let examples = &mut self.examples;
                track.awaiting.retain(|&(product, index)| {
                    if product == event.product_id {
                        examples[index as usize].label = true;
                        false
                    } else {
                        true
                    }
                });
            }
            EventType::View | EventType::RemoveFromCart => {}
        }
        apply(&mut track.state, user, event);
        if self.events.is_multiple_of(SWEEP_EVERY) {
            self.sweep();
        }
    }

    /// Drops sessions and users that no later event can continue.
    fn sweep(&mut self) {
        self.peak_sessions = self.peak_sessions.max(self.sessions.len());
        let now = self.clock;
        // Only sessions idle past the timeout plus a grace period are dropped,
        // so an event arriving up to the grace period late still finds its
        // session exactly as a sweep-free replay would.
        let horizon =
            Timestamp(now.micros() - (SESSION_IDLE_TIMEOUT_SECS + SWEEP_GRACE_SECS) * 1_000_000);
        self.sessions
            .retain(|_, t| t.state.last_event_at >= horizon);
        self.users.retain(|_, u| u.is_live_at(now));
    }

    /// Ends the replay: no label can change any more, so the sessions and
    /// users go (at the data set's scale they are gigabytes that the
    /// training matrices can then reuse).
    pub fn finish(&mut self) {
        self.peak_sessions = self.peak_sessions.max(self.sessions.len());
        self.sessions = HashMap::new();
        self.users = HashMap::new();
        self.examples.shrink_to_fit();
    }

    fn hash(&mut self, e: &Event) {
        let h = &mut self.fingerprint;
        h.update(&e.event_time.micros().to_le_bytes());
        h.update(e.event_type.as_str().as_bytes());
        h.update(&e.product_id.to_le_bytes());
        h.update(&e.category_id.to_le_bytes());
        h.update(e.category_code.as_deref().unwrap_or("").as_bytes());
        h.update(&[0]);
        h.update(e.brand_key().as_bytes());
        h.update(&[0]);
        h.update(&e.price.to_le_bytes());
        h.update(&e.user_id.to_le_bytes());
        h.update(e.user_session.as_bytes());
        h.update(&[0]);
    }

    /// A hash of every valid event in replay order: the same data gives the
    /// same fingerprint whatever file format or source it came from.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.finalize().to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(secs: i64, kind: EventType, product: u64, session: &str) -> Event {
        Event {
            event_time: Timestamp::from_secs(1_569_888_000 + secs),
            event_type: kind,
            product_id: product,
            category_id: 5,
            category_code: Some("a.b.c".into()),
            brand: Some("x".into()),
            price: 10.0,
            user_id: 1,
            user_session: session.into(),
        }
    }

    #[test]
    fn labels_need_a_later_purchase_of_the_same_product_in_the_same_session() {
        let mut replay = Replay::new();
        for e in [
            event(0, EventType::View, 1, "s"),
            event(1, EventType::Cart, 1, "s"),
            event(2, EventType::Cart, 2, "s"),
            event(3, EventType::Cart, 3, "s"),
            event(4, EventType::Purchase, 1, "s"),
            event(5, EventType::Purchase, 2, "other"),
            event(6, EventType::Purchase, 3, "s"),
        ] {
            replay.push(&e);
        }
        let labels: Vec<bool> = replay.examples.iter().map(|e| e.label).collect();
        assert_eq!(labels, vec![true, false, true]);
    }

    #[test]
    fn a_purchase_before_the_cart_is_not_a_label() {
        let mut replay = Replay::new();
        replay.push(&event(0, EventType::Purchase, 1, "s"));
        replay.push(&event(1, EventType::Cart, 1, "s"));
        assert!(!replay.examples[0].label);
    }

    #[test]
    fn features_do_not_see_the_future() {
        // The same history with and without later events gives the same rows.
        let history = [
            event(0, EventType::View, 1, "s"),
            event(30, EventType::Cart, 1, "s"),
        ];
        let future = [
            event(40, EventType::View, 2, "s"),
            event(50, EventType::Purchase, 1, "s"),
        ];
        let mut short = Replay::new();
        history.iter().for_each(|e| short.push(e));
        let mut long = Replay::new();
        history
            .iter()
            .chain(future.iter())
            .for_each(|e| long.push(e));
        assert_eq!(short.examples[0].row, long.examples[0].row);
        assert!(long.examples[0].label && !short.examples[0].label);
    }

    #[test]
    fn an_expired_session_id_starts_over_and_drops_pending_labels() {
        let mut replay = Replay::new();
        replay.push(&event(0, EventType::Cart, 1, "s"));
        replay.push(&event(
            SESSION_IDLE_TIMEOUT_SECS + 10,
            EventType::Purchase,
            1,
            "s",
        ));
        assert!(!replay.examples[0].label);
    }

    #[test]
    fn fingerprint_depends_on_the_events() {
        let mut a = Replay::new();
        let mut b = Replay::new();
        a.push(&event(0, EventType::View, 1, "s"));
        b.push(&event(0, EventType::View, 2, "s"));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
