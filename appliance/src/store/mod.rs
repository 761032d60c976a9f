//! Session and user state in LMDB. Values are rkyv archives read in place
//! (no deserialisation on the scoring path); the single writer applies
//! events through `core::state::apply` in batched write transactions that
//! also record the stream offsets they consumed.
//!
//! Databases:
//! - `sessions`: session id, 0xFF, user id (u64 BE) -> archived
//!   `SessionState` (a session is its user's; see [`keys`])
//! - `users`: user id (u64 BE) -> archived `UserState`
//! - `offsets`: `topic/partition` -> next offset to consume (i64 BE); see
//!   [`offsets`]
//! - `meta`: `watermark` -> latest event time applied (µs, i64 BE);
//!   `layout` -> the layout version (see [`migrate`]); `outcome_seq` -> the
//!   next outcome's
//! - `scored`: session key, product, cart time -> a scored cart's record;
//!   `outcomes`: sequence (u64 BE) -> a resolved outcome; see [`outcomes`]
//! - `predictions`: sequence (u64 BE) -> a scored cart the prediction log
//!   has not delivered; see [`log`]
//!
//! This file opens the store, applies batches and reads snapshots;
//! [`offsets`] holds the stream positions and [`sweep`] the expiry sweep,
//! the statistics and the digest.
//!
//! There is no expiry index: keeping one costs two more B-tree writes per
//! touched session and user on every batch, which halved ingest throughput.
//! Expiry is semantic instead (`core` treats a session idle past its timeout
//! as new, and scoring ignores it), so the sweeper is only garbage
//! collection: it walks each database in key order, a slice per transaction,
//! and deletes what is idle past its expiry at the current watermark.

mod codec;
mod db;
mod error;
mod inline;
mod keys;
mod log;
mod migrate;
mod offsets;
mod outcomes;
mod sweep;

