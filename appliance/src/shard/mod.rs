//! Who owns which user, in `kafka.mode = shard`. Producers key every event
//! by its `user_id` (`cartscore_core::shard`), so the consumer group's
//! partitions divide users, and their sessions with them, between the
//! shards. Each shard publishes its address and its partitions to the
//! compacted `kafka.members_topic` whenever it is assigned some (the
//! stream's `members` module) and follows what the others publish, so any shard can say
//! who owns a user: a score for a user another shard owns is answered with
//! the owner (HTTP 421, the binary protocol's `NotOwner`), never from a
//! store that lacks the state.
//!
//! A claim is the newest record naming a partition: a killed shard's record
//! stays in the topic until its partitions are claimed again by whoever the
//! group gives them to.

use std::collections::{BTreeSet, HashMap};
use std::sync::{PoisonError, RwLock};

use cartscore_core::shard::partition_of_user;
use serde::{Deserialize, Serialize};

use crate::ops::metrics::Metrics;

/// One shard, as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The shard's `group.instance.id`: stable across its restarts.
    pub member: String,
    /// Where its JSON API answers (`host:port`).
    pub http: String,
    /// Where its binary protocol answers, when it serves one.
    pub tcp: Option<String>,
}

/// A `kafka.members_topic` record (keyed by the member id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    #[serde(flatten)]
    pub member: Member,
    /// Partitions per topic (the consumed topics are co-partitioned).
    pub partitions: u32,
    /// Partition numbers this shard was assigned, in every consumed topic.
    pub owned: Vec<u32>,
    /// When the assignment was made (ms since the epoch): the newest claim
    /// of a partition wins.
    pub claimed_at_ms: i64,
}

/// Who answers for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This shard: its store holds the user.
    Me,
    /// Another shard.
    Other {
        member: Member,
        partition: u32,
        partitions: u32,
    },
    /// Nobody has claimed the partition yet (the group is rebalancing), or
    /// the partition count is not known yet.
    Unknown { partition: Option<u32> },
}

#[derive(Debug, Default)]
struct View {
    partitions: u32,
    mine: BTreeSet<u32>,
    mine_at_ms: i64,
    /// The latest record of every other member.
    others: HashMap<String, MemberRecord>,
}

/// The shared view of the group's ownership.
#[derive(Debug)]
pub struct Ownership {
    me: Member,
    view: RwLock<View>,
}

