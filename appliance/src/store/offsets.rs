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
    /// The last change-data-capture row applied from this partition: its
    /// source's commit LSN and its own LSN (`core::SourcePosition`). A row at
    /// or below it is a re-sent duplicate.
    SourceCommitLsn,
    SourceLsn,
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

/// The key suffix of each kind but `Applied` (which has none).
const SUFFIXES: [(OffsetKind, &str); 3] = [
    (OffsetKind::Delivered, "/delivered"),
    (OffsetKind::SourceCommitLsn, "/source_commit_lsn"),
    (OffsetKind::SourceLsn, "/source_lsn"),
];

impl StreamOffset {
    /// Its key in the `offsets` database.
    pub(super) fn key(&self) -> String {
        let suffix = SUFFIXES
            .iter()
            .find(|(kind, _)| *kind == self.kind)
            .map_or("", |(_, suffix)| suffix);
        format!("{}/{}{suffix}", self.topic, self.partition)
    }

    /// The position an `offsets` entry stands for; `None` for a key that is
    /// not one.
    pub(super) fn from_entry(key: &str, next_offset: i64) -> Option<Self> {
        let (key, kind) = SUFFIXES
            .iter()
            .find_map(|(kind, suffix)| Some((key.strip_suffix(suffix)?, *kind)))
            .unwrap_or((key, OffsetKind::Applied));
        let (topic, partition) = key.rsplit_once('/')?;
        Some(Self {
            topic: topic.into(),
            partition: partition.parse().ok()?,
            next_offset,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_its_key() {
        for kind in [
            OffsetKind::Applied,
            OffsetKind::Delivered,
            OffsetKind::SourceCommitLsn,
            OffsetKind::SourceLsn,
        ] {
            let offset = StreamOffset {
                topic: "tracking_postgres_cdc.public.events".into(),
                partition: 4,
                next_offset: 24_023_928,
                kind,
            };
            assert_eq!(
                StreamOffset::from_entry(&offset.key(), 24_023_928),
                Some(offset)
            );
        }
        assert_eq!(StreamOffset::from_entry("no-partition", 1), None);
    }
}