pub use db::{AppliedBatch, Store, StoreReader};
pub use error::StoreError;
pub use inline::SessionText;
pub use log::{LogPositions, Prediction};
pub use offsets::{OffsetKind, StreamOffset};
pub use outcomes::{CartRecord, Outcome, PairedRecord, PairedScore};
pub use sweep::{PurgeOutcome, StoreDigest, StoreStats, SweepOutcome};

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU64, NonZeroUsize};
    use std::path::Path;

    use cartscore_core::state::apply;
    use cartscore_core::{Event, SessionKey, SessionState, Timestamp, UserState};

    use super::*;
    use crate::config::StoreConfig;
    use cartscore_core::EventType;

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            path: dir.join("lmdb"),
            map_size_mib: NonZeroU64::new(16).unwrap(),
            sweep_batch: NonZeroUsize::new(2).unwrap(),
            ..StoreConfig::default()
        }
    }

    fn key(user_session: &str, user_id: u64) -> SessionKey<'_> {
        SessionKey {
            user_id,
            user_session,
        }
    }

    fn event(secs: i64, session: &str, user: u64, kind: EventType) -> Event {
        Event {
            event_time: Timestamp::from_secs(1_569_888_000 + secs),
            event_type: kind,
            product_id: 5,
            category_id: 1,
            category_code: None,
            brand: None,
            price: 10.0,
            user_id: user,
            user_session: session.into(),
        }
    }

    #[test]
    fn applies_like_core_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let events = [
            event(0, "a", 1, EventType::View),
            event(5, "a", 1, EventType::Cart),
            event(7, "b", 2, EventType::View),
        ];
        let (mut s, mut u) = (SessionState::default(), UserState::default());
        for e in &events[..2] {
            apply(&mut s, &mut u, e);
        }
        {
            let store = Store::open(&config(dir.path())).unwrap();
            // Two transactions: state carries over between batches.
            store.apply(&events[..1], &[]).unwrap();
            let offset = StreamOffset {
                topic: "t".into(),
                partition: 3,
                next_offset: 42,
                kind: OffsetKind::Applied,
            };
            store
                .apply(&events[1..], std::slice::from_ref(&offset))
                .unwrap();
            assert_eq!(store.offsets().unwrap(), vec![offset]);
        }
        let store = Store::open(&config(dir.path())).unwrap();
        let reader = store.reader().unwrap();
        let archived = reader.session(key("a", 1)).unwrap().unwrap();
        assert_eq!(archived.facts(5), s.facts(5));
        assert_eq!(reader.user(1).unwrap().unwrap().facts(), u.facts());
        assert!(reader.session(key("zzz", 1)).unwrap().is_none());
        assert_eq!(
            reader.watermark().unwrap(),
            Some(Timestamp::from_secs(1_569_888_007))
        );
        let stats = store.stats().unwrap();
        assert_eq!((stats.sessions, stats.users), (2, 2));
    }

    #[test]
    fn sweeps_idle_sessions_by_event_time_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        let old: Vec<Event> = (0..5)
            .map(|i| event(i, &format!("old{i}"), 100, EventType::View))
            .collect();
        store.apply(&old, &[]).unwrap();
        // Touching old0 again keeps it; the watermark moves past the others'
        // expiry plus the allowed lateness.
        let later = 7_200 + 4 * 3600 + 10;
        store
            .apply(
                &[
                    event(later - 100, "old0", 100, EventType::View),
                    event(later, "new", 100, EventType::View),
                ],
                &[],
            )
            .unwrap();
        // Slices of 2 over 6 sessions: the third ends exactly at the last key,
        // so a fourth finds the end.
        let mut steps = Vec::new();
        loop {
            let step = store.sweep().unwrap();
            steps.push(step.sessions);
            if !step.more {
                break;
            }
        }
        assert_eq!(steps, vec![0, 2, 2, 0]);
        assert_eq!(store.sweep().unwrap().sessions, 0);
        let reader = store.reader().unwrap();
        assert!(reader.session(key("old0", 100)).unwrap().is_some());
        assert!(reader.session(key("new", 100)).unwrap().is_some());
        assert!(reader.session(key("old3", 100)).unwrap().is_none());
        assert_eq!(store.stats().unwrap().sessions, 2);
    }

    #[test]
    fn digest_depends_on_state_not_on_batching() {
        let events: Vec<Event> = (0..40)
            .map(|i| {
                event(
                    i,
                    &format!("s{}", i % 7),
                    1 + (i % 3) as u64,
                    EventType::View,
                )
            })
            .collect();
        let one = tempfile::tempdir().unwrap();
        let one = Store::open(&config(one.path())).unwrap();
        one.apply(&events, &[]).unwrap();
        let many = tempfile::tempdir().unwrap();
        let many = Store::open(&config(many.path())).unwrap();
        for chunk in events.chunks(3) {
            many.apply(chunk, &[]).unwrap();
        }
        assert_eq!(one.digest().unwrap(), many.digest().unwrap());
        // 7 session ids under 3 users: 21 sessions (a session is its user's).
        assert_eq!(one.digest().unwrap().live_sessions, 21);
        many.apply(&events[..1], &[]).unwrap();
        assert_ne!(one.digest().unwrap(), many.digest().unwrap());
    }

    #[test]
    fn one_session_id_under_two_users_is_two_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        store
            .apply(
                &[
                    event(0, "shared", 7, EventType::View),
                    event(1, "shared", 3, EventType::View),
                    event(2, "shared", 7, EventType::Cart),
                ],
                &[],
            )
            .unwrap();
        let reader = store.reader().unwrap();
        let found = reader.sessions_with_id("shared").unwrap();
        let users: Vec<(u64, u32)> = found
            .iter()
            .map(|(user, s)| (*user, s.events.to_native()))
            .collect();
        assert_eq!(users, [(3, 1), (7, 2)]);
        assert!(reader.sessions_with_id("share").unwrap().is_empty());
        // Each user started a session of their own.
        for user in [3, 7] {
            assert_eq!(reader.user(user).unwrap().unwrap().sessions, 1);
        }
    }

    #[test]
    fn digests_of_disjoint_stores_add_up_to_the_whole() {
        let events: Vec<Event> = (0..60)
            .map(|i| {
                event(
                    i,
                    &format!("s{}", i % 9),
                    1 + (i % 4) as u64,
                    EventType::View,
                )
            })
            .collect();
        let open = || {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&config(dir.path())).unwrap();
            (dir, store)
        };
        let (_a, whole) = open();
        whole.apply(&events, &[]).unwrap();
        // Split by user, as shards split the stream.
        let (_b, odd) = open();
        let (_c, even) = open();
        let (odd_events, even_events): (Vec<Event>, Vec<Event>) =
            events.iter().cloned().partition(|e| e.user_id % 2 == 1);
        odd.apply(&odd_events, &[]).unwrap();
        even.apply(&even_events, &[]).unwrap();
        let merged = odd
            .digest()
            .unwrap()
            .merge(&even.digest().unwrap())
            .unwrap();
        assert_eq!(merged, whole.digest().unwrap());
        // The same part twice is not the whole.
        let doubled = odd.digest().unwrap().merge(&odd.digest().unwrap()).unwrap();
        assert_ne!(doubled, whole.digest().unwrap());
    }

    #[test]
    fn a_purge_keeps_exactly_the_owned_partitions() {
        use cartscore_core::shard::partition_of_user;
        use std::collections::BTreeSet;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        let events: Vec<Event> = (0..40)
            .map(|i| event(i, &format!("s{i}"), 1000 + i as u64, EventType::View))
            .collect();
        let offsets: Vec<StreamOffset> = (0..6)
            .map(|partition| StreamOffset {
                topic: "t".into(),
                partition,
                next_offset: 10,
                kind: OffsetKind::Applied,
            })
            .collect();
        store.apply(&events, &offsets).unwrap();
        let owned = BTreeSet::from([1, 4]);
        let kept = |user: u64| owned.contains(&partition_of_user(user, 6));
        let keep = events.iter().filter(|e| kept(e.user_id)).count();
        assert!(keep > 0 && keep < events.len());
        let outcome = store.purge_unowned(6, &owned).unwrap();
        assert_eq!(
            (outcome.sessions, outcome.users, outcome.offsets),
            (events.len() - keep, events.len() - keep, 4)
        );
        let reader = store.reader().unwrap();
        for e in &events {
            let held = reader.session(SessionKey::of(e)).unwrap().is_some();
            assert_eq!(held, kept(e.user_id), "{}", e.user_id);
            assert_eq!(reader.user(e.user_id).unwrap().is_some(), kept(e.user_id));
        }
        let partitions: Vec<i32> = store
            .offsets()
            .unwrap()
            .iter()
            .map(|o| o.partition)
            .collect();
        assert_eq!(partitions, [1, 4]);
    }

    fn record(session: &str, user: u64, secs: i64, probability: f32) -> CartRecord {
        CartRecord {
            user_id: user,
            user_session: session.into(),
            product_id: 5,
            cart_time: Timestamp::from_secs(1_569_888_000 + secs),
            model_version: "v1",
            probability,
            features: [0.0; 25],
            scored_at_ms: 0,
            paired: None,
            canary: false,
        }
    }

    #[test]
    fn a_purchase_resolves_its_carts_positive_once_and_a_return_after_expiry_negative() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        // Two carts of product 5 scored, then ingested; the first twice.
        let records = [
            record("a", 1, 10, 0.9),
            record("a", 1, 10, 0.1),
            record("b", 2, 10, 0.2),
        ];
        let (applied, resolved) = store
            .apply_with(
                &[
                    event(0, "a", 1, EventType::View),
                    event(10, "a", 1, EventType::Cart),
                    event(10, "b", 2, EventType::Cart),
                ],
                &[],
                &records,
                None,
            )
            .unwrap();
        assert_eq!((applied.records_stored, resolved.len()), (2, 0));
        assert_eq!(store.pending_records().unwrap(), 2);
        // a buys product 5: its cart is positive, with the first record's score.
        let (_, resolved) = store
            .apply_with(&[event(60, "a", 1, EventType::Purchase)], &[], &[], None)
            .unwrap();
        assert_eq!(resolved.len(), 1);
        assert!(resolved[0].label && resolved[0].probability == 0.9);
        // A second purchase and the same cart scored again change nothing.
        let (applied, resolved) = store
            .apply_with(
                &[event(70, "a", 1, EventType::Purchase)],
                &[],
                &[record("a", 1, 10, 0.5)],
                None,
            )
            .unwrap();
        assert_eq!((applied.records_stored, resolved.len()), (0, 0));
        // b comes back after its session expired: its cart is negative.
        let (_, resolved) = store
            .apply_with(
                &[event(10 + 3 * 3600, "b", 2, EventType::View)],
                &[],
                &[],
                None,
            )
            .unwrap();
        assert_eq!(resolved.len(), 1);
        assert!(!resolved[0].label && resolved[0].user_session == "b");
        assert_eq!(store.pending_records().unwrap(), 0);
        // All of it survives a reopen.
        drop(store);
        let store = Store::open(&config(dir.path())).unwrap();
        let outcomes: Vec<bool> = store
            .recent_outcomes(10)
            .unwrap()
            .iter()
            .map(|(_, o)| o.label)
            .collect();
        assert_eq!(outcomes, [true, false]);
    }

    #[test]
    fn the_sweep_resolves_a_cart_negative_once_its_session_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        // Scored, never ingested, and a cart whose session just goes quiet.
        store
            .apply_with(
                &[event(0, "c", 3, EventType::Cart)],
                &[],
                &[record("c", 3, 0, 0.3), record("ghost", 4, 0, 0.4)],
                None,
            )
            .unwrap();
        // Within expiry plus lateness nothing is decided.
        store
            .apply_with(
                &[event(3 * 3600, "other", 9, EventType::View)],
                &[],
                &[],
                None,
            )
            .unwrap();
        let mut resolved = Vec::new();
        loop {
            let step = store.sweep().unwrap();
            resolved.extend(step.outcomes);
            if !step.more {
                break;
            }
        }
        assert!(resolved.is_empty(), "{resolved:?}");
        store
            .apply_with(
                &[event(7 * 3600, "other", 9, EventType::View)],
                &[],
                &[],
                None,
            )
            .unwrap();
        loop {
            let step = store.sweep().unwrap();
            resolved.extend(step.outcomes);
            if !step.more {
                break;
            }
        }
        let mut sessions: Vec<(String, bool)> = resolved
            .iter()
            .map(|o| (o.user_session.clone(), o.label))
            .collect();
        sessions.sort();
        assert_eq!(
            sessions,
            [("c".to_owned(), false), ("ghost".to_owned(), false)]
        );
        assert_eq!(store.pending_records().unwrap(), 0);
    }

    #[test]
    fn the_prediction_outbox_holds_new_records_until_delivered_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_scored_records: NonZeroUsize::new(3).unwrap(),
            ..config(dir.path())
        };
        let seqs = |store: &Store| -> Vec<(u64, String)> {
            let page = store.predictions_since(0, 100).unwrap();
            page.into_iter().map(|(s, p)| (s, p.user_session)).collect()
        };
        {
            let store = Store::open(&config).unwrap().with_prediction_log(true);
            // The same cart twice is one record, so one prediction.
            let records = [record("a", 1, 10, 0.9), record("a", 1, 10, 0.1)];
            store.apply_with(&[], &[], &records, None).unwrap();
            store
                .apply_with(&[], &[], &[record("b", 2, 10, 0.2)], None)
                .unwrap();
            assert_eq!(seqs(&store), [(0, "a".into()), (1, "b".into())]);
            let (_, first) = &store.predictions_since(0, 1).unwrap()[0];
            assert_eq!(first.probability, 0.9);
            assert_eq!(first.features(), Some(&[0.0; 25]));
            // Delivered below 1: the first goes, the position is kept.
            let delivered = LogPositions {
                predictions: 1,
                outcomes: 0,
            };
            store.apply_with(&[], &[], &[], Some(delivered)).unwrap();
            assert_eq!(seqs(&store), [(1, "b".into())]);
        }
        let store = Store::open(&config).unwrap().with_prediction_log(true);
        assert_eq!(
            store.log_delivered().unwrap(),
            LogPositions {
                predictions: 1,
                outcomes: 0
            }
        );
        // Past store.max_scored_records undelivered, the oldest go.
        store
            .apply_with(&[], &[], &[record("c", 3, 10, 0.3)], None)
            .unwrap();
        store
            .apply_with(&[], &[], &[record("d", 4, 10, 0.4)], None)
            .unwrap();
        assert_eq!(seqs(&store), [(1, "b".into()), (2, "c".into())]);
        // Without a log nothing is kept.
        drop(store);
        let store = Store::open(&config).unwrap();
        assert_eq!(seqs(&store).len(), 2);
    }

    #[test]
    fn carts_already_recorded_are_left_out_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        store
            .apply_with(&[], &[], &[record("a", 1, 10, 0.9)], None)
            .unwrap();
        // Only carts scored again: nothing is written.
        let (applied, _) = store
            .apply_with(&[], &[], &[record("a", 1, 10, 0.1)], None)
            .unwrap();
        assert_eq!(applied.records_stored, 0);
        let again = [
            record("a", 1, 10, 0.1),
            record("a", 1, 11, 0.2),
            record("b", 2, 10, 0.3),
        ];
        let (applied, _) = store.apply_with(&[], &[], &again, None).unwrap();
        assert_eq!(applied.records_stored, 2);
        assert_eq!(store.pending_records().unwrap(), 3);
    }

    #[test]
    fn a_folder_that_is_not_a_store_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        // Someone else's folder.
        std::fs::create_dir_all(&config.path).unwrap();
        std::fs::write(config.path.join("notes.txt"), b"mine").unwrap();
        let error = Store::open(&config).unwrap_err();
        assert!(matches!(error, StoreError::NotAStore { .. }), "{error}");
        assert!(error.to_string().contains("notes.txt"), "{error}");
        let names: Vec<_> = std::fs::read_dir(&config.path).unwrap().collect();
        assert_eq!(names.len(), 1, "nothing was added");
        // A data.mdb that is not LMDB's.
        std::fs::remove_file(config.path.join("notes.txt")).unwrap();
        let garbage = vec![0x5au8; 64 * 1024];
        std::fs::write(config.path.join("data.mdb"), &garbage).unwrap();
        let error = Store::open(&config).unwrap_err();
        assert!(matches!(error, StoreError::Open { .. }), "{error}");
        let after = std::fs::read(config.path.join("data.mdb")).unwrap();
        assert_eq!(
            after[..garbage.len()],
            garbage[..],
            "nothing was overwritten"
        );
    }

    #[test]
    fn a_store_of_a_newer_layout_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        {
            let store = Store::open(&config).unwrap();
            store
                .apply(&[event(0, "kept", 1, EventType::View)], &[])
                .unwrap();
            store
                .set_layout(super::migrate::LAYOUT_VERSION + 1)
                .unwrap();
        }
        let before = std::fs::read(config.path.join("data.mdb")).unwrap();
        let error = Store::open(&config).unwrap_err();
        assert!(matches!(error, StoreError::Layout { .. }), "{error}");
        assert!(error.to_string().contains("has layout 4"), "{error}");
        let after = std::fs::read(config.path.join("data.mdb")).unwrap();
        assert!(
            before == after,
            "a newer store was changed by an older build"
        );
    }

    #[test]
    fn the_map_is_reserved_on_disk_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let _store = Store::open(&config).unwrap();
        let meta = std::fs::metadata(config.path.join("data.mdb")).unwrap();
        use std::os::unix::fs::MetadataExt;
        // Allocated blocks (512 bytes each), not a sparse file.
        assert!(
            meta.blocks() * 512 >= 16 * 1024 * 1024,
            "{} blocks",
            meta.blocks()
        );
    }

    #[test]
    fn a_store_of_another_key_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        // Pretend an older build wrote it: sessions keyed by id alone.
        Store::open(&config).unwrap().set_layout(1).unwrap();
        let error = Store::open(&config).unwrap_err();
        assert!(
            matches!(error, StoreError::Layout { found: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("move it aside"), "{error}");
    }

    #[test]
    fn full_map_is_an_error_and_keeps_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            map_size_mib: NonZeroU64::MIN,
            ..config(dir.path())
        })
        .unwrap();
        store
            .apply(&[event(0, "kept", 1, EventType::View)], &[])
            .unwrap();
        let mut full = None;
        for round in 0..200 {
            let batch: Vec<Event> = (0..500)
                .map(|i| {
                    event(
                        1,
                        &format!("s{round}-{i}"),
                        round * 1000 + i,
                        EventType::View,
                    )
                })
                .collect();
            if let Err(e) = store.apply(&batch, &[]) {
                full = Some(e);
                break;
            }
        }
        assert!(
            matches!(full, Some(StoreError::MapFull { map_size_mib: 1 })),
            "{full:?}"
        );
        assert!(
            store
                .reader()
                .unwrap()
                .session(key("kept", 1))
                .unwrap()
                .is_some()
        );
    }
}
