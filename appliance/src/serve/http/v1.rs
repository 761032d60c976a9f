//! `/v1`: scoring one cart or a batch, ingesting events, the feature service
//! (a session's state and the features a cart would get) and the serving
//! model's status.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use cartscore_core::explain::{Reason, reasons};
use cartscore_core::features::col;
use cartscore_core::shap::Explanation;
use cartscore_core::state::{ArchivedSessionState, ArchivedUserState};
use cartscore_core::validate::MAX_SESSION_BYTES;
use cartscore_core::{
    Event, EventType, FEATURE_COUNT, FEATURE_NAMES, FeatureRow, SessionKey, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::{ApiError, ErrorBody};
use super::state::App;
use crate::error::{Code, ErrorCode};
use crate::ingest::EventSource;
use crate::model::CannotExplain;
use crate::ops::metrics::ApiLabels;
use crate::quality::records::ByName;
use crate::quality::records::outcome_record;
use crate::serve::score;
use crate::shard::ShardMap;
use cartscore_protocol::records::OutcomesPage;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreQuery {
    /// Add the feature values and each feature's TreeSHAP contribution.
    #[serde(default)]
    explain: bool,
    /// Add the other model's probability (with a challenger in place).
    #[serde(default)]
    shadow: bool,
}

#[derive(Debug, Deserialize)]
struct BatchProbe<'a> {
    #[serde(borrow, default)]
    events: Option<Vec<&'a RawValue>>,
}

/// f32 values in their shortest exact form: going through `serde_json::Value`
/// would widen them to f64 digits (0.39225027 -> 0.39225026965141296).
#[derive(Debug)]
pub struct Named(Vec<(&'static str, f32)>);

impl Serialize for Named {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Why the model gave this score: exact TreeSHAP in log-odds. The base
/// value plus every contribution is the raw score, the logit of the
/// probability.
#[derive(Debug, Serialize)]
pub struct ExplanationView {
    base_value: f64,
    raw_score: f64,
    /// Log-odds, by feature name.
    contributions: ByName<f64>,
    /// The features by |contribution|, largest first.
    reasons: Vec<Reason>,
}

impl ExplanationView {
    fn of(row: &FeatureRow, explanation: Explanation) -> Self {
        Self {
            base_value: explanation.base_value,
            raw_score: explanation.total(),
            reasons: reasons(&row.0, &explanation),
            contributions: ByName(explanation.contributions),
        }
    }
}

/// The other model's score of the cart (`shadow=true`).
#[derive(Debug, Serialize)]
pub struct PairedView<'a> {
    model_version: &'a str,
    probability: f32,
}

#[derive(Debug, Serialize)]
pub struct ScoreResult<'a> {
    probability: f32,
    session_known: bool,
    /// The model that answered.
    model_version: &'a str,
    /// The challenger answered (a canary session).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    canary: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<Named>,
    #[serde(skip_serializing_if = "Option::is_none")]
    explanation: Option<ExplanationView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<PairedView<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BatchItem<'a> {
    Scored(ScoreResult<'a>),
    Failed { error: ErrorBody },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ScoreAnswer<'a> {
    Single(ScoreResult<'a>),
    Batch {
        /// The primary's version (each result names the model that answered).
        model_version: &'a str,
        results: Vec<BatchItem<'a>>,
    },
}

fn score_result<'a>(
    answer: &score::Answer<'a>,
    query: &ScoreQuery,
    metrics: &crate::ops::metrics::Metrics,
) -> Result<ScoreResult<'a>, CannotExplain> {
    let scored = &answer.scored;
    let explanation = if query.explain {
        let explanation = answer.served.explain(&scored.row)?;
        metrics.challenger.explanations.inc();
        Some(ExplanationView::of(&scored.row, explanation))
    } else {
        None
    };
    Ok(ScoreResult {
        probability: scored.probability,
        session_known: scored.session_known,
        model_version: answer.served.version(),
        canary: answer.canary,
        features: query.explain.then(|| Named(scored.row.named().collect())),
        explanation,
        shadow: query
            .shadow
            .then_some(answer.paired)
            .flatten()
            .map(|(model, probability)| PairedView {
                model_version: model.version(),
                probability,
            }),
    })
}

fn failed(error: &dyn ErrorCode) -> BatchItem<'static> {
    BatchItem::Failed {
        error: ErrorBody::of(error),
    }
}

