//! A synthetic CTR data set whose clicks depend on what SparseCTR's three branches and its
//! RelTemporal bias are built to capture, its on-disk format, and the mini-batches a model
//! trains on.
//!
//! Each request is one user: profile features, a behavior history (item, category, timestamp;
//! realistic sessions from [`crate::workload::user_history`]) and candidates (item, category,
//! label) shown at the request time. The hidden world behind the clicks:
//!
//! - **long-term interests** (global branch): every user has a sparse mix over 2 to 4
//!   categories, drawn with a profile-dependent prior; behaviors of every session reflect it;
//! - **interest transition** (transition branch): every session has a focus category; from one
//!   session to the next the focus drifts to the category's successor (a fixed random cycle over
//!   the categories) with probability 0.6. A candidate in the successor of the last session's
//!   focus gets a click bonus, larger when the last two sessions already moved that way;
//! - **short-term interests** (local branch): a candidate whose category or item appears among the
//!   last 3 behaviors gets a bonus;
//! - **time of day and weekday** (RelTemporal, and the time embeddings of the model): every
//!   category has an affinity to evenings (18:00 to 24:00 UTC) and to weekends at the request
//!   time, and behaviors lean the same way at their own times.
//!
//! Profile fields (age band, gender, city tier, device) shift the interest prior and the base
//! click propensity. Labels are Bernoulli draws of a logistic model of these signals whose
//! intercept is solved, per generated world, for a mean click probability of 15%. Everything is
//! deterministic from the seed.
//!
//! ## On-disk format
//!
//! [`CtrDataset::write_to`] and [`CtrDataset::read_from`]; the same text is [`FORMAT`].
//!
//! ```text
#![doc = include_str!("ctr_format.txt")]
//! ```

use std::fmt;
use std::io::{self, BufRead, Write};

use crate::batch::JaggedBatch;
use crate::temporal::{is_weekend, DAY};
use crate::workload::{user_history, Rng};

/// The on-disk format, as printed by the training example's `--help`.
pub const FORMAT: &str = include_str!("ctr_format.txt");

/// First word and version of the header line.
const MAGIC: &str = "sparsectr-ctr v1";

/// Profile fields of generated data: name and number of values.
pub const PROFILE_FIELDS: [(&str, usize); 4] =
    [("age", 7), ("gender", 2), ("city_tier", 4), ("device", 3)];

/// Requests fall in the 30 days after this time (2026-06-01 UTC).
const EPOCH: i64 = 1_780_272_000;
/// A gap longer than this starts a new session (in-session gaps are seconds to minutes).
const SESSION_GAP: i64 = 1800;
/// How many of the last behaviors count as short-term interest.
const RECENT: usize = 3;

/// Limits on what a file may declare, so that a corrupt header cannot ask for huge tables.
const MAX_ITEMS: usize = 1_000_000;
const MAX_CATEGORIES: usize = 100_000;
/// Tokens of a whole data set, `users * (1 + max_behaviors + candidates)`: a bound on what
/// `generate` allocates, far above any size it is meant for.
const MAX_TOKENS: usize = 1 << 28;
const MAX_PROFILE_FIELDS: usize = 64;
const MAX_PROFILE_VALUES: usize = 1_000_000;

/// Sizes of a generated data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrConfig {
    /// Number of requests, one per user.
    pub users: usize,
    /// `n`: each user has `[0.75 n, n]` behaviors.
    pub max_behaviors: usize,
    /// Candidates per request.
    pub candidates: usize,
    /// Number of categories.
    pub categories: usize,
    /// Items per category (item ids are shuffled over categories).
    pub items_per_category: usize,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for CtrConfig {
    fn default() -> Self {
        CtrConfig {
            users: 2000,
            max_behaviors: 64,
            candidates: 8,
            categories: 24,
            items_per_category: 40,
            seed: 0,
        }
    }
}

/// One past behavior.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behavior {
    /// Item id.
    pub item: u32,
    /// Category id of the item.
    pub category: u32,
    /// Unix seconds.
    pub time: i64,
}

/// One candidate shown at the request time, and whether it was clicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Item id.
    pub item: u32,
    /// Category id of the item.
    pub category: u32,
    /// Clicked.
    pub label: bool,
}

/// One request: a user, their history, and the candidates scored together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// User id (informational).
    pub user: u64,
    /// One value per profile field.
    pub profile: Vec<u32>,
    /// Unix seconds of the request; the candidates' timestamp.
    pub request_time: i64,
    /// Oldest first.
    pub behaviors: Vec<Behavior>,
    /// Scored together, as one list.
    pub candidates: Vec<Candidate>,
}

/// A validated data set: every id below its table size, histories in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrDataset {
    /// Item ids are `0..num_items`.
    pub num_items: usize,
    /// Category ids are `0..num_categories`.
    pub num_categories: usize,
    /// Number of values of each profile field.
    pub profile_sizes: Vec<usize>,
    /// The requests.
    pub requests: Vec<Request>,
}

