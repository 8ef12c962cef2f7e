//! [`Policy`]: how requests are ordered, which running requests may be preempted, and whether
//! the policy preempts at all. One small type per policy of the TRAIL paper (§3.1 of the digest):
//!
//! | `--policy` | type | waiting order | preempts running? |
//! |---|---|---|---|
//! | `fcfs` | [`Fcfs`] | arrival | never (vLLM's default) |
//! | `sjf-bert` | [`SjfBert`] | initial (BERT) total-length prediction | never |
//! | `sprpt` | [`Sprpt`] | refined remaining length | always (the paper's RPSPRPT) |
//! | `trail` | [`Trail`] | refined remaining length | while `generated ≤ c × initial` |
//! | `oracle` | [`Oracle`] | true remaining length | always (SRPT) |
//!
//! A rank is a number, lower = sooner; the scheduler breaks ties by arrival, then id. A policy
//! without an estimate for a request ranks it `+∞`, so requests without predictions are served
//! FCFS among themselves. Memory preemption is not the policy's call: it always happens when the
//! KV pool is exhausted, and the victim is the running request of the highest rank, preemptible
//! or not. Aging is applied by the scheduler (see [`SchedulerConfig::aging`]).
//!
//! [`SchedulerConfig::aging`]: crate::scheduler::SchedulerConfig::aging

use std::fmt;
use std::str::FromStr;

use crate::sequence::Sequence;

/// A scheduling policy.
pub trait Policy: Send + Sync + fmt::Debug {
    /// Name as given to `--policy`.
    fn name(&self) -> &str;

    /// Rank of a waiting request (lower is admitted sooner). It must depend on the sequence
    /// only, not on the time: the scheduler keeps the waiting queue sorted by it.
    fn waiting_rank(&self, seq: &Sequence) -> f64;

    /// Rank of a running request: lower is more urgent. The running request of the highest
    /// rank is the victim of memory preemption; of the preemptible ones, the victim of policy
    /// preemption.
    fn running_rank(&self, seq: &Sequence) -> f64 {
        self.waiting_rank(seq)
    }

    /// Whether a more urgent waiting request may take this running request's place.
    fn preemptible(&self, seq: &Sequence) -> bool;

    /// Whether this policy ever preempts running requests for waiting ones.
    fn preempts(&self) -> bool;
}

/// First come, first served: arrival order, no policy preemption.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fcfs;

impl Policy for Fcfs {
    fn name(&self) -> &str {
        "fcfs"
    }
    fn waiting_rank(&self, _: &Sequence) -> f64 {
        0.0
    }
    fn preemptible(&self, _: &Sequence) -> bool {
        false
    }
    fn preempts(&self) -> bool {
        false
    }
}

/// Shortest job first by the initial (BERT) prediction of the total length; running requests
/// are never preempted by the policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct SjfBert;

impl Policy for SjfBert {
    fn name(&self) -> &str {
        "sjf-bert"
    }
    fn waiting_rank(&self, seq: &Sequence) -> f64 {
        seq.initial_prediction.unwrap_or(f64::INFINITY)
    }
    fn running_rank(&self, seq: &Sequence) -> f64 {
        seq.initial_prediction
            .map_or(f64::INFINITY, |p| p - seq.num_generated() as f64)
    }
    fn preemptible(&self, _: &Sequence) -> bool {
        false
    }
    fn preempts(&self) -> bool {
        false
    }
}

/// Shortest predicted remaining processing time with the refined predictor and unlimited
/// preemption (the paper's RPSPRPT).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sprpt;

impl Policy for Sprpt {
    fn name(&self) -> &str {
        "sprpt"
    }
    fn waiting_rank(&self, seq: &Sequence) -> f64 {
        seq.estimated_remaining().unwrap_or(f64::INFINITY)
    }
    fn preemptible(&self, _: &Sequence) -> bool {
        true
    }
    fn preempts(&self) -> bool {
        true
    }
}

/// TRAIL: SPRPT on the refined prediction with limited preemption. A request is preemptible
/// only while `generated ≤ c × initial_prediction`; past that it ranks `−∞` (most urgent), as in
/// the theory and the vLLM-era code (`sys.maxsize` priority).
#[derive(Debug, Clone, Copy)]
pub struct Trail {
    /// The preemption limit as a fraction of the first prediction (the paper: 0.8).
    pub c: f64,
}

impl Default for Trail {
    fn default() -> Self {
        Self { c: 0.8 }
    }
}

impl Trail {
    /// Whether `seq` is past the limit `c × initial prediction`.
    pub fn past_limit(&self, seq: &Sequence) -> bool {
        seq.initial_prediction
            .is_some_and(|p| seq.num_generated() as f64 > self.c * p)
    }
}

impl Policy for Trail {
    fn name(&self) -> &str {
        "trail"
    }
    fn waiting_rank(&self, seq: &Sequence) -> f64 {
        if self.past_limit(seq) {
            f64::NEG_INFINITY
        } else {
            seq.estimated_remaining().unwrap_or(f64::INFINITY)
        }
    }
    fn preemptible(&self, seq: &Sequence) -> bool {
        !self.past_limit(seq)
    }
    fn preempts(&self) -> bool {
        self.c > 0.0
    }
}