/// `POST /v1/score`: one cart event, or `{"events": […]}`.
pub async fn score(
    State(app): App,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::query(&e))?;
    let body = body.map_err(|e| ApiError::body(&e))?;
    // A struct also deserialises from a JSON array: refuse one here, so that
    // `[…]` is not taken for `{"events": […]}`.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            Code::MalformedJson,
            "a score request is a JSON object: a cart event, or {\"events\": [...]}",
        ));
    }
    let probe: BatchProbe<'_> = serde_json::from_slice(&body).map_err(|e| ApiError::json(&e))?;
    let set = app.models.set();
    let primary = set.primary().ok_or_else(ApiError::no_model)?;
    let reader = app.store.reader()?;
    // The answer is encoded while this handler holds the models that scored it.
    let redirected = |error: &score::ScoreError| {
        if error.error_code() == Code::NotOwner {
            app.metrics
                .shard
                .redirects
                .get_or_create(&ApiLabels { api: "http" })
                .inc();
        }
    };
    let challenger = &app.metrics.challenger;
    let answer = match probe.events {
        None => {
            let event = Event::from_json(&body)?;
            let answer = score::answer(&set, &reader, app.ownership.as_deref(), &event, challenger)
                .inspect_err(redirected)?;
            app.recorder.record(|| score::record_of(&event, &answer));
            ScoreAnswer::Single(score_result(&answer, &query, &app.metrics)?)
        }
        Some(items) => {
            ApiError::check_batch(items.len(), app.config.max_batch.get())?;
            let events: Vec<_> = items
                .iter()
                .map(|raw| Event::from_json(raw.get().as_bytes()))
                .collect();
            let valid: Vec<&Event> = events.iter().filter_map(|e| e.as_ref().ok()).collect();
            // One model call per model for the whole batch.
            let mut answers =
                score::answer_batch(&set, &reader, app.ownership.as_deref(), &valid, challenger)
                    .into_iter();
            let results = events
                .iter()
                .map(|event| match event {
                    Err(e) => failed(e),
                    Ok(event) => match answers.next() {
                        Some(Ok(answer)) => {
                            app.recorder.record(|| score::record_of(event, &answer));
                            score_result(&answer, &query, &app.metrics)
                                .map_or_else(|e| failed(&e), BatchItem::Scored)
                        }
                        Some(Err(e)) => {
                            redirected(&e);
                            failed(&e)
                        }
                        None => failed(&score::ScoreError::NoModel),
                    },
                })
                .collect();
            ScoreAnswer::Batch {
                model_version: primary.version(),
                results,
            }
        }
    };
    Ok(Json(answer).into_response())
}

/// The raw items of an ingest body: a JSON array, or JSON lines.
fn ingest_items(body: &[u8]) -> Result<Vec<&[u8]>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| ApiError::json(&e))?;
        return Ok(items.into_iter().map(|r| r.get().as_bytes()).collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
        .collect())
}

/// An item of an ingest request that failed validation.
#[derive(Debug, Serialize)]
pub struct Rejected {
    index: usize,
    code: &'static str,
    field: Option<&'static str>,
    message: String,
}

#[derive(Debug, Serialize)]
pub struct Ingested {
    applied: usize,
    rejected: usize,
    errors: Vec<Rejected>,
}

