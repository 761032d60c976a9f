//! The feature contract: one fixed-size f32 row per cart event, computed from
//! the state *before* the cart event plus the cart event itself. Nothing that
//! happens after the cart event can reach a feature.

use crate::encoding::EncodingTables;
use crate::event::Event;
use crate::state::{SessionFacts, SessionState, UserFacts, UserState};

/// Bumped whenever a feature's meaning, order or the state rules change.
pub const CONTRACT_VERSION: u32 = 1;

/// Column indexes, in contract order.
pub mod col {
    pub const BRAND_FREQ: usize = 0;
    pub const BRAND_PURCHASE_RATE: usize = 1;
    pub const PRICE: usize = 2;
    pub const WEEKDAY: usize = 3;
    pub const CATEGORY_L1_FREQ: usize = 4;
    pub const CATEGORY_L1_PURCHASE_RATE: usize = 5;
    pub const CATEGORY_L2_FREQ: usize = 6;
    pub const CATEGORY_L2_PURCHASE_RATE: usize = 7;
    pub const SESSION_EVENTS: usize = 8;
    pub const SESSION_VIEWS: usize = 9;
    pub const SESSION_CARTS: usize = 10;
    pub const SESSION_REMOVES: usize = 11;
    pub const SESSION_PURCHASES: usize = 12;
    pub const SESSION_DISTINCT_PRODUCTS: usize = 13;
    pub const PRODUCT_VIEWS_IN_SESSION: usize = 14;
    pub const PRODUCT_PREV_CARTS_IN_SESSION: usize = 15;
    pub const SESSION_AGE_SECONDS: usize = 16;
    pub const SECONDS_SINCE_PREV_EVENT: usize = 17;
    pub const PRICE_TO_MEAN_VIEW_PRICE: usize = 18;
    pub const HOUR_OF_DAY: usize = 19;
    pub const USER_PREV_SESSIONS: usize = 20;
    pub const USER_CARTS: usize = 21;
    pub const USER_PURCHASES: usize = 22;
    pub const USER_PURCHASE_RATE: usize = 23;
    pub const USER_DAYS_SINCE_FIRST_SEEN: usize = 24;
}

pub const FEATURE_COUNT: usize = 25;

/// Names in column order; the bundle must list exactly these.
pub const FEATURE_NAMES: [&str; FEATURE_COUNT] = [
    "brand_freq",
    "brand_purchase_rate",
    "price",
    "weekday",
    "category_l1_freq",
    "category_l1_purchase_rate",
    "category_l2_freq",
    "category_l2_purchase_rate",
    "session_events",
    "session_views",
    "session_carts",
    "session_removes",
    "session_purchases",
    "session_distinct_products",
    "product_views_in_session",
    "product_prev_carts_in_session",
    "session_age_seconds",
    "seconds_since_prev_event",
    "price_to_mean_view_price",
    "hour_of_day",
    "user_prev_sessions",
    "user_carts",
    "user_purchases",
    "user_purchase_rate",
    "user_days_since_first_seen",
];

/// The original stack's six features (its model was one stump over them).
pub const ORIGINAL_SIX: [usize; 6] = [
    col::BRAND_PURCHASE_RATE,
    col::PRICE,
    col::WEEKDAY,
    col::CATEGORY_L1_PURCHASE_RATE,
    col::CATEGORY_L2_PURCHASE_RATE,
    col::SESSION_EVENTS,
];

/// Marks a ratio or gap that has no value yet (first event, no viewed prices).
pub const NOT_AVAILABLE: f32 = -1.0;

/// One model input row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureRow(pub [f32; FEATURE_COUNT]);

/// The string keys a cart event is encoded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CategoricalKeys<'a> {
    pub brand: &'a str,
    pub category_l1: &'a str,
    pub category_l2: &'a str,
}

impl<'a> CategoricalKeys<'a> {
    pub fn of(event: &'a Event) -> Self {
        Self {
            brand: event.brand_key(),
            category_l1: event.category_l1(),
            category_l2: event.category_l2(),
        }
    }
}

impl FeatureRow {
    /// The complete row the model sees: state features plus encoded strings.
    pub fn build(
        session: Option<&SessionState>,
        user: Option<&UserState>,
        cart: &Event,
        tables: &EncodingTables,
    ) -> Self {
        let mut row = Self::from_state(session, user, cart);
        row.encode(CategoricalKeys::of(cart), tables);
        row
    }