/// Shortest remaining processing time on the true remaining length (benchmarks with
/// `ignore_eos`, where it is `max_tokens − generated`): the bound the predictors aim at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Oracle;

impl Policy for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }
    fn waiting_rank(&self, seq: &Sequence) -> f64 {
        seq.true_remaining().unwrap_or(f64::INFINITY)
    }
    fn preemptible(&self, _: &Sequence) -> bool {
        true
    }
    fn preempts(&self) -> bool {
        true
    }
}

/// The policies by name, for `--policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`Fcfs`].
    Fcfs,
    /// [`SjfBert`].
    SjfBert,
    /// [`Sprpt`].
    Sprpt,
    /// [`Trail`].
    Trail,
    /// [`Oracle`].
    Oracle,
}

impl PolicyKind {
    /// Every policy.
    pub const ALL: [PolicyKind; 5] = [
        Self::Fcfs,
        Self::SjfBert,
        Self::Sprpt,
        Self::Trail,
        Self::Oracle,
    ];

    /// The `--policy` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fcfs => "fcfs",
            Self::SjfBert => "sjf-bert",
            Self::Sprpt => "sprpt",
            Self::Trail => "trail",
            Self::Oracle => "oracle",
        }
    }

    /// Builds the policy; `c` is TRAIL's preemption limit (ignored by the others).
    pub fn build(self, c: f64) -> Box<dyn Policy> {
        match self {
            Self::Fcfs => Box::new(Fcfs),
            Self::SjfBert => Box::new(SjfBert),
            Self::Sprpt => Box::new(Sprpt),
            Self::Trail => Box::new(Trail { c }),
            Self::Oracle => Box::new(Oracle),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}; expected one of fcfs, sjf-bert, sprpt, trail, oracle")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, generated: usize) -> Sequence {
        let mut s = Sequence::new(id, 8, 512, id as f64);
        s.generated = vec![0; generated];
        s
    }

    #[test]
    fn names_round_trip() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>().unwrap(), k);
            assert_eq!(k.build(0.8).name(), k.as_str());
        }
        assert!("srpt".parse::<PolicyKind>().is_err());
    }

    #[test]
    fn fcfs_ranks_all_alike_and_never_preempts() {
        let a = seq(1, 0).with_initial_prediction(5.0);
        let b = seq(2, 0).with_initial_prediction(500.0);
        assert_eq!(Fcfs.waiting_rank(&a), Fcfs.waiting_rank(&b));
        assert!(!Fcfs.preempts() && !Fcfs.preemptible(&a));
    }

    #[test]
    fn sjf_bert_ranks_by_initial_prediction_only() {
        let mut a = seq(1, 0).with_initial_prediction(50.0);
        a.predicted_remaining = Some(1.0);
        let b = seq(2, 0).with_initial_prediction(20.0);
        assert!(SjfBert.waiting_rank(&b) < SjfBert.waiting_rank(&a));
        assert_eq!(SjfBert.waiting_rank(&seq(3, 0)), f64::INFINITY);
        assert!(!SjfBert.preempts());
    }

    #[test]
    fn sprpt_prefers_refined_then_initial_minus_generated() {
        let mut a = seq(1, 30).with_initial_prediction(100.0);
        assert_eq!(Sprpt.waiting_rank(&a), 70.0);
        a.predicted_remaining = Some(12.0);
        assert_eq!(Sprpt.waiting_rank(&a), 12.0);
        assert_eq!(Sprpt.waiting_rank(&seq(2, 0)), f64::INFINITY);
        assert!(Sprpt.preempts() && Sprpt.preemptible(&a));
    }

    #[test]
    fn trail_limit_applies_to_the_initial_prediction() {
        let t = Trail { c: 0.8 };
        // 80 generated of an initial 100: at the limit, still preemptible.
        let mut a = seq(1, 80).with_initial_prediction(100.0);
        a.predicted_remaining = Some(500.0);
        assert!(t.preemptible(&a));
        assert_eq!(t.waiting_rank(&a), 500.0);
        // One more token: past it, never preempted whatever the refined estimate says.
        a.generated.push(0);
        assert!(!t.preemptible(&a));
        assert_eq!(t.running_rank(&a), f64::NEG_INFINITY);
        // No prediction yet: preemptible, ranked last.
        let b = seq(2, 3);
        assert!(t.preemptible(&b));
        assert_eq!(t.waiting_rank(&b), f64::INFINITY);
        assert!(!Trail { c: 0.0 }.preempts());
    }

    #[test]
    fn oracle_uses_true_remaining() {
        let a = seq(1, 10).with_eval_stop(15);
        let b = seq(2, 0).with_eval_stop(8);
        assert_eq!(Oracle.waiting_rank(&a), 5.0);
        assert!(Oracle.waiting_rank(&a) < Oracle.waiting_rank(&b));
    }
}
