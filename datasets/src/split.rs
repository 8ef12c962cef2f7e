//! Splits, deduplication, seeded samples and shards: from corpus records to the request order.
//!
//! [`plan`] runs the steps in a fixed order:
//! 1. deduplicate: records whose normalized prompts are equal are kept once, the first by source
//!    index ([`dedupe`]);
//! 2. assign each prompt a [`Split`] by a stable hash of its normalized text ([`assign`]);
//! 3. keep the requested split ([`SplitFilter`]);
//! 4. draw a seeded sample of `limit` requests ([`sample`]): not the first N, since the carried
//!    Alpaca is sorted by instruction after its first 5,000 records;
//! 5. keep this process's shard ([`Shard`]): the requests at positions `p` with
//!    `p % count == index` (round robin, so every shard sees the same mix of the corpus).
//!
//! The request order is the source order (ascending [`Record::index`]) of what is left after
//! each step, so the same input, seeds and options give the same requests, in the same order,
//! on any machine.
//!
//! Hashes are sha256 of `"{seed}\n{text}"`; the first 8 bytes, big-endian, give a `u64`, and its
//! top 53 bits a fraction in [0, 1). Python: `int.from_bytes(sha256(f"{seed}\n{text}".encode())
//! .digest()[:8], "big") >> 11) / 2**53`.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corpus::Record;
use crate::prompt::{normalize, request_id};

/// A data split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors parsing splits, ratios and shards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown split `{0}` (expected train, val or test)")]
    Split(String),
    #[error(
        "bad split ratios `{0}` (expected three non-negative numbers such as 80/10/10 or 0.8,0.1,0.1, not all zero)"
    )]
    Ratios(String),
    #[error("bad shard `{0}` (expected i/n with 0 <= i < n, or auto/n)")]
    Shard(String),
    #[error(
        "--shard auto/{count}: neither SLURM_ARRAY_TASK_ID (Slurm array job) nor JOB_COMPLETION_INDEX (Kubernetes Indexed Job) is set; give the shard as i/{count}"
    )]
    NoShardIndex { count: usize },
    #[error("--shard auto/{count}: {var}={value} is not an index below {count} (use 0-based indices, e.g. --array=0-{last})", last = count - 1)]
    BadShardIndex {
        var: &'static str,
        value: String,
        count: usize,
    },
}

impl FromStr for Split {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            _ => Err(ParseError::Split(s.to_owned())),
        }
    }
}

/// Which splits a run keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SplitFilter {
    #[default]
    All,
    Only(Split),
}

impl SplitFilter {
    pub fn keeps(self, split: Split) -> bool {
        match self {
            SplitFilter::All => true,
            SplitFilter::Only(s) => s == split,
        }
    }
}

impl fmt::Display for SplitFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitFilter::All => f.write_str("all"),
            SplitFilter::Only(s) => s.fmt(f),
        }
    }
}

impl FromStr for SplitFilter {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.trim().eq_ignore_ascii_case("all") {
            Ok(SplitFilter::All)
        } else {
            s.parse().map(SplitFilter::Only)
        }
    }
}

/// Split proportions (normalized to sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for Ratios {
    /// 80/10/10.
    fn default() -> Self {
        Ratios {
            train: 0.8,
            val: 0.1,
            test: 0.1,
        }
    }
}

impl Ratios {
    /// Proportions in any unit (`80, 10, 10` or `0.8, 0.1, 0.1`); `None` unless all are finite,
    /// non-negative and not all zero.
    pub fn new(train: f64, val: f64, test: f64) -> Option<Self> {
        let sum = train + val + test;
        let ok = [train, val, test]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0)
            && sum > 0.0;
        ok.then(|| Ratios {
            train: train / sum,
            val: val / sum,
            test: test / sum,
        })
    }
}

impl fmt::Display for Ratios {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.train * 100.0,
            self.val * 100.0,
            self.test * 100.0
        )
    }
}

