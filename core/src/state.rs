//! Per-session and per-user state, folded from events in arrival order.
//!
//! Expiry is decided by event time, never wall-clock time, so a replay of the
//! same events always yields the same state: a session idle for longer than
//! [`SESSION_IDLE_TIMEOUT_SECS`] (a user for [`USER_IDLE_TIMEOUT_SECS`]) is
//! treated as new by the next event, whether or not a sweeper has removed it
//! yet. Sweeping is garbage collection only and never changes a feature.

use crate::event::{Event, EventType};
use crate::time::Timestamp;

/// A session idle this long is over; its id starts a new session if seen again.
pub const SESSION_IDLE_TIMEOUT_SECS: i64 = 2 * 3600;
/// A user idle this long starts again with no history.
pub const USER_IDLE_TIMEOUT_SECS: i64 = 90 * 86_400;
/// Per-session product activity kept; beyond it the least recently seen is evicted.
pub const MAX_TRACKED_PRODUCTS: usize = 64;

/// Which session an event belongs to: its user's `user_session`. The same
/// session id under another `user_id` is another session, so that all of a
/// session's state sits with its user's (on the user's partition, see
/// [`crate::shard`]) and never depends on how two users' events interleave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey<'a> {
    pub user_id: u64,
    pub user_session: &'a str,
}

impl<'a> SessionKey<'a> {
    pub fn of(event: &'a Event) -> Self {
        Self {
            user_id: event.user_id,
            user_session: &event.user_session,
        }
    }
}

/// Activity on one product within one session.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ProductActivity {
    pub product_id: u64,
    pub last_seen_at: Timestamp,
    pub views: u32,
    pub carts: u32,
    pub removes: u32,
    pub purchases: u32,
}

/// What is known about one `user_session` so far.
#[derive(Debug, Clone, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SessionState {
    pub user_id: u64,
    pub started_at: Timestamp,
    pub last_event_at: Timestamp,
    pub events: u32,
    pub views: u32,
    pub carts: u32,
    pub removes: u32,
    pub purchases: u32,
    /// Distinct products seen; exact up to [`MAX_TRACKED_PRODUCTS`], then it
    /// counts a re-seen evicted product again.
    pub distinct_products: u32,
    pub view_price_sum: f64,
    pub view_count_priced: u32,
    pub products: Vec<ProductActivity>,
}

/// What is known about one user across sessions.
#[derive(Debug, Clone, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct UserState {
    pub first_seen_at: Timestamp,
    pub last_event_at: Timestamp,
    pub sessions: u32,
    pub events: u32,
    pub views: u32,
    pub carts: u32,
    pub purchases: u32,
}

fn idle_longer_than(last: Timestamp, now: Timestamp, timeout_secs: i64) -> bool {
    now.micros() - last.micros() > timeout_secs * 1_000_000
}

impl SessionState {
    /// True when the session has events and is not expired at `now`.
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.events > 0 && !idle_longer_than(self.last_event_at, now, SESSION_IDLE_TIMEOUT_SECS)
    }

    /// True when the state can be dropped: a later event would start afresh.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        !self.is_live_at(now)
    }

    pub fn product(&self, product_id: u64) -> Option<&ProductActivity> {
        self.products.iter().find(|p| p.product_id == product_id)
    }

    fn product_mut(&mut self, product_id: u64, at: Timestamp) -> &mut ProductActivity {
        if let Some(i) = self
            .products
            .iter()
            .position(|p| p.product_id == product_id)
        {
            return &mut self.products[i];
        }
        self.distinct_products += 1;
        let fresh = ProductActivity {
            product_id,
            last_seen_at: at,
            ..Default::default()
        };
        if self.products.len() < MAX_TRACKED_PRODUCTS {
            self.products.push(fresh);
            let last = self.products.len() - 1;
            return &mut self.products[last];
        }
        // Evict the least recently seen product (lowest index on ties, so the
        // choice is deterministic).
        let mut victim = 0;
        for (i, p) in self.products.iter().enumerate() {
            if p.last_seen_at < self.products[victim].last_seen_at {
                victim = i;
            }
        }
        self.products[victim] = fresh;
        &mut self.products[victim]
    }

    /// Mean price of the products viewed so far in the session, when any.
    pub fn mean_view_price(&self) -> Option<f64> {
        mean(self.view_price_sum, self.view_count_priced)
    }
}

impl UserState {
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.events > 0 && !idle_longer_than(self.last_event_at, now, USER_IDLE_TIMEOUT_SECS)
    }

    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        !self.is_live_at(now)
    }
}

