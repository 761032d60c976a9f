//! A deterministic generator of event data in the data set's exact CSV form.
//!
//! Users come back for several sessions; sessions are view-heavy, drift within
//! a category, and sometimes cart the product just viewed. Whether a carted
//! product is bought later in the session follows a hidden propensity built
//! only from things the features can observe (views of the product, its price
//! against the session's viewed prices, brand and category effects, the
//! user's past purchases, the hour), so a good model can learn it; the
//! generator can write that oracle probability for every cart event, which
//! bounds the ROC-AUC any model can reach.
//!
//! Events are emitted in time order by a heap of users keyed by their next
//! event time, so memory is bounded by the number of users, not events.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;

use anyhow::{Context, Result};
use cartscore_core::Timestamp;
use rand::distr::{Distribution, weighted::WeightedIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Exp, LogNormal, Normal, Zipf};

/// 2019-10-01T00:00:00Z, the start of the real data set.
const START_SECS: i64 = 1_569_888_000;
/// Days over which users first arrive, by default.
pub const SPAN_DAYS: i64 = 30;
/// A session step's chance to cart the product just viewed, by default.
pub const CART_RATE: f64 = 0.024;

const L1: [&str; 13] = [
    "electronics",
    "appliances",
    "computers",
    "apparel",
    "furniture",
    "construction",
    "kids",
    "auto",
    "accessories",
    "sport",
    "medicine",
    "country_yard",
    "stationery",
];
const L2: [&str; 16] = [
    "smartphone",
    "audio",
    "video",
    "kitchen",
    "environment",
    "notebook",
    "desktop",
    "shoes",
    "living_room",
    "bedroom",
    "tools",
    "toys",
    "bag",
    "bicycle",
    "personal",
    "components",
];
const L3: [&str; 8] = [
    "washer",
    "headphone",
    "tv",
    "sofa",
    "drill",
    "keyboard",
    "sneakers",
    "refrigerators",
];
const SYLLABLES: [&str; 16] = [
    "sa", "mi", "ko", "ra", "len", "vo", "ti", "zen", "bo", "lu", "ne", "pha", "ri", "cor", "da",
    "x",
];

/// Hourly weights of session starts (UTC): quiet nights, busy evenings.
const HOUR_WEIGHTS: [f64; 24] = [
    2.0, 1.2, 0.8, 0.6, 0.6, 0.9, 1.6, 2.6, 3.6, 4.2, 4.6, 4.8, 5.0, 5.0, 4.9, 4.9, 5.2, 5.8, 6.5,
    7.0, 6.8, 5.8, 4.4, 3.0,
];
/// Acceptance of a session start by weekday (Monday first): weekends are busier.
const WEEKDAY_WEIGHTS: [f64; 7] = [0.85, 0.8, 0.8, 0.82, 0.9, 1.0, 0.97];

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub events: u64,
    pub seed: u64,
    /// Fraction of rows written deliberately invalid (0 by default).
    pub invalid_rate: f64,
    /// Days over which users first arrive ([`SPAN_DAYS`] by default; the
    /// data set's seven months are 213).
    pub span_days: i64,
    /// A step's chance to cart the product just viewed ([`CART_RATE`]).
    pub cart_rate: f64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SynthSummary {
    pub events: u64,
    pub views: u64,
    pub carts: u64,
    pub removes: u64,
    pub purchases: u64,
    pub invalid: u64,
    pub users: u64,
    pub sessions: u64,
}

struct Category {
    id: u64,
    code: String,
    l1: usize,
    log_price_mean: f64,
    products: Vec<u32>,
}

struct Product {
    id: u64,
    category: u32,
    brand: Option<u32>,
    cents: u64,
}

struct World {
    categories: Vec<Category>,
    brands: Vec<String>,
    brand_effect: Vec<f64>,
    l1_effect: [f64; L1.len()],
    products: Vec<Product>,
    product_popularity: Zipf<f64>,
}

