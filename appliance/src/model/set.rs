//! What serves, as one value swapped atomically: the primary, the
//! challenger scoring beside it (shadow, and canary for a share of
//! sessions), and the previous primary kept for a rollback. A core reads the
//! whole set at once, so a promote never shows it a half-changed pair.

use std::sync::Arc;

use serde::Serialize;

use crate::model::serving::{FileIdentity, ServingModel};

/// The three places a bundle can hold, each a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// `model.dir`: the newest valid bundle answers.
    Primary,
    /// `model.shadow_dir`: the newest valid bundle scores beside the primary.
    Challenger,
    /// `<model.dir>/previous`: where a promote puts the primary it replaces,
    /// and where a rollback takes it back from.
    Rollback,
}

impl Slot {
    pub const ALL: [Slot; 3] = [Self::Primary, Self::Challenger, Self::Rollback];

    pub fn label(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Challenger => "challenger",
            Self::Rollback => "rollback",
        }
    }
}

/// A verified model and the file it is in now (a promote moves the file,
/// not the model).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub model: Arc<ServingModel>,
    pub file: FileIdentity,
}

/// Which model answers a cart, and which scores it beside.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub served: &'a ServingModel,
    /// The other model of the pair: the challenger, or the primary when the
    /// challenger answers (canary).
    pub paired: Option<&'a ServingModel>,
    /// The challenger answers this cart.
    pub canary: bool,
}

#[derive(Debug, Default, Clone)]
pub struct ModelSet {
    pub primary: Option<Loaded>,
    pub challenger: Option<Loaded>,
    pub rollback: Option<Loaded>,
    /// Share of sessions the challenger answers (`model.canary_share`).
    pub canary_share: f64,
}

impl ModelSet {
    pub fn primary(&self) -> Option<&ServingModel> {
        self.primary.as_ref().map(|l| &*l.model)
    }

    pub fn challenger(&self) -> Option<&ServingModel> {
        self.challenger.as_ref().map(|l| &*l.model)
    }

    pub fn slot(&self, slot: Slot) -> Option<&Loaded> {
        match slot {
            Slot::Primary => self.primary.as_ref(),
            Slot::Challenger => self.challenger.as_ref(),
            Slot::Rollback => self.rollback.as_ref(),
        }
    }

    pub fn slot_mut(&mut self, slot: Slot) -> &mut Option<Loaded> {
        match slot {
            Slot::Primary => &mut self.primary,
            Slot::Challenger => &mut self.challenger,
            Slot::Rollback => &mut self.rollback,
        }
    }

    /// Who answers the carts of `session`, `None` without a primary. A
    /// canary session is chosen by a stable hash of its id, so it stays on
    /// the challenger for its whole life (and across restarts).
    #[inline]
    pub fn route(&self, session: &str) -> Option<Route<'_>> {
        let primary = self.primary()?;
        let Some(challenger) = self.challenger() else {
            return Some(Route {
                served: primary,
                paired: None,
                canary: false,
            });
        };
        let canary = self.canary_share > 0.0 && in_canary(session, self.canary_share);
        Some(if canary {
            Route {
                served: challenger,
                paired: Some(primary),
                canary: true,
            }
        } else {
            Route {
                served: primary,
                paired: Some(challenger),
                canary: false,
            }
        })
    }
}

/// A session's place in [0, 1): FNV-1a over its id, then a 64-bit finaliser
/// (splitmix64's) so that ids differing in one character spread evenly.
/// Fixed forever: changing it would move live sessions between models.
pub fn session_point(session: &str) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in session.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    // The top 53 bits: exactly representable in an f64.
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// The session is among the `share` answered by the challenger.
pub fn in_canary(session: &str, share: f64) -> bool {
    session_point(session) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canary_share_is_met_and_a_session_keeps_its_side() {
        let sessions: Vec<String> = (0..20_000)
            .map(|i| format!("8187d148-3c41-46d4-b0c0-{i:012x}"))
            .collect();
        for share in [0.05, 0.25, 0.5] {
            let canary = sessions.iter().filter(|s| in_canary(s, share)).count();
            let observed = canary as f64 / sessions.len() as f64;
            assert!((observed - share).abs() < 0.015, "{share}: {observed}");
        }
        // Stable: the same answer every time, and a larger share keeps
        // every session a smaller one had.
        for s in &sessions[..500] {
            assert_eq!(in_canary(s, 0.3), in_canary(s, 0.3));
            if in_canary(s, 0.1) {
                assert!(in_canary(s, 0.2));
            }
        }
        assert!(!in_canary("any", 0.0));
        assert!(in_canary("any", 1.0));
        // Pinned: these must never move (a live session would change model).
        assert_eq!(session_point(""), session_point(""));
        let pinned = session_point("8187d148-3c41-46d4-b0c0-9c08cd9dc564");
        assert!((0.0..1.0).contains(&pinned));
        assert_eq!(pinned.to_bits(), PINNED.to_bits(), "{pinned}");
    }

    const PINNED: f64 = 0.982_571_432_220_576;
}
