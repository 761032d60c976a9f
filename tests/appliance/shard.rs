//! Three shards in one consumer group over a 6-partition topic (nisshi on
//! PostgreSQL): they divide the users, answer for the others with the owner,
//! hand a killed shard's partitions to the survivors and back again after
//! its restart, and at the end hold between them exactly what one appliance
//! holds after one clean pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cartscore_core::Event;
use cartscore_core::shard::partition_of_user;
use cartscore_protocol::Status;
use cartscore_protocol::client::ShardedClient;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::broker::{Broker, create_topic, unique};
use crate::common::{Appliance, Options, cart_json, dataset, model_dir_with_demo};
use crate::stream::{inspect, replay, wait_until};

const PARTITIONS: u32 = 6;

struct Group {
    brokers: String,
    raw: String,
    members: String,
    group: String,
    models: PathBuf,
    work: PathBuf,
}

impl Group {
    fn env(&self, name: &str, mode: &str) -> Vec<(String, String)> {
        let config = self.work.join(format!("{name}.toml"));
        // Static membership: a restart within the session timeout keeps the
        // partitions; 6 s bounds how long a killed shard's stay unowned.
        std::fs::write(
            &config,
            format!(
                "[kafka.properties]\n\"group.instance.id\" = \"{name}\"\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n"
            ),
        )
        .unwrap();
        let mut env: Vec<(String, String)> = [
            ("CARTSCORE_KAFKA__BROKERS", self.brokers.clone()),
            ("CARTSCORE_KAFKA__MODE", mode.to_owned()),
            ("CARTSCORE_KAFKA__TOPICS", format!("[\"{}\"]", self.raw)),
            ("CARTSCORE_KAFKA__MEMBERS_TOPIC", self.members.clone()),
            (
                "CARTSCORE_KAFKA__INVALID_TOPIC",
                format!("{}-invalid", self.raw),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if mode == "shard" {
            env.push(("CARTSCORE_KAFKA__GROUP_ID".into(), self.group.clone()));
            env.push(("CARTSCORE_CONFIG".into(), config.display().to_string()));
        } else {
            env.push(("CARTSCORE_KAFKA__GROUP_ID".into(), unique("single")));
        }
        env
    }

    fn start(&self, name: &str) -> Appliance {
        let dir = self.work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Appliance::start(
            &dir,
            &self.models,
            &Options {
                env: self.env(name, "shard"),
                ..Options::default()
            },
        )
    }
}

/// The partitions `app` owns, as its `/v1/shards` says.
fn owned(app: &Appliance) -> BTreeSet<u32> {
    let (status, map) = app.get("/v1/shards");
    assert_eq!(status, 200, "{map}");
    map["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["this_shard"] == true)
        .map(|m| {
            m["owned"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap() as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// Next offset to apply per partition of `topic` in a store.
fn applied(store: &Path, topic: &str) -> BTreeMap<u32, i64> {
    inspect(store)["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["topic"] == topic && o["kind"] == "applied")
        .map(|o| {
            (
                o["partition"].as_u64().unwrap() as u32,
                o["next_offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Each partition's next offset on the broker now.
fn high_watermarks(brokers: &str, topic: &str) -> BTreeMap<u32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p as i32, Duration::from_secs(10))
                .unwrap();
            (p, high)
        })
        .collect()
}

/// True when `store` has applied every message of `partitions` below `marks`.
fn caught_up(
    store: &Path,
    topic: &str,
    partitions: &BTreeSet<u32>,
    marks: &BTreeMap<u32, i64>,
) -> bool {
    let stored = applied(store, topic);
    partitions
        .iter()
        .all(|p| stored.get(p).copied().unwrap_or(0) >= marks[p])
}

/// The digest of a store as of event time `as_of` (µs).
fn inspect_at(store: &Path, as_of: i64) -> Value {
    let output = std::process::Command::new(crate::common::appliance_binary())
        .args([
            "inspect",
            "--as-of-micros",
            &as_of.to_string(),
            "--store-path",
        ])
        .arg(store)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(output.status.success(), "inspect failed: {output:?}");
    serde_json::from_slice::<Value>(&output.stdout).unwrap()["digest"].clone()
}

fn merge(digests: &[&Value]) -> (u64, u64, u128, u128) {
    let hex = |v: &Value| u128::from_str_radix(v.as_str().unwrap(), 16).unwrap();
    digests.iter().fold((0, 0, 0, 0), |acc, d| {
        (
            acc.0 + d["live_sessions"].as_u64().unwrap(),
            acc.1 + d["live_users"].as_u64().unwrap(),
            acc.2.wrapping_add(hex(&d["sessions_sum"])),
            acc.3.wrapping_add(hex(&d["users_sum"])),
        )
    })
}

/// A cart of `user` (JSON), a day after the slice's start.
fn cart_of(user: u64) -> String {
    cart_json("shard-probe", 86_400, 1_004_856, 130.76).replace("543272936", &user.to_string())
}

fn slice_users() -> Vec<u64> {
    let mut reader = csv::Reader::from_path(dataset()).unwrap();
    let users: BTreeSet<u64> = reader
        .records()
        // The slice's last line is cut short.
        .filter_map(Result::ok)
        .filter_map(|r| r.get(7)?.parse().ok())
        .collect();
    users.into_iter().collect()
}

#[test]
fn three_shards_own_their_users_fail_over_and_add_up_to_one_clean_pass() {
    let brokers = Broker::shared().to_owned();
    let work = tempfile::tempdir().unwrap();
    let group = Group {
        raw: unique("shard-raw"),
        members: unique("members"),
        group: unique("shards"),
        models: model_dir_with_demo(work.path()),
        work: work.path().to_owned(),
        brokers: brokers.clone(),
    };
    create_topic(&brokers, &group.raw, PARTITIONS);
    create_topic(&brokers, &group.members, 1);
    create_topic(&brokers, &format!("{}-invalid", group.raw), 1);

    let mut shards: Vec<Appliance> = ["a", "b", "c"].iter().map(|n| group.start(n)).collect();
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();
    wait_until(
        "the group to divide six partitions",
        Duration::from_secs(60),
        || {
            let sets: Vec<BTreeSet<u32>> = shards.iter().map(owned).collect();
            sets.iter().all(|s| !s.is_empty())
                && sets.iter().map(BTreeSet::len).sum::<usize>() == PARTITIONS as usize
                && sets.iter().flatten().copied().collect::<BTreeSet<_>>() == all
        },
    );

    // Three passes over the real slice at 2,000 events/s (~26 s), keyed by user.
    let producer = {
        let (brokers, topic) = (brokers.clone(), group.raw.clone());
        std::thread::spawn(move || replay(&brokers, &topic, &["--repeat", "3", "--rate", "2000"]))
    };
    std::thread::sleep(Duration::from_secs(3));

    // SIGKILL a: its partitions move to b and c, which replay them from the
    // partitions' start (they never held them).
    let moved = owned(&shards[0]);
    let marks = high_watermarks(&brokers, &group.raw);
    let killed_at = Instant::now();
    shards[0].kill();
    let survivors_own =
        |shards: &[Appliance]| -> BTreeSet<u32> { shards[1..].iter().flat_map(owned).collect() };
    wait_until(
        "b and c to take a's partitions",
        Duration::from_secs(60),
        || moved.is_subset(&survivors_own(&shards)),
    );
    let moved_after = killed_at.elapsed();
    wait_until(
        "the moved partitions to be current",
        Duration::from_secs(120),
        || {
            let b = owned(&shards[1]);
            moved.iter().all(|p| {
                let store = if b.contains(p) {
                    &shards[1].store_dir
                } else {
                    &shards[2].store_dir
                };
                caught_up(store, &group.raw, &BTreeSet::from([*p]), &marks)
            })
        },
    );
    let current_after = killed_at.elapsed();

    // While a is down, b and c answer for everyone: a cart of a user on a
    // moved partition sent to the wrong survivor names the right one.
    let users = slice_users();
    let moved_user = *users
        .iter()
        .find(|&&u| moved.contains(&partition_of_user(u, PARTITIONS)))
        .unwrap();
    let partition = partition_of_user(moved_user, PARTITIONS);
    let (owner, other) = if owned(&shards[1]).contains(&partition) {
        (&shards[1], &shards[2])
    } else {
        (&shards[2], &shards[1])
    };
    let probe =
        crate::common::cart_json("probe", 0, 5, 10.0).replace("543272936", &moved_user.to_string());
    let (status, answer) = other.post("/v1/score", &probe);
    assert_eq!(status, 421, "{answer}");
    let named = &answer["error"]["owner"];
    assert_eq!(
        named["http"].as_str().unwrap(),
        owner.http.trim_start_matches("http://"),
        "{answer}"
    );
    assert_eq!(named["partition"], partition, "{answer}");
    assert_eq!(named["partitions"], PARTITIONS, "{answer}");
    let (status, answer) = owner.post("/v1/score", &probe);
    assert_eq!(status, 200, "{answer}");

    // a comes back under the same group.instance.id and gets them back.
    let restarted_at = Instant::now();
    let marks = high_watermarks(&brokers, &group.raw);
    shards[0] = group.start("a");
    wait_until(
        "a to get its partitions back",
        Duration::from_secs(60),
        || owned(&shards[0]) == moved && survivors_own(&shards).is_disjoint(&moved),
    );
    let back_after = restarted_at.elapsed();
    wait_until("a to be current", Duration::from_secs(120), || {
        caught_up(&shards[0].store_dir, &group.raw, &moved, &marks)
    });
    let back_current_after = restarted_at.elapsed();
    eprintln!(
        "shard failover: partitions {moved:?} moved {moved_after:?} after SIGKILL, current {current_after:?} after; \
         handed back {back_after:?} after the restart, current {back_current_after:?} after"
    );

    let summary = producer.join().unwrap();
    let produced = summary["acknowledged"].as_i64().unwrap();
    assert_eq!(produced, 3 * 17_434);
    let ends = high_watermarks(&brokers, &group.raw);
    assert_eq!(ends.values().sum::<i64>(), produced);
    wait_until(
        "every shard to be current",
        Duration::from_secs(120),
        || {
            shards
                .iter()
                .all(|s| caught_up(&s.store_dir, &group.raw, &owned(s), &ends))
        },
    );

    // Routing by the client itself: seeded with a alone, every cart reaches
    // its owner (the first answers teach it the map).
    let seeds = vec![shards[0].tcp.to_string()];
    let mut client = ShardedClient::new(&seeds, Some(Duration::from_secs(5)));
    for &user in users.iter().step_by(25) {
        let cart = Event::from_json(cart_of(user).as_bytes()).unwrap();
        let response = client.score(&cart).unwrap();
        assert_eq!(response.status, Status::Ok, "user {user}: {response:?}");
    }
    assert!(
        client.redirects > 0 && client.redirects < (users.len() / 25) as u64,
        "{}",
        client.redirects
    );
    for shard in &shards {
        let mismatches = format!(
            "cartscore_stream_key_mismatches_total{{topic=\"{}\",reason=\"not_user_id\"}}",
            group.raw
        );
        assert_eq!(shard.metric(&mismatches), 0.0);
    }

    let stores: Vec<PathBuf> = shards.iter().map(|s| s.store_dir.clone()).collect();
    for shard in shards {
        let (status, log) = shard.stop();
        assert!(status.success(), "{log}");
    }
    // Every partition's messages applied exactly where it is owned now.
    let mut union = BTreeMap::new();
    for store in &stores {
        for (p, next) in applied(store, &group.raw) {
            assert!(union.insert(p, next).is_none(), "partition {p} held twice");
        }
    }
    assert_eq!(union, ends);

    // The reference: one appliance, one clean pass over the same topic.
    let single_dir = work.path().join("single");
    std::fs::create_dir_all(&single_dir).unwrap();
    let single = Appliance::start(
        &single_dir,
        &group.models,
        &Options {
            env: group.env("single", "replica"),
            ..Options::default()
        },
    );
    wait_until("the single pass", Duration::from_secs(120), || {
        applied(&single.store_dir, &group.raw).values().sum::<i64>() >= produced
    });
    let single_store = single.store_dir.clone();
    let (status, log) = single.stop();
    assert!(status.success(), "{log}");
    // At one event time: each shard's own watermark is the newest event of
    // its partitions, and expiry is judged against it.
    let as_of = inspect(&single_store)["digest"]["watermark_micros"]
        .as_i64()
        .unwrap();
    let reference = inspect_at(&single_store, as_of);
    let digests: Vec<Value> = stores.iter().map(|s| inspect_at(s, as_of)).collect();
    let merged = merge(&digests.iter().collect::<Vec<_>>());
    assert_eq!(
        merged,
        merge(&[&reference]),
        "shards {digests:?}\nsingle {reference}"
    );
    assert!(merged.1 > 1_000, "{merged:?}");
}