impl FromStr for Ratios {
    type Err = ParseError;
    /// `80/10/10`, `0.8,0.1,0.1` or `8:1:1`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::Ratios(s.to_owned());
        let parts: Vec<f64> = s
            .split(['/', ',', ':'])
            .map(|p| p.trim().parse::<f64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        match parts[..] {
            [a, b, c] => Ratios::new(a, b, c).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// sha256(`"{seed}\n{text}"`), first 8 bytes as a big-endian u64.
pub fn hash64(seed: u64, text: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_string().as_bytes());
    h.update(b"\n");
    h.update(text.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// [`hash64`] as a fraction in [0, 1) (its top 53 bits).
pub fn unit_hash(seed: u64, text: &str) -> f64 {
    (hash64(seed, text) >> 11) as f64 / (1u64 << 53) as f64
}

/// The split of a normalized prompt: train when its fraction is below `train`, val below
/// `train + val`, test otherwise.
pub fn assign(normalized_prompt: &str, ratios: &Ratios, seed: u64) -> Split {
    let u = unit_hash(seed, normalized_prompt);
    if u < ratios.train {
        Split::Train
    } else if u < ratios.train + ratios.val {
        Split::Val
    } else {
        Split::Test
    }
}

/// Keeps the first record (by source index) of each normalized prompt; returns the kept records
/// in source order and how many were dropped.
pub fn dedupe(mut records: Vec<Record>) -> (Vec<Record>, usize) {
    records.sort_by_key(|r| r.index);
    let before = records.len();
    let mut seen = HashSet::with_capacity(records.len());
    records.retain(|r| seen.insert(normalize(&r.prompt)));
    let dropped = before - records.len();
    (records, dropped)
}

/// One request of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Position of the record in the source.
    pub index: usize,
    /// [`request_id`] of the dataset and prompt.
    pub request_id: String,
    /// The user message, as in the source.
    pub prompt: String,
    pub split: Split,
}

/// A seeded sample of `limit` requests, in source order: the `limit` smallest
/// [`hash64`]`(seed, request_id)` (ties by index). All of them when `limit >= len`.
pub fn sample(mut requests: Vec<Request>, limit: usize, seed: u64) -> Vec<Request> {
    if limit < requests.len() {
        let mut ranked: Vec<(u64, usize, Request)> = requests
            .into_iter()
            .map(|r| (hash64(seed, &r.request_id), r.index, r))
            .collect();
        ranked.sort_by_key(|(h, i, _)| (*h, *i));
        ranked.truncate(limit);
        requests = ranked.into_iter().map(|(_, _, r)| r).collect();
    }
    requests.sort_by_key(|r| r.index);
    requests
}

/// A disjoint slice of the requests: the ones at positions `p` (in request order) with
/// `p % count == index`. `index` is 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole set.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n` or `auto/n`, taking `i` for `auto` from `env` (`SLURM_ARRAY_TASK_ID` first,
    /// then `JOB_COMPLETION_INDEX`).
    pub fn parse_with_env(
        s: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ParseError> {
        let bad = || ParseError::Shard(s.to_owned());
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        let index = if i.trim().eq_ignore_ascii_case("auto") {
            let (var, value) = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"]
                .into_iter()
                .find_map(|var| env(var).map(|v| (var, v)))
                .ok_or(ParseError::NoShardIndex { count })?;
            match value.trim().parse::<usize>() {
                Ok(i) if i < count => i,
                _ => return Err(ParseError::BadShardIndex { var, value, count }),
            }
        } else {
            i.trim().parse().map_err(|_| bad())?
        };
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether the request at `position` of the request order is this shard's.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    /// This shard's items, in order.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, t)| t)
            .collect()
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ParseError;
    /// `i/n`, or `auto/n` with `i` from the process environment.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Shard::parse_with_env(s, |k| std::env::var(k).ok())
    }
}

/// How to turn records into requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    pub ratios: Ratios,
    /// Seed of the split hash. Keep it fixed across runs that should share splits.
    pub split_seed: u64,
    /// Keep only this split.
    #[serde(with = "display_fromstr")]
    pub split: SplitFilter,
    /// Draw this many requests (after the split filter).
    pub limit: Option<usize>,
    /// Seed of the sample.
    pub sample_seed: u64,
    pub shard: Shard,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            ratios: Ratios::default(),
            split_seed: 0,
            split: SplitFilter::All,
            limit: None,
            sample_seed: 0,
            shard: Shard::ALL,
        }
    }
}

mod display_fromstr {
    use super::SplitFilter;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &SplitFilter, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SplitFilter, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Counts at each step of [`plan`], for the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCounts {
    /// Records in.
    pub records: usize,
    /// Dropped as duplicates.
    pub duplicates: usize,
    /// Unique prompts per split, before the filter: train, val, test.
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// After the split filter and the sample (all shards together).
    pub selected: usize,
    /// This shard's requests.
    pub requests: usize,
}

/// The requests of a run, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub requests: Vec<Request>,
    pub counts: PlanCounts,
}

