//! A single-server discrete-event simulator of the M/G/1 queue under a [`Policy`], with
//! batch-means 95 % confidence intervals for the mean response time.
//!
//! Ranks and tie-breaking are those of [`Policy::rank`], exactly as in [`crate::theory`]: the
//! job in service is preempted only by an arrival of strictly lower rank; waiting jobs keep the
//! rank they had when they stopped (they do not age), and equal ranks are served in arrival
//! order.
//!
//! [`precision`] runs it until its interval is tight enough ([`simulate_precise`]).

pub mod precision;

pub use precision::{Precision, Progress, simulate_precise};

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution as _, Exp};

use crate::Error;
use crate::dist::Joint;
use crate::policy::Policy;
use crate::theory::check_load;

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SimConfig {
    /// Offered load ρ = λ·E\[X\].
    pub load: f64,
    /// Jobs whose response times are measured (after the warm-up).
    pub jobs: u64,
    /// Jobs discarded at the start.
    pub warmup: u64,
    /// Number of batches for the batch-means interval (at least 2).
    pub batches: usize,
    pub seed: u64,
}

/// Mean response time with its 95 % batch-means half-width.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimResult {
    pub mean: f64,
    /// Half-width of the 95 % interval: mean ± ci95.
    pub ci95: f64,
    pub jobs: u64,
    pub batches: usize,
}

impl SimResult {
    /// ci95 / mean.
    pub fn rel_ci95(&self) -> f64 {
        self.ci95 / self.mean
    }
}

#[derive(Debug)]
struct Job {
    id: u64,
    arrival: f64,
    x: f64,
    y: f64,
    attained: f64,
}

/// A waiting job ordered so that the max-heap pops the lowest (rank, id).
#[derive(Debug)]
struct Waiting {
    rank: f64,
    job: Job,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .total_cmp(&self.rank)
            .then_with(|| other.job.id.cmp(&self.job.id))
    }
}

/// Simulates `cfg.warmup + cfg.jobs` arrivals (and as many more as it takes for all of them to
/// finish). `progress` is called with the number of finished measured jobs now and then.
pub fn simulate(
    joint: &Joint,
    policy: Policy,
    cfg: &SimConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<SimResult, Error> {
    check_load(cfg.load)?;
    policy.validate()?;
    if cfg.batches < 2 || cfg.jobs < cfg.batches as u64 {
        return Err(Error::BadParameter(format!(
            "need at least 2 batches and one job per batch (jobs={}, batches={})",
            cfg.jobs, cfg.batches
        )));
    }
    let lambda = cfg.load / joint.mean_size();
    let inter = Exp::new(lambda).map_err(|e| Error::BadParameter(e.to_string()))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let n = cfg.warmup + cfg.jobs;
    // Streaming batch means: jobs beyond batches × batch_size are simulated but not measured.
    let batch_size = cfg.jobs / cfg.batches as u64;
    let mut batch_sums = vec![0.0; cfg.batches];
    let mut measured_done = 0u64;
    let mut outstanding = n; // jobs with id < n not yet finished

    let mut t = 0.0;
    let mut next_arrival: f64 = inter.sample(&mut rng);
    let mut next_id = 0u64;
    let mut current: Option<Job> = None;
    let mut waiting: BinaryHeap<Waiting> = BinaryHeap::new();

    while outstanding > 0 {
        let completion = current.as_ref().map(|j| t + (j.x - j.attained).max(0.0));
        match completion {
            Some(done) if done <= next_arrival => {
                let job = current.take().expect("a job in service");
                t = done;
                if job.id < n {
                    outstanding -= 1;
                    if job.id >= cfg.warmup {
                        let b = ((job.id - cfg.warmup) / batch_size) as usize;
                        if b < cfg.batches {
                            batch_sums[b] += t - job.arrival;
                        }
                        measured_done += 1;
                        if measured_done.is_multiple_of(1 << 16) {
                            progress(measured_done);
                        }
                    }
                }
                current = waiting.pop().map(|w| w.job);
            }
            _ => {
                if let Some(j) = current.as_mut() {
                    j.attained += next_arrival - t;
                }
                t = next_arrival;
                let (x, y) = joint.sample(&mut rng);
                let new = Job {
                    id: next_id,
                    arrival: t,
                    x,
                    y,
                    attained: 0.0,
                };
                next_id += 1;
                next_arrival = t + inter.sample(&mut rng);
                match current.take() {
                    None => current = Some(new),
                    Some(cur) => {
                        let rank_cur = policy.rank(cur.x, cur.y, cur.attained);
                        let rank_new = policy.rank(new.x, new.y, 0.0);
                        if rank_new < rank_cur {
                            waiting.push(Waiting {
                                rank: rank_cur,
                                job: cur,
                            });
                            current = Some(new);
                        } else {
                            waiting.push(Waiting {
                                rank: rank_new,
                                job: new,
                            });
                            current = Some(cur);
                        }
                    }
                }
            }
        }
    }
    progress(measured_done);
    let means: Vec<f64> = batch_sums.iter().map(|s| s / batch_size as f64).collect();
    Ok(batch_means(&means, batch_size))
}

/// Mean and 95 % half-width from the means of equal consecutive batches of `size` jobs.
pub fn batch_means(means: &[f64], size: u64) -> SimResult {
    let b = means.len();
    let mean = means.iter().sum::<f64>() / b as f64;
    let var = means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (b - 1) as f64;
    SimResult {
        mean,
        ci95: t975(b - 1) * (var / b as f64).sqrt(),
        jobs: size * b as u64,
        batches: b,
    }
}

/// The 0.975 quantile of Student's t with `nu` degrees of freedom (Cornish–Fisher expansion;
/// error below 1e-3 for nu ≥ 5).
pub fn t975(nu: usize) -> f64 {
    let z = 1.959_963_984_540_054;
    let v = nu as f64;
    let z3 = z * z * z;
    let z5 = z3 * z * z;
    let z7 = z5 * z * z;
    z + (z3 + z) / (4.0 * v)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v * v * v)
}
