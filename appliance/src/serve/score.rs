//! The scoring path: state lookup, the shared feature code, the model. It
//! only reads the store; the event stream (or /v1/events) is the single
//! writer, so scoring a cart never changes what the next score sees.
//!
//! With a challenger in place, [`answer`] scores every cart with both
//! models: the one that answers (the primary, or the challenger for a canary
//! session) first, then the other from the same state, its own encodings
//! applied to a copy of the row. The second score never changes the answer
//! and its failure never fails the request.

use cartscore_core::features::CategoricalKeys;
use cartscore_core::{Event, EventType, FeatureRow, ModelError, SessionKey};
use thiserror::Error;

use crate::error::{Code, ErrorCode};
use cartscore_protocol::Redirect;

use crate::model::{ModelSet, ServingModel};
use crate::ops::metrics::ChallengerMetrics;
use crate::shard::{Owner, Ownership};
use crate::store::{CartRecord, PairedRecord, SessionText, StoreError, StoreReader};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub probability: f32,
    /// The cart's session was in the store and live at the cart's time.
    pub session_known: bool,
    pub row: FeatureRow,
}

#[derive(Debug, Error)]
pub enum ScoreError {
    #[error("only add-to-cart events are scored; got event_type {0}")]
    NotACart(&'static str),
    #[error(
        "user {user_id} is held by shard {} (http {}, partition {} of {}); ask it",
        .owner.member, .owner.http, .owner.partition, .owner.partitions
    )]
    NotOwner { user_id: u64, owner: Redirect },
    #[error(
        "no shard has claimed the partition of user {user_id} yet (the group is rebalancing); retry shortly"
    )]
    OwnerUnknown { user_id: u64 },
    #[error("no model is loaded; see GET /v1/model")]
    NoModel,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
}

impl ErrorCode for ScoreError {
    fn error_code(&self) -> Code {
        match self {
            Self::NotACart(_) => Code::NotACart,
            Self::NotOwner { .. } => Code::NotOwner,
            Self::OwnerUnknown { .. } => Code::OwnerUnknown,
            Self::NoModel => Code::ModelUnavailable,
            Self::Store(error) => error.error_code(),
            Self::Model(error) => error.error_code(),
        }
    }

    fn redirect(&self) -> Option<&Redirect> {
        match self {
            Self::NotOwner { owner, .. } => Some(owner),
            _ => None,
        }
    }
}

/// In shard mode, refuses a cart whose user another shard holds: this
/// store lacks that user's state, so a score from it would be wrong.
pub fn check_owner(ownership: Option<&Ownership>, user_id: u64) -> Result<(), ScoreError> {
    let Some(ownership) = ownership else {
        return Ok(());
    };
    match ownership.owner_of(user_id) {
        Owner::Me => Ok(()),
        Owner::Other {
            member,
            partition,
            partitions,
        } => Err(ScoreError::NotOwner {
            user_id,
            owner: Redirect {
                member: member.member,
                http: member.http,
                tcp: member.tcp,
                partition,
                partitions,
            },
        }),
        Owner::Unknown { .. } => Err(ScoreError::OwnerUnknown { user_id }),
    }
}

/// The feature row the model sees for `cart`, from the stored state.
pub fn features(
    model: &ServingModel,
    reader: &StoreReader<'_>,
    cart: &Event,
) -> Result<(FeatureRow, bool), StoreError> {
    let session = reader
        .session(SessionKey::of(cart))?
        .map(|s| s.facts(cart.product_id));
    let user = reader.user(cart.user_id)?.map(|u| u.facts());
    let session_known = session.is_some_and(|s| s.is_live_at(cart.event_time));
    let mut row = FeatureRow::from_facts(session, user, cart);
    model.encode(&mut row, CategoricalKeys::of(cart));
    Ok((row, session_known))
}

pub fn score(
    model: &ServingModel,
    reader: &StoreReader<'_>,
    ownership: Option<&Ownership>,
    cart: &Event,
) -> Result<Scored, ScoreError> {
    if cart.event_type != EventType::Cart {
        return Err(ScoreError::NotACart(cart.event_type.as_str()));
    }
    check_owner(ownership, cart.user_id)?;
    let (row, session_known) = features(model, reader, cart)?;
    let probability = model.predict(&row)?;
    Ok(Scored {
        probability,
        session_known,
        row,
    })
}

/// A cart scored by the model that answers it, and by the other one.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'m> {
    pub scored: Scored,
    pub served: &'m ServingModel,
    /// The challenger answered (a canary session).
    pub canary: bool,
    /// The other model of the pair and its probability; `None` with one
    /// model, or when the second score failed (counted).
    pub paired: Option<(&'m ServingModel, f32)>,
}