impl World {
    fn build(rng: &mut ChaCha8Rng, events: u64) -> Self {
        let mut categories = Vec::new();
        for (l1, l1_name) in L1.iter().enumerate() {
            let n_l2 = rng.random_range(2..=5);
            for _ in 0..n_l2 {
                let l2 = L2[rng.random_range(0..L2.len())];
                let with_l3 = rng.random_bool(0.5);
                let code = if with_l3 {
                    format!("{l1_name}.{l2}.{}", L3[rng.random_range(0..L3.len())])
                } else {
                    format!("{l1_name}.{l2}")
                };
                // Like the real data, about a third of category ids carry no code.
                let code = if rng.random_bool(0.33) {
                    String::new()
                } else {
                    code
                };
                categories.push(Category {
                    id: rng.random_range(2_053_013_552_000_000_000..2_232_732_100_000_000_000),
                    code,
                    l1,
                    log_price_mean: rng.random_range(2.3..6.6),
                    products: Vec::new(),
                });
            }
        }
        let n_brands = 600usize;
        let brands: Vec<String> = (0..n_brands)
            .map(|i| {
                let parts = 2 + i % 2;
                let mut name: String = (0..parts)
                    .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                    .collect();
                name.push_str(&(i % 97).to_string());
                name
            })
            .collect();
        let effect = Normal::new(0.0, 0.6).expect("constant distribution parameters are valid");
        let brand_effect = (0..n_brands).map(|_| effect.sample(rng)).collect();
        let l1_noise = Normal::new(0.0, 0.4).expect("constant distribution parameters are valid");
        let mut l1_effect = [0.0; L1.len()];
        for e in &mut l1_effect {
            *e = l1_noise.sample(rng);
        }

        let n_products = (events / 40).clamp(2_000, 200_000) as usize;
        let category_pick = Zipf::new(categories.len() as f64, 0.9)
            .expect("constant distribution parameters are valid");
        let brand_pick =
            Zipf::new(n_brands as f64, 1.1).expect("constant distribution parameters are valid");
        let mut products = Vec::with_capacity(n_products);
        for i in 0..n_products {
            let category = (category_pick.sample(rng) as usize - 1).min(categories.len() - 1);
            let brand = (!rng.random_bool(0.14))
                .then(|| (brand_pick.sample(rng) as u32 - 1).min(n_brands as u32 - 1));
            let price = LogNormal::new(categories[category].log_price_mean, 0.6)
                .map(|d| d.sample(rng))
                .unwrap_or(10.0);
            // Some real rows have price 0; keep a few.
            let cents = if rng.random_bool(0.002) {
                0
            } else {
                (price * 100.0).round().max(1.0) as u64
            };
            categories[category].products.push(i as u32);
            products.push(Product {
                id: 1_000_000 + i as u64 * 13 + rng.random_range(0..13),
                category: category as u32,
                brand,
                cents,
            });
        }
        let product_popularity =
            Zipf::new(n_products as f64, 1.05).expect("constant distribution parameters are valid");
        Self {
            categories,
            brands,
            brand_effect,
            l1_effect,
            products,
            product_popularity,
        }
    }

    fn price(&self, product: u32) -> f64 {
        self.products[product as usize].cents as f64 / 100.0
    }
}

/// The hidden propensity: what makes a carted product get bought.
struct PurchaseDrivers {
    product_views: u32,
    price: f64,
    mean_view_price: Option<f64>,
    brand_effect: f64,
    l1_effect: f64,
    user_prev_purchases: u32,
    hour: u32,
    session_carts_before: u32,
}

fn purchase_probability(d: &PurchaseDrivers) -> f64 {
    let relative = match d.mean_view_price {
        Some(mean) if mean > 0.0 && d.price > 0.0 => (d.price / mean).ln().clamp(-2.0, 2.0),
        _ => 0.0,
    };
    let z = -0.35 + 0.6 * f64::from(d.product_views).ln_1p() - 0.8 * relative
        + d.brand_effect
        + d.l1_effect
        + 0.4 * f64::from(d.user_prev_purchases.min(4))
        + if (18..=22).contains(&d.hour) {
            0.3
        } else {
            0.0
        }
        - 0.25 * f64::from(d.session_carts_before.min(4))
        - 0.25 * (1.0 + d.price / 100.0).ln();
    1.0 / (1.0 + (-z).exp())
}

#[derive(Clone, Copy)]
enum Pending {
    Purchase(u32),
    Remove(u32),
}

struct Session {
    id: u128,
    steps_left: u32,
    viewed: Vec<(u32, u32)>,
    carted: Vec<u32>,
    view_price_sum: f64,
    view_priced: u32,
    carts: u32,
    pending: Vec<(u32, Pending)>,
    step: u32,
    last_product: Option<u32>,
}

struct User {
    id: u64,
    prev_purchases: u32,
    sessions_left: u32,
    session: Option<Session>,
}

/// One generated row before it is written.
struct Row {
    time: i64,
    session: u128,
    kind: &'static str,
    product: u32,
    user: u32,
    oracle: Option<f64>,
}

