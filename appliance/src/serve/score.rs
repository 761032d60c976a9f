//! The scoring path: state lookup, the shared feature code, the model. It
//! only reads the store; the event stream (or /v1/events) is the single
//! writer, so scoring a cart never changes what the next score sees.

use cartscore_core::features::CategoricalKeys;
use cartscore_core::{Event, EventType, FeatureRow, ModelError};
use thiserror::Error;

use crate::error::{Code, ErrorCode};
use crate::model::ServingModel;
use crate::store::{StoreError, StoreReader};

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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
}

impl ErrorCode for ScoreError {
    fn error_code(&self) -> Code {
        match self {
            Self::NotACart(_) => Code::NotACart,
            Self::Store(error) => error.error_code(),
            Self::Model(error) => error.error_code(),
        }
    }
}

/// The feature row the model sees for `cart`, from the stored state.
pub fn features(
    model: &ServingModel,
    reader: &StoreReader<'_>,
    cart: &Event,
) -> Result<(FeatureRow, bool), StoreError> {
    let session = reader
        .session(&cart.user_session)?
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
    cart: &Event,
) -> Result<Scored, ScoreError> {
    if cart.event_type != EventType::Cart {
        return Err(ScoreError::NotACart(cart.event_type.as_str()));
    }
    let (row, session_known) = features(model, reader, cart)?;
    let probability = model.predict(&row)?;
    Ok(Scored {
        probability,
        session_known,
        row,
    })
}