/// Folds one valid event into its session's and its user's state. Callers pass
/// `SessionState::default()` / `UserState::default()` for unknown keys.
/// What a cart's feature row reads from a session: the same numbers whether
/// they come from a [`SessionState`] or from its archived (zero-copy, LMDB)
/// form, so the trainer and the appliance cannot compute them differently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionFacts {
    pub started_at: Timestamp,
    pub last_event_at: Timestamp,
    pub events: u32,
    pub views: u32,
    pub carts: u32,
    pub removes: u32,
    pub purchases: u32,
    pub distinct_products: u32,
    pub mean_view_price: Option<f64>,
    /// `(views, carts)` of the cart's product in this session, if tracked.
    pub product: Option<(u32, u32)>,
}

impl SessionFacts {
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.events > 0 && !idle_longer_than(self.last_event_at, now, SESSION_IDLE_TIMEOUT_SECS)
    }
}

/// What a cart's feature row reads from a user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UserFacts {
    pub first_seen_at: Timestamp,
    pub last_event_at: Timestamp,
    pub events: u32,
    pub sessions: u32,
    pub carts: u32,
    pub purchases: u32,
}

impl UserFacts {
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.events > 0 && !idle_longer_than(self.last_event_at, now, USER_IDLE_TIMEOUT_SECS)
    }
}

fn mean(sum: f64, count: u32) -> Option<f64> {
    (count > 0).then(|| sum / f64::from(count))
}

impl SessionState {
    pub fn facts(&self, product_id: u64) -> SessionFacts {
        SessionFacts {
            started_at: self.started_at,
            last_event_at: self.last_event_at,
            events: self.events,
            views: self.views,
            carts: self.carts,
            removes: self.removes,
            purchases: self.purchases,
            distinct_products: self.distinct_products,
            mean_view_price: self.mean_view_price(),
            product: self.product(product_id).map(|p| (p.views, p.carts)),
        }
    }
}

impl ArchivedSessionState {
    pub fn facts(&self, product_id: u64) -> SessionFacts {
        SessionFacts {
            started_at: self.started_at.get(),
            last_event_at: self.last_event_at.get(),
            events: self.events.to_native(),
            views: self.views.to_native(),
            carts: self.carts.to_native(),
            removes: self.removes.to_native(),
            purchases: self.purchases.to_native(),
            distinct_products: self.distinct_products.to_native(),
            mean_view_price: mean(
                self.view_price_sum.to_native(),
                self.view_count_priced.to_native(),
            ),
            product: self
                .products
                .iter()
                .find(|p| p.product_id.to_native() == product_id)
                .map(|p| (p.views.to_native(), p.carts.to_native())),
        }
    }
}

impl UserState {
    pub fn facts(&self) -> UserFacts {
        UserFacts {
            first_seen_at: self.first_seen_at,
            last_event_at: self.last_event_at,
            events: self.events,
            sessions: self.sessions,
            carts: self.carts,
            purchases: self.purchases,
        }
    }
}

impl ArchivedUserState {
    pub fn facts(&self) -> UserFacts {
        UserFacts {
            first_seen_at: self.first_seen_at.get(),
            last_event_at: self.last_event_at.get(),
            events: self.events.to_native(),
            sessions: self.sessions.to_native(),
            carts: self.carts.to_native(),
            purchases: self.purchases.to_native(),
        }
    }
}