impl Ownership {
    pub fn new(me: Member) -> Self {
        Self {
            me,
            view: RwLock::default(),
        }
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Records this shard's new assignment and returns what to publish.
    pub fn claim(
        &self,
        partitions: u32,
        mine: BTreeSet<u32>,
        now_ms: i64,
        metrics: &Metrics,
    ) -> MemberRecord {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        view.partitions = partitions;
        view.mine_at_ms = now_ms;
        metrics.shard.owned_partitions.set(mine.len() as i64);
        let record = MemberRecord {
            member: self.me.clone(),
            partitions,
            owned: mine.iter().copied().collect(),
            claimed_at_ms: now_ms,
        };
        view.mine = mine;
        record
    }

    /// Takes another member's record (this shard's own are skipped: its
    /// assignment is known first-hand).
    pub fn observe(&self, record: MemberRecord, metrics: &Metrics) {
        if record.member.member == self.me.member {
            return;
        }
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        if view.partitions == 0 {
            view.partitions = record.partitions;
        }
        view.others.insert(record.member.member.clone(), record);
        metrics.shard.members.set(view.others.len() as i64 + 1);
    }

    /// Forgets a member that left (a tombstone in the topic).
    pub fn forget(&self, member: &str, metrics: &Metrics) {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        view.others.remove(member);
        metrics.shard.members.set(view.others.len() as i64 + 1);
    }

    /// Whether this shard's store is the one for partition `partition`.
    pub fn owns_partition(&self, partition: u32) -> bool {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        view.mine.contains(&partition)
    }

    /// Whether this shard holds `user_id`, under its current assignment.
    pub fn owns_user(&self, user_id: u64) -> bool {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        view.partitions > 0
            && view
                .mine
                .contains(&partition_of_user(user_id, view.partitions))
    }

    pub fn owner_of(&self, user_id: u64) -> Owner {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        if view.partitions == 0 {
            return Owner::Unknown { partition: None };
        }
        let partition = partition_of_user(user_id, view.partitions);
        if view.mine.contains(&partition) {
            return Owner::Me;
        }
        // The newest claim among the others: a killed shard's record names
        // its partitions until their new owner claims them.
        view.others
            .values()
            .filter(|r| r.partitions == view.partitions && r.owned.contains(&partition))
            .max_by_key(|r| r.claimed_at_ms)
            .map_or(
                Owner::Unknown {
                    partition: Some(partition),
                },
                |r| Owner::Other {
                    member: r.member.clone(),
                    partition,
                    partitions: view.partitions,
                },
            )
    }

    /// The whole map, as `GET /v1/shards` shows it.
    pub fn snapshot(&self) -> ShardMap {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let mut members = vec![MemberView {
            member: self.me.clone(),
            owned: view.mine.iter().copied().collect(),
            claimed_at_ms: view.mine_at_ms,
            this_shard: true,
        }];
        members.extend(view.others.values().map(|r| MemberView {
            member: r.member.clone(),
            owned: r.owned.clone(),
            claimed_at_ms: r.claimed_at_ms,
            this_shard: false,
        }));
        members.sort_by(|a, b| a.member.member.cmp(&b.member.member));
        ShardMap {
            partitions: view.partitions,
            members,
        }
    }
}

/// `GET /v1/shards`.
#[derive(Debug, Clone, Serialize)]
pub struct ShardMap {
    pub partitions: u32,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    #[serde(flatten)]
    pub member: Member,
    pub owned: Vec<u32>,
    pub claimed_at_ms: i64,
    pub this_shard: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            member: name.into(),
            http: format!("{name}:80"),
            tcp: Some(format!("{name}:81")),
        }
    }

    fn record(name: &str, owned: &[u32], at: i64) -> MemberRecord {
        MemberRecord {
            member: member(name),
            partitions: 6,
            owned: owned.to_vec(),
            claimed_at_ms: at,
        }
    }

    fn user_on(partition: u32) -> u64 {
        (0..)
            .find(|&u| partition_of_user(u, 6) == partition)
            .unwrap()
    }

    #[test]
    fn the_newest_claim_of_a_partition_wins() {
        let metrics = Metrics::new();
        let me = Ownership::new(member("a"));
        assert_eq!(me.owner_of(1), Owner::Unknown { partition: None });
        me.claim(6, BTreeSet::from([0, 1]), 100, &metrics);
        assert_eq!(me.owner_of(user_on(0)), Owner::Me);
        assert!(me.owns_user(user_on(1)) && !me.owns_user(user_on(2)));
        assert_eq!(
            me.owner_of(user_on(2)),
            Owner::Unknown { partition: Some(2) }
        );
        me.observe(record("b", &[2, 3], 150), &metrics);
        me.observe(record("c", &[4, 5], 160), &metrics);
        let Owner::Other {
            member, partition, ..
        } = me.owner_of(user_on(2))
        else {
            panic!("b owns 2");
        };
        assert_eq!((member.member.as_str(), partition), ("b", 2));
        // b is killed; c is given its partitions and says so.
        me.observe(record("c", &[2, 3, 4, 5], 200), &metrics);
        me.observe(record("b", &[2, 3], 150), &metrics);
        let Owner::Other { member, .. } = me.owner_of(user_on(3)) else {
            panic!("c owns 3");
        };
        assert_eq!(member.member, "c");
        // A shard's own records are known first-hand.
        me.observe(record("a", &[0, 1, 2, 3, 4, 5], 300), &metrics);
        assert!(!me.owns_user(user_on(4)));
        assert_eq!(me.snapshot().members.len(), 3);
    }
}