/// The true click probability of every candidate of a generated data set (`[request][candidate]`),
/// the ceiling any model's AUC is judged against.
#[derive(Debug, Clone, PartialEq)]
pub struct Oracle {
    /// Click probability per candidate, in the order of [`CtrDataset::requests`].
    pub click_prob: Vec<Vec<f64>>,
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

/// Mean click probability; the logit's intercept is solved for it.
const CLICK_RATE: f64 = 0.15;
/// Weights of the click model's logit.
const W_INTEREST: f64 = 3.0;
const W_TREND: f64 = 1.0;
const W_TREND_MOMENTUM: f64 = 1.0;
const W_RECENT_CATEGORY: f64 = 0.6;
const W_RECENT_ITEM: f64 = 0.8;
const W_TIME: f64 = 1.0;

/// The hidden world: items, categories and how users relate to them.
struct World {
    /// `[C][items_per_category]` item ids, most popular first.
    items_of: Vec<Vec<u32>>,
    /// `[items_per_category]` Zipf popularity by rank.
    popularity: Vec<f64>,
    /// `[C]` the category interest drifts to next (one random cycle over all categories).
    successor: Vec<usize>,
    /// `[C]` affinity to evenings and to weekends.
    evening: Vec<f64>,
    weekend: Vec<f64>,
    /// `[field][value][C]` interest prior (age band and gender only; the others are zero).
    prior: Vec<Vec<Vec<f64>>>,
    /// `[field][value]` click propensity.
    propensity: Vec<Vec<f64>>,
}

impl World {
    fn new(rng: &mut Rng, cfg: &CtrConfig) -> World {
        let c = cfg.categories;
        let mut ids: Vec<u32> = (0..(c * cfg.items_per_category) as u32).collect();
        shuffle(rng, &mut ids);
        let items_of = ids
            .chunks(cfg.items_per_category.max(1))
            .map(<[u32]>::to_vec)
            .collect();
        let popularity = (0..cfg.items_per_category)
            .map(|r| 1.0 / (r as f64 + 1.0).powf(0.8))
            .collect();
        let mut cycle: Vec<usize> = (0..c).collect();
        shuffle(rng, &mut cycle);
        let mut successor = vec![0; c];
        for i in 0..c {
            successor[cycle[i]] = cycle[(i + 1) % c];
        }
        let evening = (0..c).map(|_| rng.normal()).collect();
        let weekend = (0..c).map(|_| rng.normal()).collect();
        let prior = PROFILE_FIELDS
            .iter()
            .enumerate()
            .map(|(f, &(_, values))| {
                let strength = if f < 2 { 1.0 } else { 0.0 };
                (0..values)
                    .map(|_| (0..c).map(|_| strength * rng.normal()).collect())
                    .collect()
            })
            .collect();
        let propensity = PROFILE_FIELDS
            .iter()
            .map(|&(_, values)| (0..values).map(|_| 0.3 * rng.normal()).collect())
            .collect();
        World {
            items_of,
            popularity,
            successor,
            evening,
            weekend,
            prior,
            propensity,
        }
    }

    /// How much category `c` is favoured at time `t` (evening and weekend affinities).
    fn time_affinity(&self, c: usize, t: i64) -> f64 {
        let hour = t.rem_euclid(DAY) / 3600;
        let evening = if hour >= 18 { self.evening[c] } else { 0.0 };
        let weekend = if is_weekend(t, 0) {
            self.weekend[c]
        } else {
            0.0
        };
        evening + weekend
    }

    fn item(&self, rng: &mut Rng, c: usize) -> u32 {
        self.items_of[c][sample(rng, &self.popularity)]
    }