pub fn apply(session: &mut SessionState, user: &mut UserState, event: &Event) {
    let t = event.event_time;
    if !user.is_live_at(t) {
        *user = UserState {
            first_seen_at: t,
            last_event_at: t,
            ..Default::default()
        };
    }
    if !session.is_live_at(t) {
        *session = SessionState {
            user_id: event.user_id,
            started_at: t,
            last_event_at: t,
            ..Default::default()
        };
        user.sessions += 1;
    }

    // Arrival order decides what is counted; the clocks take the extremes, so
    // a late event never moves `last_event_at` backwards and an early one
    // moves the start back. A user's events come from every partition of the
    // stream in an interleaving that depends on fetch timing; with min/max
    // and counts, the user state does not depend on it.
    session.started_at = session.started_at.min(t);
    session.last_event_at = session.last_event_at.max(t);
    user.first_seen_at = user.first_seen_at.min(t);
    user.last_event_at = user.last_event_at.max(t);
    session.events += 1;
    user.events += 1;

    let product = session.product_mut(event.product_id, t);
    product.last_seen_at = product.last_seen_at.max(t);
    match event.event_type {
        EventType::View => {
            product.views += 1;
            session.views += 1;
            user.views += 1;
            if event.price > 0.0 {
                session.view_price_sum += event.price;
                session.view_count_priced += 1;
            }
        }
        EventType::Cart => {
            product.carts += 1;
            session.carts += 1;
            user.carts += 1;
        }
        EventType::RemoveFromCart => {
            product.removes += 1;
            session.removes += 1;
        }
        EventType::Purchase => {
            product.purchases += 1;
            session.purchases += 1;
            user.purchases += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event(secs: i64, kind: EventType, product: u64, price: f64) -> Event {
        Event {
            event_time: Timestamp::from_secs(1_569_888_000 + secs),
            event_type: kind,
            product_id: product,
            category_id: 1,
            category_code: None,
            brand: None,
            price,
            user_id: 7,
            user_session: "s".into(),
        }
    }

    #[test]
    fn counts_and_prices() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        apply(&mut s, &mut u, &event(0, EventType::View, 1, 10.0));
        apply(&mut s, &mut u, &event(5, EventType::View, 2, 30.0));
        apply(&mut s, &mut u, &event(9, EventType::Cart, 2, 30.0));
        assert_eq!(
            (s.events, s.views, s.carts, s.distinct_products),
            (3, 2, 1, 2)
        );
        assert_eq!(s.mean_view_price(), Some(20.0));
        assert_eq!(s.product(2).map(|p| (p.views, p.carts)), Some((1, 1)));
        assert_eq!((u.sessions, u.carts), (1, 1));
    }

    #[test]
    fn expiry_uses_event_time() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        apply(&mut s, &mut u, &event(0, EventType::View, 1, 10.0));
        assert!(s.is_live_at(Timestamp::from_secs(
            1_569_888_000 + SESSION_IDLE_TIMEOUT_SECS
        )));
        let later = SESSION_IDLE_TIMEOUT_SECS + 1;
        assert!(s.is_expired_at(Timestamp::from_secs(1_569_888_000 + later)));
        apply(&mut s, &mut u, &event(later, EventType::View, 1, 10.0));
        assert_eq!((s.events, u.sessions, u.events), (1, 2, 2));
    }

    #[test]
    fn late_events_do_not_rewind_the_clock() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        apply(&mut s, &mut u, &event(100, EventType::View, 1, 10.0));
        apply(&mut s, &mut u, &event(50, EventType::View, 2, 10.0));
        assert_eq!(s.last_event_at, Timestamp::from_secs(1_569_888_100));
        assert_eq!(s.started_at, Timestamp::from_secs(1_569_888_050));
        assert_eq!(s.events, 2);
    }

    /// Two sessions of one user on different partitions interleave as fetches
    /// happen to return; the user state must not depend on how.
    #[test]
    fn user_state_does_not_depend_on_interleaving_across_sessions() {
        let a: Vec<Event> = [(0, EventType::View), (40, EventType::Cart)]
            .map(|(t, k)| event(t, k, 1, 10.0))
            .to_vec();
        let b: Vec<Event> = [(10, EventType::View), (20, EventType::Purchase)]
            .map(|(t, k)| Event {
                user_session: "other".into(),
                ..event(t, k, 2, 5.0)
            })
            .to_vec();
        let fold = |order: &[&Event]| {
            let (mut sa, mut sb, mut u) = Default::default();
            for e in order {
                let s: &mut SessionState = if e.user_session == "s" {
                    &mut sa
                } else {
                    &mut sb
                };
                apply(s, &mut u, e);
            }
            (sa, sb, u)
        };
        let one = fold(&[&a[0], &a[1], &b[0], &b[1]]);
        let other = fold(&[&b[0], &a[0], &b[1], &a[1]]);
        assert_eq!(one, other);
        assert_eq!(one.2.first_seen_at, Timestamp::from_secs(1_569_888_000));
        assert_eq!(one.2.sessions, 2);
    }

    #[test]
    fn archived_state_gives_the_same_facts() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        apply(&mut s, &mut u, &event(0, EventType::View, 1, 10.0));
        apply(&mut s, &mut u, &event(5, EventType::View, 2, 30.5));
        apply(&mut s, &mut u, &event(9, EventType::Cart, 2, 30.5));
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&s).unwrap();
        // Unaligned archives read from any offset, as LMDB values may sit.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        let archived =
            rkyv::access::<ArchivedSessionState, rkyv::rancor::Error>(&shifted[1..]).unwrap();
        for product in [1, 2, 3] {
            assert_eq!(archived.facts(product), s.facts(product));
        }
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&u).unwrap();
        let archived = rkyv::access::<ArchivedUserState, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(archived.facts(), u.facts());
        let back: SessionState = rkyv::deserialize::<SessionState, rkyv::rancor::Error>(
            rkyv::access::<ArchivedSessionState, rkyv::rancor::Error>(&shifted[1..]).unwrap(),
        )
        .unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn tracked_products_are_bounded_and_evict_least_recent() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        for p in 0..(MAX_TRACKED_PRODUCTS as u64 + 10) {
            apply(
                &mut s,
                &mut u,
                &event(p as i64, EventType::View, p + 1, 1.0),
            );
        }
        assert_eq!(s.products.len(), MAX_TRACKED_PRODUCTS);
        assert_eq!(s.distinct_products, MAX_TRACKED_PRODUCTS as u32 + 10);
        assert!(s.product(1).is_none());
        assert!(s.product(MAX_TRACKED_PRODUCTS as u64 + 10).is_some());
    }
}