pub struct Generator {
    /// The last formatted second: rows come in time order, so most rows reuse it.
    time_text: (i64, Vec<u8>),
    rng: ChaCha8Rng,
    world: World,
    users: Vec<User>,
    /// Users acting before `horizon`, ordered by (time, user).
    heap: BinaryHeap<Reverse<(i64, u32)>>,
    /// Users acting at or after `horizon`, bucketed by hour. Most users wait
    /// days between sessions; keeping them out of the heap keeps it (and the
    /// users it touches) small and cache-resident. Pops are still in exact
    /// (time, user) order.
    future: BTreeMap<i64, Vec<(i64, u32)>>,
    horizon: i64,
    hours: WeightedIndex<f64>,
    step_gap: Exp<f64>,
    session_gap: Exp<f64>,
    config: SynthConfig,
}

impl Generator {
    pub fn new(config: SynthConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let world = World::build(&mut rng, config.events);
        let n_users = (config.events / 12).max(50) as usize;
        let hours =
            WeightedIndex::new(HOUR_WEIGHTS).expect("constant distribution parameters are valid");
        let mut generator = Self {
            time_text: (i64::MIN, Vec::new()),
            world,
            users: Vec::with_capacity(n_users),
            heap: BinaryHeap::new(),
            future: BTreeMap::new(),
            horizon: i64::MIN,
            hours,
            step_gap: Exp::new(1.0 / 35.0).expect("constant distribution parameters are valid"),
            session_gap: Exp::new(1.0 / (3.0 * 86_400.0))
                .expect("constant distribution parameters are valid"),
            config,
            rng,
        };
        for i in 0..n_users {
            let sessions_left = 1 + generator.rng.random_range(0..4);
            generator.users.push(User {
                id: 510_000_000 + i as u64 * 7 + generator.rng.random_range(0..7),
                prev_purchases: 0,
                sessions_left,
                session: None,
            });
            let day = generator
                .rng
                .random_range(0..generator.config.span_days.max(1));
            let start = generator.session_start(START_SECS + day * 86_400);
            generator.schedule(start, i as u32);
        }
        generator
    }

    fn schedule(&mut self, time: i64, user: u32) {
        if time < self.horizon {
            self.heap.push(Reverse((time, user)));
        } else {
            self.future
                .entry(time.div_euclid(3600))
                .or_default()
                .push((time, user));
        }
    }

    /// The user acting next, in (time, user) order.
    fn next_actor(&mut self) -> Option<(i64, u32)> {
        loop {
            if let Some(Reverse(next)) = self.heap.pop() {
                return Some(next);
            }
            let (hour, due) = self.future.pop_first()?;
            self.horizon = (hour + 1) * 3600;
            self.heap.extend(due.into_iter().map(Reverse));
        }
    }

    /// A session start on or after `from`, following hour and weekday seasonality.
    fn session_start(&mut self, from: i64) -> i64 {
        let mut day = from.div_euclid(86_400);
        loop {
            let weekday = Timestamp::from_secs(day * 86_400).weekday() as usize;
            if self.rng.random_bool(WEEKDAY_WEIGHTS[weekday]) {
                break;
            }
            day += 1;
        }
        let hour = self.hours.sample(&mut self.rng) as i64;
        (day * 86_400 + hour * 3600 + self.rng.random_range(0..3600)).max(from)
    }

    fn new_session(&mut self) -> Session {
        let id = self.rng.random::<u128>();
        // Heavy-tailed session length: most are short, some browse for long.
        let steps = LogNormal::new(2.2, 0.9)
            .map(|d| d.sample(&mut self.rng))
            .unwrap_or(8.0);
        Session {
            id,
            steps_left: (steps as u32).clamp(1, 400),
            viewed: Vec::new(),
            carted: Vec::new(),
            view_price_sum: 0.0,
            view_priced: 0,
            carts: 0,
            pending: Vec::new(),
            step: 0,
            last_product: None,
        }
    }

    fn pick_product(&mut self, near: Option<u32>) -> u32 {
        if let Some(last) = near
            && self.rng.random_bool(0.55)
        {
            let category =
                &self.world.categories[self.world.products[last as usize].category as usize];
            let n = category.products.len();
            // Within a category, popularity still decides (low indexes are popular).
            let k = ((self.rng.random::<f64>().powi(3)) * n as f64) as usize;
            return category.products[k.min(n - 1)];
        }
        (self.world.product_popularity.sample(&mut self.rng) as u32 - 1)
            .min(self.world.products.len() as u32 - 1)
    }