/// Dedupe, split, filter, sample, shard (see the module docs).
pub fn plan(dataset: &str, records: Vec<Record>, options: &PlanOptions) -> Plan {
    let mut counts = PlanCounts {
        records: records.len(),
        ..PlanCounts::default()
    };
    let (records, duplicates) = dedupe(records);
    counts.duplicates = duplicates;
    let mut requests = Vec::with_capacity(records.len());
    for r in records {
        let key = normalize(&r.prompt);
        let split = assign(&key, &options.ratios, options.split_seed);
        match split {
            Split::Train => counts.train += 1,
            Split::Val => counts.val += 1,
            Split::Test => counts.test += 1,
        }
        if options.split.keeps(split) {
            requests.push(Request {
                index: r.index,
                request_id: request_id(dataset, &key),
                prompt: r.prompt,
                split,
            });
        }
    }
    if let Some(limit) = options.limit {
        requests = sample(requests, limit, options.sample_seed);
    }
    counts.selected = requests.len();
    let requests = options.shard.select(requests);
    counts.requests = requests.len();
    Plan { requests, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: usize, prompt: &str) -> Record {
        Record {
            index,
            prompt: prompt.to_owned(),
        }
    }

    #[test]
    fn split_names_round_trip() {
        for s in Split::ALL {
            assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
        }
        assert_eq!("validation".parse::<Split>().unwrap(), Split::Val);
        assert!("dev".parse::<Split>().is_err());
        assert_eq!("all".parse::<SplitFilter>().unwrap(), SplitFilter::All);
        assert_eq!(
            "test".parse::<SplitFilter>().unwrap(),
            SplitFilter::Only(Split::Test)
        );
    }

    #[test]
    fn ratios_parse_and_normalize() {
        assert_eq!("80/10/10".parse::<Ratios>().unwrap(), Ratios::default());
        let r: Ratios = "0.5,0.25,0.25".parse().unwrap();
        assert_eq!((r.train, r.val, r.test), (0.5, 0.25, 0.25));
        assert!("1/2".parse::<Ratios>().is_err());
        assert!("0/0/0".parse::<Ratios>().is_err());
        assert!("-1/1/1".parse::<Ratios>().is_err());
    }

    #[test]
    fn hashes_are_pinned() {
        // Values computed once with Python's hashlib (see the module docs for the recipe).
        assert_eq!(
            hash64(0, "Give three tips for staying healthy."),
            0x991ca2ee3e8dc89d
        );
        assert_eq!(
            unit_hash(0, "Give three tips for staying healthy."),
            0.5980932075167892
        );
    }

    #[test]
    fn assignments_are_pinned() {
        // (prompt, seed, expected) computed once with Python's hashlib; a change of hash,
        // threshold or seed encoding moves some of them.
        let cases = [
            ("Give three tips for staying healthy.", 0, Split::Train),
            ("What are the three primary colors?", 0, Split::Train),
            ("What are the three primary colors?", 42, Split::Train),
            ("Describe the structure of an atom.", 42, Split::Train),
            ("Identify the odd one out.", 0, Split::Val),
            (
                "Classify the following into animals, plants, and minerals",
                0,
                Split::Val,
            ),
            ("Give three tips for staying healthy.", 42, Split::Val),
            (
                "Generate a list of ten items a person might need for a camping trip",
                42,
                Split::Val,
            ),
            ("How can we reduce air pollution?", 0, Split::Test),
            (
                "Explain the use of word embeddings in Natural Language Processing",
                0,
                Split::Test,
            ),
            ("How can we reduce air pollution?", 42, Split::Test),
            ("What does DNA stand for?", 42, Split::Test),
        ];
        for (p, seed, want) in cases {
            assert_eq!(
                assign(p, &Ratios::default(), seed),
                want,
                "{p:?} seed {seed}"
            );
        }
    }

    #[test]
    fn dedupe_keeps_the_first_by_source_index() {
        let recs = vec![
            rec(3, "b"),
            rec(0, "a"),
            rec(1, " a "),
            rec(2, "c"),
            rec(4, "b"),
        ];
        let (kept, dropped) = dedupe(recs);
        assert_eq!(kept, vec![rec(0, "a"), rec(2, "c"), rec(3, "b")]);
        assert_eq!(dropped, 2);
    }

    fn requests(n: usize) -> Vec<Request> {
        (0..n)
            .map(|i| Request {
                index: i,
                request_id: request_id("t", &format!("prompt {i}")),
                prompt: format!("prompt {i}"),
                split: Split::Train,
            })
            .collect()
    }

    #[test]
    fn sample_is_seeded_and_in_source_order() {
        let a = sample(requests(1000), 50, 7);
        let b = sample(requests(1000), 50, 7);
        let c = sample(requests(1000), 50, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0].index < w[1].index));
        // Not the first 50.
        assert!(a.last().unwrap().index > 100);
        // A larger sample contains the smaller one (rank by hash).
        let big = sample(requests(1000), 100, 7);
        assert!(a.iter().all(|r| big.contains(r)));
        assert_eq!(sample(requests(10), 20, 7).len(), 10);
    }

    #[test]
    fn shards_parse() {
        let none = |_: &str| None;
        assert_eq!(
            Shard::parse_with_env("2/4", none).unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert!(Shard::parse_with_env("4/4", none).is_err());
        assert!(Shard::parse_with_env("1/0", none).is_err());
        assert!(Shard::parse_with_env("x", none).is_err());
        assert_eq!(
            Shard::parse_with_env("auto/3", none).unwrap_err(),
            ParseError::NoShardIndex { count: 3 }
        );
        let slurm = |k: &str| (k == "SLURM_ARRAY_TASK_ID").then(|| "1".to_string());
        assert_eq!(
            Shard::parse_with_env("auto/3", slurm).unwrap(),
            Shard { index: 1, count: 3 }
        );
        let k8s = |k: &str| (k == "JOB_COMPLETION_INDEX").then(|| "2".to_string());
        assert_eq!(
            Shard::parse_with_env("auto/3", k8s).unwrap(),
            Shard { index: 2, count: 3 }
        );
        let both = |k: &str| Some(if k == "SLURM_ARRAY_TASK_ID" { "0" } else { "2" }.to_string());
        assert_eq!(Shard::parse_with_env("auto/3", both).unwrap().index, 0);
        let high = |_: &str| Some("3".to_string());
        assert!(matches!(
            Shard::parse_with_env("auto/3", high),
            Err(ParseError::BadShardIndex { .. })
        ));
        let msg = Shard::parse_with_env("auto/3", none)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("SLURM_ARRAY_TASK_ID") && msg.contains("JOB_COMPLETION_INDEX"));
    }

    #[test]
    fn shards_cover_disjointly() {
        let all = requests(103);
        let mut seen = Vec::new();
        for i in 0..4 {
            let part = Shard { index: i, count: 4 }.select(all.clone());
            assert!(part.len() == 25 || part.len() == 26);
            seen.extend(part);
        }
        seen.sort_by_key(|r| r.index);
        assert_eq!(seen, all);
    }

    #[test]
    fn plan_runs_the_steps_in_order() {
        let recs: Vec<Record> = (0..500)
            .map(|i| rec(i, &format!("question number {}", i % 400)))
            .collect();
        let opts = PlanOptions {
            limit: Some(60),
            sample_seed: 3,
            ..PlanOptions::default()
        };
        let whole = plan("t", recs.clone(), &opts);
        assert_eq!(whole.counts.records, 500);
        assert_eq!(whole.counts.duplicates, 100);
        assert_eq!(
            whole.counts.train + whole.counts.val + whole.counts.test,
            400
        );
        assert_eq!(whole.requests.len(), 60);
        assert!(whole.requests.iter().all(|r| r.index < 400));
        let mut union = Vec::new();
        for i in 0..3 {
            let o = PlanOptions {
                shard: Shard { index: i, count: 3 },
                ..opts.clone()
            };
            let p = plan("t", recs.clone(), &o);
            assert_eq!(p.counts.selected, 60);
            union.extend(p.requests);
        }
        union.sort_by_key(|r| r.index);
        assert_eq!(union, whole.requests);
        let test_only = PlanOptions {
            split: SplitFilter::Only(Split::Test),
            ..PlanOptions::default()
        };
        let t = plan("t", recs, &test_only);
        assert_eq!(t.requests.len(), t.counts.test);
        assert!(t.requests.iter().all(|r| r.split == Split::Test));
    }
}
