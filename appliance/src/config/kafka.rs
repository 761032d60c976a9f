//! `[kafka]`: the event stream. Without brokers the appliance takes events
//! over `POST /v1/events` only (the embedded default).

use std::collections::BTreeMap;
use std::num::{NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// Most messages one batch may hold: the consumer tags each output record
/// with its index in the batch in 20 bits.
pub const MAX_BATCH_EVENTS: usize = 1 << 20;

/// Settings the consumer manages itself; `kafka.properties` may not set them.
pub const MANAGED_PROPERTIES: [&str; 6] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "statistics.interval.ms",
];

/// How an appliance divides the stream with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaMode {
    /// Consume every partition of the topics (no group membership): each
    /// appliance holds every session. Restarts resume at once.
    Replica,
    /// Join the consumer group and take the partitions it assigns: sessions
    /// are split between the group's appliances. Set `group.instance.id` in
    /// `kafka.properties` so a restart keeps its partitions.
    Shard,
}

/// The property that names a shard: its member id in the group and in
/// `kafka.members_topic`.
pub const INSTANCE_ID: &str = "group.instance.id";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`; empty = no Kafka.
    pub brokers: String,
    pub mode: KafkaMode,
    /// Consumer group: the group shards share; for replicas, the name their
    /// offsets are committed under (give each replica its own).
    pub group_id: String,
    /// Topics of raw events (flat JSON, JsonConverter envelopes or Debezium
    /// ExtractNewRecordState rows).
    pub topics: Vec<String>,
    /// Valid events are produced here, normalised, when `forward_validated`.
    pub validated_topic: String,
    pub forward_validated: bool,
    /// Invalid messages are produced here with the reason and original bytes.
    pub invalid_topic: String,
    /// Produce every scored cart to `predictions_topic` and every resolved
    /// outcome to `outcomes_topic` (JSON, at least once), for a warehouse.
    pub prediction_log: bool,
    pub predictions_topic: String,
    pub outcomes_topic: String,
    /// Most messages per write transaction.
    pub batch_max_events: NonZeroUsize,
    /// Longest a message waits for its batch to fill before it is applied.
    pub batch_max_ms: NonZeroU64,
    /// The stream counts as stale when the store has not held everything the
    /// broker had for this long.
    pub stale_after_ms: u64,
    /// A stale stream makes /readyz answer 503 (otherwise it only says so).
    pub unready_when_stale: bool,
    /// Shards publish their address and partitions here (compacted, keyed
    /// by member) and read the others'.
    pub members_topic: String,
    /// The JSON API address other shards and callers are sent to (default:
    /// `http.listen`).
    pub advertise_http: Option<String>,
    /// The binary-protocol address they are sent to (default: `tcp.listen`).
    pub advertise_tcp: Option<String>,
    /// Extra librdkafka settings for both clients (security, timeouts…).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            mode: KafkaMode::Replica,
            group_id: "cartscore".into(),
            topics: vec![
                "tracking.raw_user_behavior".into(),
                "tracking_postgres_cdc.public.events".into(),
            ],
            validated_topic: "tracking.user_behavior.validated".into(),
            forward_validated: false,
            invalid_topic: "tracking.user_behavior.invalid".into(),
            prediction_log: true,
            predictions_topic: "cartscore.predictions".into(),
            outcomes_topic: "cartscore.outcomes".into(),
            batch_max_events: nonzero!(5_000),
            batch_max_ms: nonzero!(5),
            stale_after_ms: 10_000,
            unready_when_stale: false,
            members_topic: "cartscore.members".into(),
            advertise_http: None,
            advertise_tcp: None,
            properties: BTreeMap::new(),
        }
    }
}

/// Kafka's rule for topic names.
fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

const TOPIC_RULE: &str = "a topic name is 1 to 249 of [a-zA-Z0-9._-]";

impl KafkaConfig {
    pub fn enabled(&self) -> bool {
        !self.brokers.is_empty()
    }

    pub fn logs_predictions(&self) -> bool {
        self.enabled() && self.prediction_log
    }

    /// Checked only with brokers set: without them the section is inert.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.group_id.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.group_id",
                "\"\"",
                "must not be empty",
            ));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.topics",
                "[]",
                "name at least one topic",
            ));
        }
        if let Some(topic) = self.topics.iter().find(|t| !valid_topic(t)) {
            return Err(ConfigError::invalid("kafka.topics", topic, TOPIC_RULE));
        }
        for (field, topic) in [
            ("kafka.validated_topic", &self.validated_topic),
            ("kafka.invalid_topic", &self.invalid_topic),
            ("kafka.predictions_topic", &self.predictions_topic),
            ("kafka.outcomes_topic", &self.outcomes_topic),
        ] {
            if !valid_topic(topic) {
                return Err(ConfigError::invalid(field, topic, TOPIC_RULE));
            }
            if self.topics.contains(topic) {
                return Err(ConfigError::invalid(
                    field,
                    topic,
                    "is also consumed (kafka.topics): its records would loop back",
                ));
            }
        }
        if self.batch_max_events.get() > MAX_BATCH_EVENTS {
            return Err(ConfigError::invalid(
                "kafka.batch_max_events",
                self.batch_max_events,
                "must be at most 1048576",
            ));
        }
        if self.mode == KafkaMode::Shard {
            self.validate_shard()?;
        }
        if let Some(key) = self
            .properties
            .keys()
            .find(|key| MANAGED_PROPERTIES.contains(&key.as_str()))
        {
            return Err(ConfigError::invalid(
                "kafka.properties",
                key,
                "is set by the appliance itself (offsets live in the store)",
            ));
        }
        Ok(())
    }
}

impl KafkaConfig {
    /// What a shard needs: a stable name, a membership topic apart from the
    /// consumed ones, and the eager `range` assignor, which gives a member
    /// the same partition numbers of every co-partitioned topic.
    fn validate_shard(&self) -> Result<(), ConfigError> {
        match self.properties.get(INSTANCE_ID) {
            Some(id) if !id.is_empty() => {}
            _ => {
                return Err(ConfigError::invalid(
                    "kafka.properties",
                    INSTANCE_ID,
                    "must be set in shard mode: it names the shard in the group and in kafka.members_topic, and keeps its partitions across a restart",
                ));
            }
        }
        if !valid_topic(&self.members_topic) {
            return Err(ConfigError::invalid(
                "kafka.members_topic",
                &self.members_topic,
                TOPIC_RULE,
            ));
        }
        if self.topics.contains(&self.members_topic) {
            return Err(ConfigError::invalid(
                "kafka.members_topic",
                &self.members_topic,
                "is also consumed (kafka.topics)",
            ));
        }
        if let Some(strategy) = self.properties.get("partition.assignment.strategy") {
            return Err(ConfigError::invalid(
                "kafka.properties",
                format!("partition.assignment.strategy={strategy}"),
                "shards use range, which keeps a user's partition of every topic on one shard",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;

    #[test]
    fn kafka_settings_are_checked_only_when_enabled() {
        // Without brokers the section is inert.
        assert!(load("[kafka]\ntopics = []\n").is_ok());
        let on = "[kafka]\nbrokers = \"127.0.0.1:9092\"\n";
        assert!(load(on).is_ok());
        let err = load(&format!("{on}topics = []\n")).unwrap_err();
        assert!(err.contains("kafka.topics"), "{err}");
        let err = load(&format!("{on}topics = [\"bad topic\"]\n")).unwrap_err();
        assert!(err.contains("kafka.topics (bad topic)"), "{err}");
        let err = load(&format!(
            "{on}invalid_topic = \"tracking.raw_user_behavior\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("kafka.invalid_topic") && err.contains("loop"),
            "{err}"
        );
        let err = load(&format!(
            "{on}[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("kafka.properties (enable.auto.commit)"),
            "{err}"
        );
        let err = load(&format!("{on}mode = \"sideways\"\n")).unwrap_err();
        assert!(err.contains("sideways"), "{err}");
        let shard = format!("{on}mode = \"shard\"\n");
        let err = load(&shard).unwrap_err();
        assert!(err.contains("group.instance.id"), "{err}");
        let named = format!("{shard}[kafka.properties]\n\"group.instance.id\" = \"a\"\n");
        assert!(load(&named).is_ok());
        let err = load(&format!(
            "{named}\"partition.assignment.strategy\" = \"roundrobin\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("range"), "{err}");
        let err = load(&format!(
            "{on}outcomes_topic = \"tracking_postgres_cdc.public.events\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("kafka.outcomes_topic") && err.contains("loop"),
            "{err}"
        );
        let err = load(&format!("{on}batch_max_events = 2000000\n")).unwrap_err();
        assert!(err.contains("kafka.batch_max_events (2000000)"), "{err}");
    }
}