    /// Advances user `u` by one event at `time`; returns the row and when the user acts next.
    fn step(&mut self, u: u32, time: i64) -> (Row, Option<i64>) {
        if self.users[u as usize].session.is_none() {
            let session = self.new_session();
            self.users[u as usize].session = Some(session);
        }
        let Some(mut session) = self.users[u as usize].session.take() else {
            unreachable!("a session was just installed")
        };
        session.step += 1;

        let due = session
            .pending
            .iter()
            .position(|(step, _)| *step <= session.step);
        let (kind, product, oracle) = if let Some(i) = due {
            let (_, what) = session.pending.swap_remove(i);
            match what {
                Pending::Purchase(p) => {
                    self.users[u as usize].prev_purchases += 1;
                    ("purchase", p, None)
                }
                Pending::Remove(p) => ("remove_from_cart", p, None),
            }
        } else {
            let r: f64 = self.rng.random();
            let candidate = session.last_product.filter(|p| !session.carted.contains(p));
            let cart_rate = self.config.cart_rate;
            if let (true, Some(p)) = (r < cart_rate, candidate) {
                let oracle = self.cart(&mut session, u, p, time);
                ("cart", p, Some(oracle))
            } else if let (true, Some(p)) = (r < cart_rate + 0.0045, candidate) {
                // A purchase without a recorded cart, as the real data has.
                self.users[u as usize].prev_purchases += 1;
                session.carted.push(p);
                ("purchase", p, None)
            } else {
                let p = if self.rng.random_bool(0.15) && !session.viewed.is_empty() {
                    session.viewed[self.rng.random_range(0..session.viewed.len())].0
                } else {
                    self.pick_product(session.last_product)
                };
                match session.viewed.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, n)) => *n += 1,
                    None => session.viewed.push((p, 1)),
                }
                let price = self.world.price(p);
                if price > 0.0 {
                    session.view_price_sum += price;
                    session.view_priced += 1;
                }
                session.last_product = Some(p);
                ("view", p, None)
            }
        };

        let row = Row {
            time,
            session: session.id,
            kind,
            product,
            user: u,
            oracle,
        };

        session.steps_left = session.steps_left.saturating_sub(1);
        let gap = self.step_gap.sample(&mut self.rng).clamp(1.0, 1800.0) as i64;
        let user = &mut self.users[u as usize];
        let next = if session.steps_left > 0 || !session.pending.is_empty() {
            user.session = Some(session);
            Some(time + gap)
        } else if user.sessions_left > 1 {
            user.sessions_left -= 1;
            let pause = self.session_gap.sample(&mut self.rng) as i64 + 3 * 3600;
            Some(self.session_start(time + pause))
        } else {
            None
        };
        (row, next)
    }

    fn cart(&mut self, session: &mut Session, u: u32, p: u32, time: i64) -> f64 {
        let product = &self.world.products[p as usize];
        let category = &self.world.categories[product.category as usize];
        let drivers = PurchaseDrivers {
            product_views: session
                .viewed
                .iter()
                .find(|(q, _)| *q == p)
                .map_or(0, |(_, n)| *n),
            price: self.world.price(p),
            mean_view_price: (session.view_priced > 0)
                .then(|| session.view_price_sum / f64::from(session.view_priced)),
            brand_effect: product
                .brand
                .map_or(-0.2, |b| self.world.brand_effect[b as usize]),
            l1_effect: if category.code.is_empty() {
                0.0
            } else {
                self.world.l1_effect[category.l1]
            },
            user_prev_purchases: self.users[u as usize].prev_purchases,
            hour: Timestamp::from_secs(time).hour(),
            session_carts_before: session.carts,
        };
        let probability = purchase_probability(&drivers);
        session.carts += 1;
        session.carted.push(p);
        let later = session.step + 1 + self.rng.random_range(0..6);
        if self.rng.random_bool(probability) {
            session.pending.push((later, Pending::Purchase(p)));
        } else if self.rng.random_bool(0.6) {
            session.pending.push((later, Pending::Remove(p)));
        }
        probability
    }

    /// Writes `config.events` rows (header first) and, when asked, the oracle file.
    pub fn write(
        mut self,
        out: &mut impl Write,
        mut oracle: Option<&mut dyn Write>,
    ) -> Result<SynthSummary> {
        let mut summary = SynthSummary {
            users: self.users.len() as u64,
            ..Default::default()
        };
        out.write_all(b"event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n")?;
        if let Some(o) = oracle.as_deref_mut() {
            o.write_all(b"event_time,user_session,product_id,probability\n")?;
        }
        let mut line = Vec::with_capacity(256);
        let mut sessions_seen = 0u64;
        while summary.events < self.config.events {
            let Some((time, u)) = self.next_actor() else {
                break;
            };
            if self.users[u as usize].session.is_none() {
                sessions_seen += 1;
            }
            let (row, next) = self.step(u, time);
            if let Some(next) = next {
                self.schedule(next, u);
            }
            line.clear();
            self.format_row(&row, &mut line);
            if self.config.invalid_rate > 0.0 && self.rng.random_bool(self.config.invalid_rate) {
                self.corrupt(&mut line);
                summary.invalid += 1;
            } else {
                match row.kind {
                    "view" => summary.views += 1,
                    "cart" => summary.carts += 1,
                    "purchase" => summary.purchases += 1,
                    _ => summary.removes += 1,
                }
                if let (Some(o), Some(p)) = (oracle.as_deref_mut(), row.oracle) {
                    let mut text = Vec::with_capacity(96);
                    text.extend_from_slice(self.time_text(row.time));
                    text.push(b',');
                    write_uuid(row.session, &mut text);
                    writeln!(
                        text,
                        ",{},{p:.6}",
                        self.world.products[row.product as usize].id
                    )?;
                    o.write_all(&text)?;
                }
            }
            out.write_all(&line)?;
            summary.events += 1;
        }
        summary.sessions = sessions_seen;
        out.flush()?;
        if let Some(o) = oracle {
            o.flush()?;
        }
        Ok(summary)
    }

    fn time_text(&mut self, secs: i64) -> &[u8] {
        if self.time_text.0 != secs {
            self.time_text.1.clear();
            Timestamp::from_secs(secs).write_dataset_form(&mut self.time_text.1);
            self.time_text.0 = secs;
        }
        &self.time_text.1
    }

    fn format_row(&mut self, row: &Row, out: &mut Vec<u8>) {
        out.extend_from_slice(self.time_text(row.time));
        let product = &self.world.products[row.product as usize];
        let category = &self.world.categories[product.category as usize];
        let mut buf = itoa::Buffer::new();
        out.push(b',');
        out.extend_from_slice(row.kind.as_bytes());
        out.push(b',');
        out.extend_from_slice(buf.format(product.id).as_bytes());
        out.push(b',');
        out.extend_from_slice(buf.format(category.id).as_bytes());
        out.push(b',');
        out.extend_from_slice(category.code.as_bytes());
        out.push(b',');
        if let Some(b) = product.brand {
            out.extend_from_slice(self.world.brands[b as usize].as_bytes());
        }
        out.push(b',');
        out.extend_from_slice(buf.format(product.cents / 100).as_bytes());
        out.push(b'.');
        let cents = product.cents % 100;
        out.push(b'0' + (cents / 10) as u8);
        out.push(b'0' + (cents % 10) as u8);
        out.push(b',');
        out.extend_from_slice(buf.format(self.users[row.user as usize].id).as_bytes());
        out.push(b',');
        write_uuid(row.session, out);
        out.push(b'\n');
    }

    /// Breaks one rule the validator checks, like the original stack's
    /// producer did (it injected invalid prices).
    fn corrupt(&mut self, line: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(line).into_owned();
        let mut fields: Vec<String> = text.trim_end().split(',').map(str::to_owned).collect();
        match self.rng.random_range(0..6) {
            0 => fields[6] = format!("-{}", fields[6]),
            1 => fields[1] = "checkout".into(),
            2 => fields[8] = String::new(),
            3 => fields[2] = "0".into(),
            4 => fields[0] = "not-a-time".into(),
            _ => fields.truncate(5),
        }
        line.clear();
        line.extend_from_slice(fields.join(",").as_bytes());
        line.push(b'\n');
    }
}

/// Formats 128 random bits the way the data set's session ids look (a v4 UUID).
fn write_uuid(bits: u128, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push(b'-');
        }
        let nibble = if i == 12 {
            4
        } else {
            (bits >> (124 - 4 * i)) as usize & 0xf
        };
        out.push(HEX[nibble]);
    }
}

/// Writes the CSV (and the oracle file, when given) to the named paths.
pub fn run(
    config: SynthConfig,
    out: &std::path::Path,
    oracle: Option<&std::path::Path>,
) -> Result<SynthSummary> {
    // `-`: standard output, to stream into `train --input -`.
    let sink: Box<dyn Write> = if out == std::path::Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(out)
                .with_context(|| format!("failed to create {}", out.display()))?,
        )
    };
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, sink);
    let mut oracle_writer = match oracle {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("failed to create {}", path.display()))?,
        )),
        None => None,
    };
    let generator = Generator::new(config);
    let summary = generator
        .write(
            &mut writer,
            oracle_writer.as_mut().map(|w| w as &mut dyn Write),
        )
        .with_context(|| format!("failed to write {}", out.display()))?;
    Ok(summary)
}