    /// Every column except the encoded string columns, which stay 0 until
    /// [`FeatureRow::encode`]. The trainer needs the split because it learns
    /// the tables only after the replay has labelled the examples.
    pub fn from_state(
        session: Option<&SessionState>,
        user: Option<&UserState>,
        cart: &Event,
    ) -> Self {
        Self::from_facts(
            session.map(|s| s.facts(cart.product_id)),
            user.map(UserState::facts),
            cart,
        )
    }

    /// [`FeatureRow::from_state`] over facts, which the appliance reads from
    /// archived state without deserialising it.
    pub fn from_facts(
        session: Option<SessionFacts>,
        user: Option<UserFacts>,
        cart: &Event,
    ) -> Self {
        let t = cart.event_time;
        let session = session.filter(|s| s.is_live_at(t));
        let user = user.filter(|u| u.is_live_at(t));
        let mut f = [0f32; FEATURE_COUNT];

        f[col::PRICE] = cart.price as f32;
        f[col::WEEKDAY] = t.weekday() as f32;
        f[col::HOUR_OF_DAY] = t.hour() as f32;

        match session {
            Some(s) => {
                let product = s.product;
                f[col::SESSION_EVENTS] = (s.events + 1) as f32;
                f[col::SESSION_VIEWS] = s.views as f32;
                f[col::SESSION_CARTS] = (s.carts + 1) as f32;
                f[col::SESSION_REMOVES] = s.removes as f32;
                f[col::SESSION_PURCHASES] = s.purchases as f32;
                f[col::SESSION_DISTINCT_PRODUCTS] =
                    (s.distinct_products + u32::from(product.is_none())) as f32;
                f[col::PRODUCT_VIEWS_IN_SESSION] = product.map_or(0, |p| p.0) as f32;
                f[col::PRODUCT_PREV_CARTS_IN_SESSION] = product.map_or(0, |p| p.1) as f32;
                f[col::SESSION_AGE_SECONDS] = t.secs_since(s.started_at).max(0.0);
                f[col::SECONDS_SINCE_PREV_EVENT] = t.secs_since(s.last_event_at).max(0.0);
                f[col::PRICE_TO_MEAN_VIEW_PRICE] = match s.mean_view_price {
                    Some(mean) if mean > 0.0 => (cart.price / mean) as f32,
                    _ => NOT_AVAILABLE,
                };
            }
            None => {
                f[col::SESSION_EVENTS] = 1.0;
                f[col::SESSION_CARTS] = 1.0;
                f[col::SESSION_DISTINCT_PRODUCTS] = 1.0;
                f[col::SECONDS_SINCE_PREV_EVENT] = NOT_AVAILABLE;
                f[col::PRICE_TO_MEAN_VIEW_PRICE] = NOT_AVAILABLE;
            }
        }

        if let Some(u) = user {
            // The current session, when live, is already counted in `sessions`.
            f[col::USER_PREV_SESSIONS] =
                u.sessions.saturating_sub(u32::from(session.is_some())) as f32;
            f[col::USER_CARTS] = u.carts as f32;
            f[col::USER_PURCHASES] = u.purchases as f32;
            f[col::USER_DAYS_SINCE_FIRST_SEEN] = t.secs_since(u.first_seen_at).max(0.0) / 86_400.0;
        }
        let (carts, purchases) = user.map_or((0, 0), |u| (u.carts, u.purchases));
        f[col::USER_PURCHASE_RATE] = (purchases as f32 + 1.0) / (carts as f32 + 2.0);
        Self(f)
    }

