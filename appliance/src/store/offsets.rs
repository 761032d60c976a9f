//! Stream positions, stored in the `offsets` database in the same write
//! transaction as the state they produced: `topic/partition` for the next
//! offset to apply, `topic/partition/delivered` for the next whose output
//! records the broker has acknowledged.

/// What a stored stream position stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetKind {
    /// Every message below it is in the state (written with that state).
    #[default]
    Applied,
    /// Every message below it had its output records (validated and invalid
    /// topics) acknowledged by the broker.
    Delivered,
}

/// A consumed position in the event stream; stored with the state it produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamOffset {
    pub topic: String,
    pub partition: i32,
    /// The next offset to consume.
    pub next_offset: i64,
    pub kind: OffsetKind,
}

const DELIVERED_SUFFIX: &str = "/delivered";

impl StreamOffset {
    /// Its key in the `offsets` database.
    pub(super) fn key(&self) -> String {
        match self.kind {
            OffsetKind::Applied => format!("{}/{}", self.topic, self.partition),
            OffsetKind::Delivered => {
                format!("{}/{}{DELIVERED_SUFFIX}", self.topic, self.partition)
            }
        }
    }

    /// The position an `offsets` entry stands for; `None` for a key that is
    /// not one.
    pub(super) fn from_entry(key: &str, next_offset: i64) -> Option<Self> {
        let (key, kind) = match key.strip_suffix(DELIVERED_SUFFIX) {
            Some(key) => (key, OffsetKind::Delivered),
            None => (key, OffsetKind::Applied),
        };
        let (topic, partition) = key.rsplit_once('/')?;
        Some(Self {
            topic: topic.into(),
            partition: partition.parse().ok()?,
            next_offset,
            kind,
        })
    }
}