    fn user(&self, rng: &mut Rng) -> (Vec<u32>, Vec<f64>) {
        let profile: Vec<u32> = PROFILE_FIELDS
            .iter()
            .map(|&(_, values)| rng.range(0, values as u64 - 1) as u32)
            .collect();
        let c = self.successor.len();
        let mut prior = vec![0.0; c];
        for (f, &v) in profile.iter().enumerate() {
            for (p, x) in prior.iter_mut().zip(&self.prior[f][v as usize]) {
                *p += x;
            }
        }
        let mut weights: Vec<f64> = prior.iter().map(|p| p.exp()).collect();
        let mut interests = vec![0.0; c];
        for _ in 0..rng.range(2, 4).min(c as u64) {
            let k = sample(rng, &weights);
            weights[k] = 0.0;
            interests[k] = rng.exponential(1.0).powi(2) + 0.05;
        }
        let total: f64 = interests.iter().sum();
        interests.iter_mut().for_each(|x| *x /= total);
        (profile, interests)
    }
}

/// Category of the next behavior: the session's focus, the long-term mix, or what suits the time.
fn behavior_category(
    rng: &mut Rng,
    world: &World,
    interests: &[f64],
    focus: usize,
    t: i64,
) -> usize {
    let r = rng.uniform();
    if r < 0.55 {
        focus
    } else if r < 0.85 {
        sample(rng, interests)
    } else {
        let w: Vec<f64> = (0..interests.len())
            .map(|c| (1.5 * world.time_affinity(c, t)).exp())
            .collect();
        sample(rng, &w)
    }
}

/// One request (labels not drawn yet) with the click logits of its candidates before the
/// intercept.
fn generate_request(
    rng: &mut Rng,
    world: &World,
    cfg: &CtrConfig,
    user: u64,
) -> (Request, Vec<f64>) {
    let (profile, interests) = world.user(rng);
    let c = interests.len();
    let lo = (3 * cfg.max_behaviors).div_ceil(4) as u64;
    let n = rng.range(lo, cfg.max_behaviors as u64) as usize;
    let request_time = EPOCH + rng.range(0, 30 * DAY as u64) as i64;
    let times = user_history(rng, n, request_time);
    // Session foci, oldest first; a new session starts after a long gap.
    let mut foci: Vec<usize> = Vec::new();
    let mut behaviors = Vec::with_capacity(n);
    for (i, &t) in times.iter().enumerate() {
        if i == 0 || t - times[i - 1] > SESSION_GAP {
            let focus = match foci.last() {
                Some(&f) if rng.chance(0.6) => world.successor[f],
                _ => sample(rng, &interests),
            };
            foci.push(focus);
        }
        let cat = behavior_category(rng, world, &interests, foci[foci.len() - 1], t);
        behaviors.push(Behavior {
            item: world.item(rng, cat),
            category: cat as u32,
            time: t,
        });
    }
    let recent = &behaviors[n.saturating_sub(RECENT)..];
    let last_focus = foci.last().copied();
    let trend = last_focus.map(|f| world.successor[f]);
    let momentum = matches!(foci.as_slice(), [.., a, b] if world.successor[*a] == *b);
    let propensity: f64 = profile
        .iter()
        .enumerate()
        .map(|(f, &v)| world.propensity[f][v as usize])
        .sum();

    let mut candidates = Vec::with_capacity(cfg.candidates);
    let mut logits = Vec::with_capacity(cfg.candidates);
    for _ in 0..cfg.candidates {
        // Each candidate comes from one source, so every signal is present in the lists.
        let (item, cat) = match (rng.range(0, 3), trend) {
            (0, _) => {
                let cat = sample(rng, &interests);
                (world.item(rng, cat), cat)
            }
            (1, Some(cat)) => (world.item(rng, cat), cat),
            (2, _) if !recent.is_empty() => {
                let b = recent[rng.range(0, recent.len() as u64 - 1) as usize];
                let cat = b.category as usize;
                let item = if rng.chance(0.5) {
                    b.item
                } else {
                    world.item(rng, cat)
                };
                (item, cat)
            }
            _ => {
                let cat = rng.range(0, c as u64 - 1) as usize;
                (world.item(rng, cat), cat)
            }
        };
        let mut z = propensity + W_INTEREST * interests[cat];
        if trend == Some(cat) {
            z += W_TREND + if momentum { W_TREND_MOMENTUM } else { 0.0 };
        }
        z +=
            W_RECENT_CATEGORY * recent.iter().filter(|b| b.category as usize == cat).count() as f64;
        if recent.iter().any(|b| b.item == item) {
            z += W_RECENT_ITEM;
        }
        z += W_TIME * world.time_affinity(cat, request_time);
        candidates.push(Candidate {
            item,
            category: cat as u32,
            label: false,
        });
        logits.push(z);
    }
    let request = Request {
        user,
        profile,
        request_time,
        behaviors,
        candidates,
    };
    (request, logits)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The intercept `b` with `mean(sigmoid(z + b)) = rate` over all `logits` (bisection: the mean
/// increases with `b`).
fn solve_intercept(logits: &[Vec<f64>], rate: f64) -> f64 {
    let count = logits.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let mean = |b: f64| {
        logits
            .iter()
            .flatten()
            .map(|&z| sigmoid(z + b))
            .sum::<f64>()
            / count
    };
    let (mut lo, mut hi) = (-30.0, 30.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if mean(mid) < rate {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

impl CtrDataset {
    /// Generates a data set and the true click probabilities of its candidates.
    ///
    /// `cfg.categories`, `cfg.items_per_category` and `cfg.users` must be at least 1.
    pub fn generate(cfg: &CtrConfig) -> Result<(CtrDataset, Oracle), DataError> {
        for (field, value) in [
            ("users", cfg.users),
            ("categories", cfg.categories),
            ("items_per_category", cfg.items_per_category),
        ] {
            if value == 0 {
                return Err(DataError::Config(format!("{field} must be at least 1")));
            }
        }
        let num_items = cfg.categories.checked_mul(cfg.items_per_category);
        if cfg.categories > MAX_CATEGORIES || num_items.is_none_or(|n| n > MAX_ITEMS) {
            return Err(DataError::Config(format!(
                "categories * items_per_category must be at most {MAX_ITEMS} \
                 (and categories at most {MAX_CATEGORIES})"
            )));
        }
        let tokens = cfg
            .max_behaviors
            .checked_add(cfg.candidates)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(cfg.users));
        if tokens.is_none_or(|n| n > MAX_TOKENS) {
            return Err(DataError::Config(format!(
                "users * (1 + max_behaviors + candidates) must be at most {MAX_TOKENS} \
                 (users {}, max_behaviors {}, candidates {})",
                cfg.users, cfg.max_behaviors, cfg.candidates
            )));
        }
        let mut rng = Rng::new(cfg.seed);
        let world = World::new(&mut rng, cfg);
        let mut requests = Vec::with_capacity(cfg.users);
        let mut logits = Vec::with_capacity(cfg.users);
        for user in 0..cfg.users {
            let (request, z) = generate_request(&mut rng, &world, cfg, user as u64);
            requests.push(request);
            logits.push(z);
        }
        let intercept = solve_intercept(&logits, CLICK_RATE);
        let click_prob: Vec<Vec<f64>> = logits
            .iter()
            .map(|z| z.iter().map(|&z| sigmoid(z + intercept)).collect())
            .collect();
        for (request, probs) in requests.iter_mut().zip(&click_prob) {
            for (c, &p) in request.candidates.iter_mut().zip(probs) {
                c.label = rng.chance(p);
            }
        }
        let data = CtrDataset {
            num_items: num_items.unwrap_or(0),
            num_categories: cfg.categories,
            profile_sizes: PROFILE_FIELDS.iter().map(|f| f.1).collect(),
            requests,
        };
        Ok((data, Oracle { click_prob }))
    }

    /// Number of candidates over all requests.
    pub fn num_candidates(&self) -> usize {
        self.requests.iter().map(|r| r.candidates.len()).sum()
    }

    /// Fraction of candidates clicked (0 when there are none).
    pub fn click_rate(&self) -> f64 {
        let clicks: usize = self
            .requests
            .iter()
            .map(|r| r.candidates.iter().filter(|c| c.label).count())
            .sum();
        clicks as f64 / self.num_candidates().max(1) as f64
    }

    /// A deterministic train / held-out split of the request indices: a shuffle by `seed`, the
    /// last `held_out` fraction (rounded, clamped to `[0, 1]`) held out.
    pub fn split(&self, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        let mut order: Vec<usize> = (0..self.requests.len()).collect();
        shuffle(&mut Rng::new(seed ^ 0x5_9117), &mut order);
        let held = (held_out.clamp(0.0, 1.0) * order.len() as f64).round() as usize;
        let test = order.split_off(order.len() - held);
        (order, test)
    }
}

/// `i` with probability proportional to `weights[i]` (non-negative, not all zero).
fn sample(rng: &mut Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.uniform() * total;
    for (i, &w) in weights.iter().enumerate() {
        if x < w {
            return i;
        }
        x -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Fisher-Yates.
pub fn shuffle<T>(rng: &mut Rng, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        let j = rng.range(0, i as u64) as usize;
        xs.swap(i, j);
    }
}

// ---------------------------------------------------------------------------------------------
// Mini-batches
// ---------------------------------------------------------------------------------------------

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum TokenKind {
    /// The user token: profile features, no item.
    User = 0,
    /// A past behavior.
    Behavior = 1,
    /// A candidate at the request time.
    Candidate = 2,
}

/// A mini-batch of requests as one jagged sequence batch with per-token features.
///
/// Sequence `u` is `[user token | behaviors | candidates]` of the `u`-th request; all candidates
/// of a request are scored in one pass (candidate isolation keeps them independent).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The layout: offsets, candidates per sequence, a user token, timestamps (the user token
    /// carries the request time, which the attention ignores).
    pub batch: JaggedBatch,
    /// `[T]` item id; 0 at user tokens.
    pub items: Vec<u32>,
    /// `[T]` category id; 0 at user tokens.
    pub categories: Vec<u32>,
    /// `[T]` hour of day (UTC) of the token's timestamp, `0..24`.
    pub hours: Vec<u32>,
    /// `[T]` weekday of the token's timestamp, `0..7`, 0 = Sunday.
    pub weekdays: Vec<u32>,
    /// `[T]` [`TokenKind`] as `u32`.
    pub kinds: Vec<u32>,
    /// `[T]` the sequence each token belongs to.
    pub seq_of_token: Vec<u32>,
    /// `[B, F]` profile values of each sequence's user.
    pub profile: Vec<u32>,
    /// `[N]` token index of every candidate, in order.
    pub candidates: Vec<u32>,
    /// `[N]` the sequence of every candidate.
    pub candidate_seq: Vec<u32>,
    /// `[N]` 1.0 clicked, 0.0 not.
    pub labels: Vec<f32>,
}

impl Tokens {
    /// Number of candidates `N`.
    pub fn num_candidates(&self) -> usize {
        self.candidates.len()
    }
}

/// Hour of day (UTC) and weekday (0 = Sunday) of a Unix time.
pub fn hour_and_weekday(t: i64) -> (u32, u32) {
    let day = t.div_euclid(DAY);
    (
        (t.rem_euclid(DAY) / 3600) as u32,
        (day + 4).rem_euclid(7) as u32,
    )
}

impl CtrDataset {
    /// The mini-batch of the requests at `indices` (in that order). An index past the last
    /// request is an error.
    pub fn tokens(&self, indices: &[usize]) -> crate::Result<Tokens> {
        let mut requests = Vec::with_capacity(indices.len());
        for &i in indices {
            requests.push(self.requests.get(i).ok_or(crate::Error::OutOfRange {
                field: "indices",
                value: i.to_string(),
                expected: "request indices below the number of requests",
            })?);
        }
        let total: usize = requests
            .iter()
            .map(|r| 1 + r.behaviors.len() + r.candidates.len())
            .sum();
        let per_token = || Vec::with_capacity(total);
        let (mut items, mut categories, mut hours, mut weekdays) =
            (per_token(), per_token(), per_token(), per_token());
        let (mut kinds, mut seq_of_token) = (per_token(), per_token());
        let mut timestamps = Vec::with_capacity(total);
        let mut profile = Vec::with_capacity(indices.len() * self.profile_sizes.len());
        let (mut candidates, mut candidate_seq, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        let mut offsets = vec![0usize];
        let mut num_candidates = Vec::with_capacity(indices.len());
        for (seq, r) in requests.iter().enumerate() {
            let mut push = |item: u32, category: u32, t: i64, kind: TokenKind| {
                let (hour, weekday) = hour_and_weekday(t);
                items.push(item);
                categories.push(category);
                hours.push(hour);
                weekdays.push(weekday);
                kinds.push(kind as u32);
                seq_of_token.push(seq as u32);
                timestamps.push(t);
            };
            push(0, 0, r.request_time, TokenKind::User);
            for b in &r.behaviors {
                push(b.item, b.category, b.time, TokenKind::Behavior);
            }
            for c in &r.candidates {
                push(c.item, c.category, r.request_time, TokenKind::Candidate);
            }
            let end = timestamps.len();
            for (k, c) in r.candidates.iter().enumerate() {
                candidates.push((end - r.candidates.len() + k) as u32);
                candidate_seq.push(seq as u32);
                labels.push(if c.label { 1.0 } else { 0.0 });
            }
            profile.extend_from_slice(&r.profile);
            offsets.push(end);
            num_candidates.push(r.candidates.len());
        }
        Ok(Tokens {
            batch: JaggedBatch::new(offsets, num_candidates, true, timestamps)?,
            items,
            categories,
            hours,
            weekdays,
            kinds,
            seq_of_token,
            profile,
            candidates,
            candidate_seq,
            labels,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// On-disk format
// ---------------------------------------------------------------------------------------------

/// What went wrong reading, writing or generating a data set.
#[derive(Debug)]
pub enum DataError {
    /// The underlying reader or writer failed.
    Io(io::Error),
    /// Line `line` (1-based) of the file is not valid: `message` says why.
    Parse {
        /// The line, 1-based.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The file has no header line.
    MissingHeader,
    /// A generator size is out of range.
    Config(String),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io(e) => write!(f, "i/o error: {e}"),
            DataError::Parse { line, message } => write!(f, "line {line}: {message}"),
            DataError::MissingHeader => {
                write!(
                    f,
                    "no header line (expected `{MAGIC} items=.. categories=.. profile=..`)"
                )
            }
            DataError::Config(m) => write!(f, "bad data set size: {m}"),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for DataError {
    fn from(e: io::Error) -> Self {
        DataError::Io(e)
    }
}

impl CtrDataset {
    /// Writes the data set in the text format of [`FORMAT`].
    pub fn write_to<W: Write>(&self, mut w: W) -> io::Result<()> {
        let sizes: Vec<String> = self.profile_sizes.iter().map(usize::to_string).collect();
        writeln!(
            w,
            "{MAGIC} items={} categories={} profile={}",
            self.num_items,
            self.num_categories,
            sizes.join(",")
        )?;
        for r in &self.requests {
            let profile: Vec<String> = r.profile.iter().map(u32::to_string).collect();
            write!(w, "{} {} {} |", r.user, profile.join(","), r.request_time)?;
            for b in &r.behaviors {
                write!(w, " {}:{}:{}", b.item, b.category, b.time)?;
            }
            write!(w, " |")?;
            for c in &r.candidates {
                write!(w, " {}:{}:{}", c.item, c.category, u8::from(c.label))?;
            }
            writeln!(w)?;
        }
        w.flush()
    }

    /// Reads and validates a data set in the text format of [`FORMAT`]. Stops at the first bad
    /// line with an error naming it; never panics on bad input.
    pub fn read_from<R: BufRead>(r: R) -> Result<CtrDataset, DataError> {
        let mut data: Option<CtrDataset> = None;
        // The category each item was first seen with; u32::MAX = not seen yet.
        let mut item_category: Vec<u32> = Vec::new();
        for (index, line) in r.lines().enumerate() {
            let line = line?;
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let fail = |message: String| DataError::Parse {
                line: index + 1,
                message,
            };
            match data.as_mut() {
                None => {
                    let header = parse_header(text).map_err(fail)?;
                    item_category = vec![u32::MAX; header.num_items];
                    data = Some(header);
                }
                Some(d) => {
                    let request = parse_request(text, d, &mut item_category).map_err(fail)?;
                    d.requests.push(request);
                }
            }
        }
        data.ok_or(DataError::MissingHeader)
    }
}

fn parse_num<N: std::str::FromStr>(text: &str, what: &str) -> Result<N, String> {
    text.parse()
        .map_err(|_| format!("{what} {text:?} is not a valid number"))
}

/// `key=value` with a number in `1..=max`.
fn parse_size(field: Option<&str>, key: &str, max: usize) -> Result<usize, String> {
    let field = field.ok_or_else(|| format!("header: missing {key}="))?;
    let value = field
        .strip_prefix(key)
        .and_then(|f| f.strip_prefix('='))
        .ok_or_else(|| format!("header: expected {key}=N, found {field:?}"))?;
    let n: usize = parse_num(value, key)?;
    if n == 0 || n > max {
        return Err(format!("header: {key}={n} is outside 1..={max}"));
    }
    Ok(n)
}

fn parse_header(text: &str) -> Result<CtrDataset, String> {
    let rest = text.strip_prefix(MAGIC).ok_or_else(|| {
        format!("expected the header `{MAGIC} items=.. categories=.. profile=..`, found {text:?}")
    })?;
    let mut fields = rest.split_whitespace();
    let num_items = parse_size(fields.next(), "items", MAX_ITEMS)?;
    let num_categories = parse_size(fields.next(), "categories", MAX_CATEGORIES)?;
    let profile = fields
        .next()
        .and_then(|f| f.strip_prefix("profile="))
        .ok_or("header: missing profile=S1,S2,..")?;
    let profile_sizes = profile
        .split(',')
        .map(|s| parse_size(Some(&format!("profile={s}")), "profile", MAX_PROFILE_VALUES))
        .collect::<Result<Vec<usize>, String>>()?;
    if profile_sizes.len() > MAX_PROFILE_FIELDS {
        return Err(format!(
            "header: {} profile fields, at most {MAX_PROFILE_FIELDS}",
            profile_sizes.len()
        ));
    }
    if let Some(extra) = fields.next() {
        return Err(format!("header: unexpected {extra:?}"));
    }
    Ok(CtrDataset {
        num_items,
        num_categories,
        profile_sizes,
        requests: Vec::new(),
    })
}

/// `ITEM:CATEGORY:X`, with the item and category checked against the tables.
fn parse_token(
    text: &str,
    what: &str,
    d: &CtrDataset,
    item_category: &mut [u32],
) -> Result<(u32, u32, i64), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [item, category, last] = parts[..] else {
        return Err(format!(
            "{what} {text:?}: expected ITEM:CATEGORY:{{TIME|LABEL}}"
        ));
    };
    let item: u32 = parse_num(item, &format!("{what} {text:?}: item"))?;
    let category: u32 = parse_num(category, &format!("{what} {text:?}: category"))?;
    let last: i64 = parse_num(last, &format!("{what} {text:?}: value"))?;
    if item as usize >= d.num_items {
        return Err(format!(
            "{what} {text:?}: item {item} >= items={}",
            d.num_items
        ));
    }
    if category as usize >= d.num_categories {
        return Err(format!(
            "{what} {text:?}: category {category} >= categories={}",
            d.num_categories
        ));
    }
    let known = &mut item_category[item as usize];
    if *known == u32::MAX {
        *known = category;
    } else if *known != category {
        return Err(format!(
            "{what} {text:?}: item {item} has category {category} here but {} earlier",
            *known
        ));
    }
    Ok((item, category, last))
}

fn parse_request(text: &str, d: &CtrDataset, item_category: &mut [u32]) -> Result<Request, String> {
    let sections: Vec<&str> = text.split('|').collect();
    let [head, behaviors, candidates] = sections[..] else {
        return Err(format!(
            "expected `USER PROFILE REQUEST_TIME | BEHAVIORS | CANDIDATES` (3 sections \
             separated by '|'), found {} sections",
            sections.len()
        ));
    };
    let head: Vec<&str> = head.split_whitespace().collect();
    let [user, profile, request_time] = head[..] else {
        return Err(format!(
            "expected USER PROFILE REQUEST_TIME before the first '|', found {} fields",
            head.len()
        ));
    };
    let user: u64 = parse_num(user, "user")?;
    let request_time: i64 = parse_num(request_time, "request time")?;
    let profile = profile
        .split(',')
        .map(|v| parse_num::<u32>(v, "profile value"))
        .collect::<Result<Vec<u32>, String>>()?;
    if profile.len() != d.profile_sizes.len() {
        return Err(format!(
            "{} profile values, the header declares {}",
            profile.len(),
            d.profile_sizes.len()
        ));
    }
    for (f, (&v, &size)) in profile.iter().zip(&d.profile_sizes).enumerate() {
        if v as usize >= size {
            return Err(format!("profile field {f}: value {v} >= its size {size}"));
        }
    }
    let mut parsed_behaviors: Vec<Behavior> = Vec::new();
    for tok in behaviors.split_whitespace() {
        let (item, category, time) = parse_token(tok, "behavior", d, item_category)?;
        if let Some(prev) = parsed_behaviors.last() {
            if time < prev.time {
                return Err(format!(
                    "behavior {tok:?}: timestamp {time} is earlier than the one before ({})",
                    prev.time
                ));
            }
        }
        if time > request_time {
            return Err(format!(
                "behavior {tok:?}: timestamp {time} is after the request time {request_time}"
            ));
        }
        parsed_behaviors.push(Behavior {
            item,
            category,
            time,
        });
    }
    if let Some(first) = parsed_behaviors.first() {
        let span = request_time as i128 - first.time as i128;
        if span > i32::MAX as i128 {
            return Err(format!(
                "the history spans {span} seconds before the request, at most {}",
                i32::MAX
            ));
        }
    }
    let mut parsed_candidates = Vec::new();
    for tok in candidates.split_whitespace() {
        let (item, category, label) = parse_token(tok, "candidate", d, item_category)?;
        let label = match label {
            0 => false,
            1 => true,
            _ => return Err(format!("candidate {tok:?}: label {label} is not 0 or 1")),
        };
        parsed_candidates.push(Candidate {
            item,
            category,
            label,
        });
    }
    Ok(Request {
        user,
        profile,
        request_time,
        behaviors: parsed_behaviors,
        candidates: parsed_candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (CtrDataset, Oracle) {
        let cfg = CtrConfig {
            users: 40,
            max_behaviors: 30,
            candidates: 5,
            ..CtrConfig::default()
        };
        CtrDataset::generate(&cfg).unwrap()
    }

    #[test]
    fn sizes_too_large_to_exist_are_config_errors() {
        for (users, max_behaviors, candidates) in [
            (1, usize::MAX, 0),
            (1, 0, usize::MAX),
            (usize::MAX, 1, 1),
            (1 << 20, 1 << 10, 0),
        ] {
            let cfg = CtrConfig {
                users,
                max_behaviors,
                candidates,
                ..CtrConfig::default()
            };
            match CtrDataset::generate(&cfg) {
                Err(DataError::Config(msg)) => {
                    assert!(msg.contains("users * (1 + max_behaviors"), "{msg}")
                }
                other => panic!(
                    "{users} x ({max_behaviors} + {candidates}): {:?}",
                    other.map(|_| ())
                ),
            }
        }
    }

    #[test]
    fn round_trip() {
        let (data, _) = small();
        let mut bytes = Vec::new();
        data.write_to(&mut bytes).unwrap();
        let back = CtrDataset::read_from(&bytes[..]).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let (a, _) = small();
        let (b, _) = small();
        assert_eq!(a, b);
        let cfg = CtrConfig {
            users: 40,
            max_behaviors: 30,
            candidates: 5,
            seed: 1,
            ..CtrConfig::default()
        };
        assert_ne!(CtrDataset::generate(&cfg).unwrap().0, a);
    }

    #[test]
    fn click_rate_and_signal() {
        for seed in [0, 2] {
            let cfg = CtrConfig {
                users: 3000,
                seed,
                ..CtrConfig::default()
            };
            check_click_rate_and_signal(&cfg);
        }
    }

    fn check_click_rate_and_signal(cfg: &CtrConfig) {
        let (data, oracle) = CtrDataset::generate(cfg).unwrap();
        let rate = data.click_rate();
        assert!((0.13..=0.17).contains(&rate), "click rate {rate}");
        let mean_p: f64 =
            oracle.click_prob.iter().flatten().sum::<f64>() / data.num_candidates() as f64;
        assert!(
            (mean_p - rate).abs() < 0.02,
            "mean p {mean_p} vs rate {rate}"
        );
        // The oracle ranks clicks well above chance: the signals are learnable.
        let (scores, labels): (Vec<f64>, Vec<bool>) = data
            .requests
            .iter()
            .zip(&oracle.click_prob)
            .flat_map(|(r, p)| r.candidates.iter().zip(p).map(|(c, &p)| (p, c.label)))
            .unzip();
        let auc = auc(&scores, &labels);
        assert!(auc > 0.75, "oracle AUC {auc}");
    }

    /// Rank AUC (ties count half), O(n^2) but fine for tests.
    fn auc(scores: &[f64], labels: &[bool]) -> f64 {
        let (mut num, mut pairs) = (0.0, 0.0);
        for (i, &li) in labels.iter().enumerate() {
            if !li {
                continue;
            }
            for (j, &lj) in labels.iter().enumerate() {
                if lj {
                    continue;
                }
                pairs += 1.0;
                num += if scores[i] > scores[j] {
                    1.0
                } else if scores[i] == scores[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
        num / pairs
    }

    #[test]
    fn tokens_layout() {
        let (data, _) = small();
        let idx = [3usize, 0, 7];
        let t = data.tokens(&idx).unwrap();
        assert_eq!(t.batch.num_seqs(), 3);
        assert!(t.batch.has_user_token());
        let n: usize = idx.iter().map(|&i| data.requests[i].candidates.len()).sum();
        assert_eq!(t.num_candidates(), n);
        assert_eq!(t.profile.len(), 3 * PROFILE_FIELDS.len());
        for (k, &tok) in t.candidates.iter().enumerate() {
            let seq = t.candidate_seq[k] as usize;
            let span = t.batch.seq(seq);
            assert!(span.candidates.contains(&(tok as usize)));
            assert_eq!(t.kinds[tok as usize], TokenKind::Candidate as u32);
            assert_eq!(
                t.batch.timestamps()[tok as usize],
                data.requests[idx[seq]].request_time
            );
        }
        let r = &data.requests[0];
        let span = t.batch.seq(1);
        assert_eq!(t.kinds[span.user.unwrap()], TokenKind::User as u32);
        let items: Vec<u32> = r.behaviors.iter().map(|b| b.item).collect();
        assert_eq!(&t.items[span.behaviors], &items[..]);
    }

    #[test]
    fn tokens_rejects_a_bad_index() {
        let (data, _) = small();
        assert!(matches!(
            data.tokens(&[0, 40]),
            Err(crate::Error::OutOfRange { field: "indices", ref value, .. }) if value == "40"
        ));
        assert_eq!(data.tokens(&[]).unwrap().batch.num_tokens(), 0);
    }

    #[test]
    fn split_is_a_partition() {
        let (data, _) = small();
        let (train, test) = data.split(0.25, 9);
        assert_eq!(test.len(), 10);
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn time_features() {
        // 2023-11-10 23:00:00 UTC was a Friday (SPEC worked example).
        assert_eq!(hour_and_weekday(1_699_657_200), (23, 5));
        assert_eq!(hour_and_weekday(1_699_657_200 + 3600), (0, 6));
    }

    fn read(text: &str) -> Result<CtrDataset, DataError> {
        CtrDataset::read_from(text.as_bytes())
    }

    const HEADER: &str = "sparsectr-ctr v1 items=10 categories=3 profile=2,3\n";

    #[test]
    fn bad_files_are_errors_naming_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("1 0,1 100 | 1:0:50 | 2:1:1 | 3:0:0", 2, "3 sections"),
            ("1 0,1 100 1:0:50 | 2:1:1", 2, "3 sections"),
            ("1 0,1 | | 2:1:1", 2, "USER PROFILE REQUEST_TIME"),
            ("x 0,1 100 | | 2:1:1", 2, "user"),
            ("1 0,3 100 | | 2:1:1", 2, "profile field 1"),
            ("1 0 100 | | 2:1:1", 2, "1 profile values"),
            ("1 0,1 100 | 10:0:50 | ", 2, "item 10 >= items=10"),
            ("1 0,1 100 | 1:3:50 | ", 2, "category 3"),
            ("1 0,1 100 | 1:0:60 1:0:50 | ", 2, "earlier"),
            ("1 0,1 100 | 1:0:101 | ", 2, "after the request time"),
            ("1 0,1 100 | 1:0 | ", 2, "ITEM:CATEGORY"),
            ("1 0,1 100 | | 2:1:2", 2, "not 0 or 1"),
            ("1 0,1 100 | 2:0:50 | 2:1:1", 2, "has category 1 here but 0"),
            ("1 0,1 3000000000 | 1:0:0 | ", 2, "spans"),
            (
                "1 0,1 100 | 1:0:-9223372036854775809 | ",
                2,
                "not a valid number",
            ),
        ];
        for &(line, at, needle) in cases {
            let text = format!("{HEADER}{line}\n");
            match read(&text) {
                Err(DataError::Parse { line: l, message }) => {
                    assert_eq!(l, at, "{line}: {message}");
                    assert!(
                        message.contains(needle),
                        "{line}: {message:?} lacks {needle:?}"
                    );
                }
                other => panic!("{line}: expected a parse error, got {other:?}"),
            }
        }
        // Header problems.
        for (text, needle) in [
            ("", "no header"),
            ("# only a comment\n", "no header"),
            (
                "sparsectr-ctr v2 items=1 categories=1 profile=1\n",
                "expected the header",
            ),
            (
                "sparsectr-ctr v1 items=0 categories=1 profile=1\n",
                "outside",
            ),
            (
                "sparsectr-ctr v1 items=99999999999 categories=1 profile=1\n",
                "outside",
            ),
            (
                "sparsectr-ctr v1 categories=1 items=1 profile=1\n",
                "items=N",
            ),
            ("sparsectr-ctr v1 items=1 categories=1\n", "profile="),
            (
                "sparsectr-ctr v1 items=1 categories=1 profile=1,,2\n",
                "profile",
            ),
            (
                "sparsectr-ctr v1 items=1 categories=1 profile=1 x\n",
                "unexpected",
            ),
        ] {
            let e = read(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e:?} lacks {needle:?}");
        }
        // Comments and blank lines are skipped; line numbers count them.
        let text = format!("# c\n\n{HEADER}\n# x\n1 0,1 100 | | 2:1:1\n1 0,1 100 | | 2:1:7\n");
        match read(&text) {
            Err(DataError::Parse { line, .. }) => assert_eq!(line, 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupted_files_never_panic() {
        let (data, _) = small();
        let mut bytes = Vec::new();
        data.write_to(&mut bytes).unwrap();
        let mut rng = Rng::new(5);
        let alphabet = b"0123456789:|, -#\nx";
        let mut errors = 0;
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..rng.range(1, 4) {
                let at = rng.range(0, b.len() as u64 - 1) as usize;
                match rng.range(0, 2) {
                    0 => b[at] = alphabet[rng.range(0, alphabet.len() as u64 - 1) as usize],
                    1 => {
                        b.remove(at);
                    }
                    _ => b.insert(
                        at,
                        alphabet[rng.range(0, alphabet.len() as u64 - 1) as usize],
                    ),
                }
            }
            // Whatever is read back is valid: it makes a batch.
            match CtrDataset::read_from(&b[..]) {
                Ok(d) => {
                    let all: Vec<usize> = (0..d.requests.len()).collect();
                    d.tokens(&all).unwrap();
                }
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 100, "only {errors} of 300 corruptions were caught");
    }
}