/// Scores `cart` with the model its session is routed to, then with the
/// other model of the pair, if any.
pub fn answer<'m>(
    set: &'m ModelSet,
    reader: &StoreReader<'_>,
    ownership: Option<&Ownership>,
    cart: &Event,
    metrics: &ChallengerMetrics,
) -> Result<Answer<'m>, ScoreError> {
    let route = set.route(&cart.user_session).ok_or(ScoreError::NoModel)?;
    let scored = score(route.served, reader, ownership, cart)?;
    let paired = route.paired.and_then(|other| {
        let mut row = scored.row;
        other.encode(&mut row, CategoricalKeys::of(cart));
        match other.predict(&row) {
            Ok(probability) => {
                if route.canary {
                    metrics.canary_scored.inc();
                } else {
                    metrics.shadow_scored.inc();
                }
                Some((other, probability))
            }
            Err(error) => {
                metrics.pair_failed.inc();
                tracing::debug!(%error, version = other.version(), "the second model failed; the answer stands");
                None
            }
        }
    });
    Ok(Answer {
        scored,
        served: route.served,
        canary: route.canary,
        paired,
    })
}

/// A cart whose features are built, waiting for its model's batch.
struct Pending<'m> {
    index: usize,
    route: crate::model::Route<'m>,
    row: FeatureRow,
    session_known: bool,
}

/// Scores the carts `carts` (each as [`answer`] would) with one model call
/// per model for the whole batch: the compiled evaluator walks several
/// rows at once, to the same bits as one by one. Answers come back in the
/// carts' order.
pub fn answer_batch<'m>(
    set: &'m ModelSet,
    reader: &StoreReader<'_>,
    ownership: Option<&Ownership>,
    carts: &[&Event],
    metrics: &ChallengerMetrics,
) -> Vec<Result<Answer<'m>, ScoreError>> {
    let mut out: Vec<Option<Result<Answer<'m>, ScoreError>>> = Vec::with_capacity(carts.len());
    let mut pending = Vec::with_capacity(carts.len());
    for (index, cart) in carts.iter().enumerate() {
        let prepared = (|| {
            if cart.event_type != EventType::Cart {
                return Err(ScoreError::NotACart(cart.event_type.as_str()));
            }
            check_owner(ownership, cart.user_id)?;
            let route = set.route(&cart.user_session).ok_or(ScoreError::NoModel)?;
            let (row, session_known) = features(route.served, reader, cart)?;
            Ok(Pending {
                index,
                route,
                row,
                session_known,
            })
        })();
        match prepared {
            Ok(p) => {
                out.push(None);
                pending.push(p);
            }
            Err(error) => out.push(Some(Err(error))),
        }
    }
    // One batch per model that answers (the primary; the challenger for
    // canary sessions), then one per model that scores beside.
    let mut probabilities = vec![f32::NAN; pending.len()];
    let mut failed: Vec<Option<ModelError>> = (0..pending.len()).map(|_| None).collect();
    for canary in [false, true] {
        let members: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].route.canary == canary)
            .collect();
        let Some(&first) = members.first() else {
            continue;
        };
        let model = pending[first].route.served;
        let rows: Vec<f32> = members.iter().flat_map(|&i| pending[i].row.0).collect();
        match model.predict_batch(&rows) {
            Ok(scores) => {
                for (&i, p) in members.iter().zip(scores) {
                    probabilities[i] = p;
                }
            }
            Err(error) => {
                // One failure answers every cart of the batch.
                let message = error.to_string();
                for &i in &members {
                    failed[i] = Some(ModelError::Run(message.clone()));
                }
            }
        }
    }
    let mut paired = vec![None; pending.len()];
    for canary in [false, true] {
        let members: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].route.canary == canary && pending[i].route.paired.is_some())
            .collect();
        let Some(other) = members.first().and_then(|&i| pending[i].route.paired) else {
            continue;
        };
        let rows: Vec<f32> = members
            .iter()
            .flat_map(|&i| {
                let mut row = pending[i].row;
                other.encode(&mut row, CategoricalKeys::of(carts[pending[i].index]));
                row.0
            })
            .collect();
        match other.predict_batch(&rows) {
            Ok(scores) => {
                let counter = if canary {
                    &metrics.canary_scored
                } else {
                    &metrics.shadow_scored
                };
                counter.inc_by(members.len() as u64);
                for (&i, p) in members.iter().zip(scores) {
                    paired[i] = Some((other, p));
                }
            }
            Err(error) => {
                metrics.pair_failed.inc_by(members.len() as u64);
                tracing::debug!(%error, version = other.version(), "the second model failed; the answers stand");
            }
        }
    }
    for (i, p) in pending.into_iter().enumerate() {
        out[p.index] = Some(match failed[i].take() {
            Some(error) => Err(ScoreError::Model(error)),
            None => Ok(Answer {
                scored: Scored {
                    probability: probabilities[i],
                    session_known: p.session_known,
                    row: p.row,
                },
                served: p.route.served,
                canary: p.route.canary,
                paired: paired[i],
            }),
        });
    }
    out.into_iter()
        .map(|a| a.unwrap_or(Err(ScoreError::NoModel)))
        .collect()
}

/// The record of a scored cart, for the closed loop (`store::outcomes`).
pub fn record_of(cart: &Event, answer: &Answer<'_>) -> CartRecord {
    CartRecord {
        user_id: cart.user_id,
        user_session: SessionText::new(&cart.user_session),
        product_id: cart.product_id,
        cart_time: cart.event_time,
        model_version: answer.served.static_version(),
        probability: answer.scored.probability,
        features: answer.scored.row.0,
        scored_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        paired: answer.paired.map(|(model, probability)| PairedRecord {
            model_version: model.static_version(),
            probability,
        }),
        canary: answer.canary,
    }
}