    /// Fills the encoded string columns from the learned tables.
    pub fn encode(&mut self, keys: CategoricalKeys<'_>, tables: &EncodingTables) {
        let f = &mut self.0;
        [f[col::BRAND_FREQ], f[col::BRAND_PURCHASE_RATE]] = tables.brand.lookup(keys.brand);
        [f[col::CATEGORY_L1_FREQ], f[col::CATEGORY_L1_PURCHASE_RATE]] =
            tables.category_l1.lookup(keys.category_l1);
        [f[col::CATEGORY_L2_FREQ], f[col::CATEGORY_L2_PURCHASE_RATE]] =
            tables.category_l2.lookup(keys.category_l2);
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// `(name, value)` pairs for explanations and offline output.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, f32)> + '_ {
        FEATURE_NAMES.iter().copied().zip(self.0.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::state::apply;
    use crate::time::Timestamp;

    fn event(secs: i64, kind: EventType, product: u64, price: f64) -> Event {
        Event {
            event_time: Timestamp::from_secs(1_569_888_000 + secs),
            event_type: kind,
            product_id: product,
            category_id: 1,
            category_code: Some("appliances.kitchen.washer".into()),
            brand: Some("acme".into()),
            price,
            user_id: 7,
            user_session: "s".into(),
        }
    }

    #[test]
    fn names_match_columns() {
        assert_eq!(FEATURE_NAMES.len(), FEATURE_COUNT);
        assert_eq!(
            FEATURE_NAMES[col::USER_DAYS_SINCE_FIRST_SEEN],
            "user_days_since_first_seen"
        );
        assert_eq!(FEATURE_NAMES[col::HOUR_OF_DAY], "hour_of_day");
        let mut sorted = FEATURE_NAMES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), FEATURE_COUNT);
    }

    #[test]
    fn cart_on_unknown_session() {
        let row = FeatureRow::from_state(None, None, &event(0, EventType::Cart, 1, 50.0));
        assert_eq!(row.0[col::SESSION_EVENTS], 1.0);
        assert_eq!(row.0[col::SESSION_CARTS], 1.0);
        assert_eq!(row.0[col::SECONDS_SINCE_PREV_EVENT], NOT_AVAILABLE);
        assert_eq!(row.0[col::USER_PURCHASE_RATE], 0.5);
        assert_eq!(row.0[col::WEEKDAY], 1.0);
    }

    #[test]
    fn point_in_time_session_features() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        for e in [
            event(0, EventType::View, 1, 10.0),
            event(10, EventType::View, 2, 30.0),
            event(20, EventType::View, 1, 10.0),
        ] {
            apply(&mut s, &mut u, &e);
        }
        let cart = event(50, EventType::Cart, 1, 10.0);
        let row = FeatureRow::from_state(Some(&s), Some(&u), &cart);
        assert_eq!(row.0[col::SESSION_EVENTS], 4.0);
        assert_eq!(row.0[col::SESSION_VIEWS], 3.0);
        assert_eq!(row.0[col::PRODUCT_VIEWS_IN_SESSION], 2.0);
        assert_eq!(row.0[col::PRODUCT_PREV_CARTS_IN_SESSION], 0.0);
        assert_eq!(row.0[col::SESSION_DISTINCT_PRODUCTS], 2.0);
        assert_eq!(row.0[col::SESSION_AGE_SECONDS], 50.0);
        assert_eq!(row.0[col::SECONDS_SINCE_PREV_EVENT], 30.0);
        assert!((row.0[col::PRICE_TO_MEAN_VIEW_PRICE] - 10.0 / (50.0 / 3.0)).abs() < 1e-6);
        assert_eq!(row.0[col::USER_PREV_SESSIONS], 0.0);

        // Applying the cart and a later purchase changes the state; the row
        // built before them must not be reproducible from the later state.
        apply(&mut s, &mut u, &cart);
        apply(&mut s, &mut u, &event(60, EventType::Purchase, 1, 10.0));
        assert_ne!(row, FeatureRow::from_state(Some(&s), Some(&u), &cart));
    }

    #[test]
    fn expired_session_is_new() {
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        apply(&mut s, &mut u, &event(0, EventType::View, 1, 10.0));
        let cart = event(
            crate::state::SESSION_IDLE_TIMEOUT_SECS + 1,
            EventType::Cart,
            1,
            10.0,
        );
        let row = FeatureRow::from_state(Some(&s), Some(&u), &cart);
        assert_eq!(row.0[col::SESSION_EVENTS], 1.0);
        assert_eq!(row.0[col::USER_PREV_SESSIONS], 1.0);
    }

    #[test]
    fn encoding_fills_string_columns() {
        let mut tables = EncodingTables::default();
        tables.brand.prior_rate = 0.25;
        tables
            .category_l2
            .values
            .insert("appliances.kitchen".into(), [0.5, 0.75]);
        let row = FeatureRow::build(None, None, &event(0, EventType::Cart, 1, 10.0), &tables);
        assert_eq!(row.0[col::BRAND_PURCHASE_RATE], 0.25);
        assert_eq!(row.0[col::CATEGORY_L2_FREQ], 0.5);
        assert_eq!(row.0[col::CATEGORY_L2_PURCHASE_RATE], 0.75);
    }
}