/// `POST /v1/events`: a JSON array or JSON lines, applied in order in one
/// transaction; invalid items are reported and counted, valid ones applied.
pub async fn events(
    State(app): App,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ingested>, ApiError> {
    let body = body.map_err(|e| ApiError::body(&e))?;
    let items = ingest_items(&body)?;
    ApiError::check_batch(items.len(), app.config.max_ingest_events.get())?;
    let mut valid = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match Event::from_json(item) {
            Ok(event) => valid.push(event),
            Err(error) => {
                let code = error.error_code();
                app.metrics.event_invalid(EventSource::Http.label(), code);
                errors.push(Rejected {
                    index,
                    code: code.name(),
                    field: error.field().map(|f| f.name()),
                    message: error.to_string(),
                });
            }
        }
    }
    let applied = valid.len();
    if !valid.is_empty() {
        app.ingestor
            .apply(valid, Vec::new(), EventSource::Http)
            .await?;
    }
    Ok(Json(Ingested {
        applied,
        rejected: errors.len(),
        errors,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionQuery {
    /// Product of the hypothetical cart (default: one not in the session).
    product_id: Option<u64>,
    price: Option<f64>,
    /// Time of the hypothetical cart (default: the store's watermark).
    at: Option<String>,
    /// The session's user: needed only when the same session id is held
    /// for several users (each is a session of its own).
    user_id: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ProductActivity {
    product_id: u64,
    last_seen_at: String,
    views: u32,
    carts: u32,
    removes: u32,
    purchases: u32,
}

#[derive(Debug, Serialize)]
pub struct SessionView {
    user_id: u64,
    started_at: String,
    last_event_at: String,
    events: u32,
    views: u32,
    carts: u32,
    removes: u32,
    purchases: u32,
    distinct_products: u32,
    mean_view_price: Option<f64>,
    products: Vec<ProductActivity>,
}

impl SessionView {
    fn of(s: &ArchivedSessionState) -> Self {
        let facts = s.facts(0);
        Self {
            user_id: s.user_id.to_native(),
            started_at: facts.started_at.to_rfc3339(),
            last_event_at: facts.last_event_at.to_rfc3339(),
            events: facts.events,
            views: facts.views,
            carts: facts.carts,
            removes: facts.removes,
            purchases: facts.purchases,
            distinct_products: facts.distinct_products,
            mean_view_price: facts.mean_view_price,
            products: s
                .products
                .iter()
                .map(|p| ProductActivity {
                    product_id: p.product_id.to_native(),
                    last_seen_at: p.last_seen_at.get().to_rfc3339(),
                    views: p.views.to_native(),
                    carts: p.carts.to_native(),
                    removes: p.removes.to_native(),
                    purchases: p.purchases.to_native(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UserView {
    first_seen_at: String,
    last_event_at: String,
    sessions: u32,
    events: u32,
    views: u32,
    carts: u32,
    purchases: u32,
}

impl UserView {
    fn of(u: &ArchivedUserState) -> Self {
        let facts = u.facts();
        Self {
            first_seen_at: facts.first_seen_at.to_rfc3339(),
            last_event_at: facts.last_event_at.to_rfc3339(),
            sessions: facts.sessions,
            events: facts.events,
            views: u.views.to_native(),
            carts: facts.carts,
            purchases: facts.purchases,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionAnswer {
    session_id: String,
    live: bool,
    as_of: String,
    session: SessionView,
    user: Option<UserView>,
    features: Named,
    features_note: &'static str,
}

/// Columns that come from the cart's brand and category, not from state.
const ENCODED: [usize; 6] = [
    col::BRAND_FREQ,
    col::BRAND_PURCHASE_RATE,
    col::CATEGORY_L1_FREQ,
    col::CATEGORY_L1_PURCHASE_RATE,
    col::CATEGORY_L2_FREQ,
    col::CATEGORY_L2_PURCHASE_RATE,
];

/// `GET /v1/sessions/{id}`: the feature service.
pub async fn session(
    State(app): App,
    Path(id): Path<String>,
    query: Result<Query<SessionQuery>, QueryRejection>,
) -> Result<Json<SessionAnswer>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::query(&e))?;
    let reader = app.store.reader()?;
    // No valid event carries a longer id, and LMDB refuses over-long keys.
    let mut stored = match query.user_id {
        _ if id.len() > MAX_SESSION_BYTES => Vec::new(),
        Some(user_id) => reader
            .session(SessionKey {
                user_id,
                user_session: &id,
            })?
            .map(|s| (user_id, s))
            .into_iter()
            .collect(),
        None => reader.sessions_with_id(&id)?,
    };
    if stored.len() > 1 {
        let users: Vec<String> = stored.iter().map(|(user, _)| user.to_string()).collect();
        return Err(ApiError::new(
            Code::SessionAmbiguous,
            format!(
                "session {id:?} is held for users {}: each is a session of its own; pass ?user_id=",
                users.join(", ")
            ),
        ));
    }
    let Some((user_id, session)) = stored.pop() else {
        return Err(ApiError::new(
            Code::SessionNotFound,
            format!("no state for session {id:?} (never seen, or expired and swept)"),
        ));
    };
    let user = reader.user(user_id)?;
    let at = match &query.at {
        Some(text) => {
            Timestamp::parse(text).map_err(|e| ApiError::new(Code::BadQuery, e.to_string()))?
        }
        None => reader
            .watermark()?
            .unwrap_or_else(|| session.last_event_at.get()),
    };
    let product_id = query.product_id.unwrap_or(0);
    let cart = Event {
        event_time: at,
        event_type: EventType::Cart,
        product_id,
        category_id: 0,
        category_code: None,
        brand: None,
        price: query.price.unwrap_or(0.0),
        user_id,
        user_session: id.clone(),
    };
    let session_facts = session.facts(product_id);
    let row = FeatureRow::from_facts(Some(session_facts), user.map(|u| u.facts()), &cart);
    let features = Named(
        (0..FEATURE_COUNT)
            .filter(|c| !ENCODED.contains(c))
            .map(|c| (FEATURE_NAMES[c], row.0[c]))
            .collect(),
    );
    Ok(Json(SessionAnswer {
        live: session_facts.is_live_at(at),
        as_of: at.to_rfc3339(),
        session: SessionView::of(session),
        user: user.map(UserView::of),
        features,
        features_note: "values a cart of product_id at as_of would get; brand and category encodings depend on the cart and are left out",
        session_id: id,
    }))
}

/// `GET /v1/shards`: the group's members and their partitions, as this
/// shard knows them (404 outside `kafka.mode = shard`).
pub async fn shards(State(app): App) -> Result<Json<ShardMap>, ApiError> {
    let ownership = app.ownership.as_ref().ok_or_else(|| {
        ApiError::new(
            Code::NotFound,
            "this appliance is not a shard (kafka.mode = replica, or no Kafka)",
        )
    })?;
    Ok(Json(ownership.snapshot()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomesQuery {
    /// The first sequence number to return (the `next` of the last page).
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// Largest page of `GET /v1/outcomes`.
const MAX_OUTCOMES_PAGE: usize = 10_000;

/// `GET /v1/outcomes?since=&limit=`: the resolved outcomes the store holds,
/// in the order they were resolved.
pub async fn outcomes(
    State(app): App,
    query: Result<Query<OutcomesQuery>, QueryRejection>,
) -> Result<Json<OutcomesPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::query(&e))?;
    let limit = query.limit.unwrap_or(1_000).min(MAX_OUTCOMES_PAGE);
    let page = app.store.outcomes_since(query.since, limit)?;
    let next = page.last().map_or(query.since, |(seq, _)| seq + 1);
    let outcomes = page
        .into_iter()
        .map(|(seq, outcome)| outcome_record(seq, outcome))
        .collect();
    Ok(Json(OutcomesPage { outcomes, next }))
}
