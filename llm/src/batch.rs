//! [`BatchGenerator`]: offline continuous batching over [`Llama::step`](crate::Llama::step), for
//! dataset generation and benchmarks.
//!
//! Up to `batch` sequences decode together; a finished sequence's slot is refilled from the job
//! queue at the next step, its prompt prefilled in the same step as the others' decode tokens.
//! Greedy decoding only: labels must replay exactly. The runner is batch-invariant, so what a
//! job produces does not depend on which jobs shared its steps, nor on `batch`.
//!
//! Hidden states are captured at the positions a [`Positions`] rule picks. Position `g` is the
//! state of the newest token after `g` generated tokens were fed: `g = 0` is the last prompt
//! token (from the prefill), and a job that generated `n` tokens (the stop token included) has
//! states `g = 0 … n − 1`, each with `n − g` tokens still to come.

use std::time::Instant;

use crate::error::{LlmError, Result};
use crate::layers::LayerSet;
use crate::model::{KvCache, Row, StepOutput};
use crate::runner::{Runner, StopReason};
use crate::sampler::{SplitMix64, argmax};

/// Which positions of a sequence get their hidden states kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// None: no layer is captured at all (and the step copies nothing).
    None,
    /// Every position.
    All,
    /// `g = 0, k, 2k, …`.
    Every(usize),
    /// `count` positions drawn uniformly without replacement from all of a sequence's positions
    /// (reservoir sampling, so the length need not be known), seeded per job.
    Random { count: usize },
}

impl Positions {
    fn wants(self, g: usize) -> bool {
        match self {
            Positions::None => false,
            Positions::All | Positions::Random { .. } => true,
            Positions::Every(k) => g.is_multiple_of(k.max(1)),
        }
    }
}

/// One sequence to generate.
#[derive(Clone, Debug)]
pub struct Job {
    /// The caller's id, handed back in [`Finished`].
    pub id: usize,
    /// Prompt token ids (chat template applied).
    pub prompt: Vec<u32>,
    /// Seed of this job's position sampling (for [`Positions::Random`]).
    pub seed: u64,
    /// A fixed length: the job ignores stop tokens and ends after exactly this many generated
    /// tokens (at least 1, at most the generator's `max_new_tokens`), with
    /// [`StopReason::MaxNewTokens`]. Greedy, its tokens begin with the free-running job's.
    /// Benchmarks use it to compare unlike numerics on like work. `None`: stop tokens end it.
    pub stop_at: Option<usize>,
}

impl Job {
    /// Generated tokens after which the job ends, whatever they are.
    fn limit(&self, max_new_tokens: usize) -> usize {
        self.stop_at
            .map_or(max_new_tokens, |n| n.clamp(1, max_new_tokens))
    }
}

/// A captured state.
#[derive(Clone, Debug, PartialEq)]
pub struct Captured {
    /// Generated tokens before this state.
    pub g: u32,
    /// `layers.len() × hidden`, layers ascending.
    pub hidden: Vec<f32>,
}

/// A finished sequence.
#[derive(Clone, Debug)]
pub struct Finished {
    pub id: usize,
    pub prompt_tokens: usize,
    /// Generated ids, the stop token included when there was one.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Mean over the prompt tokens of the captured layers (`layers.len() × hidden`).
    pub prompt_mean: Option<Vec<f32>>,
    /// Captured states, ascending in `g`.
    pub states: Vec<Captured>,
}

/// Figures of one step, for progress bars and step-time models.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Rows in the step.
    pub rows: usize,
    /// Prompt tokens prefilled in the step.
    pub prefill_tokens: usize,
    /// Decode rows in the step.
    pub decode_rows: usize,
    /// Tokens held in the KV caches of the step's rows before it ran.
    pub kv_tokens: usize,
    pub secs: f64,
}

/// Offline continuous batching (see the module docs).
#[derive(Debug)]
pub struct BatchGenerator<'a> {
    runner: &'a Runner,
    batch: usize,
    max_new_tokens: usize,
    layers: LayerSet,
    positions: Positions,
}

struct Active {
    job: Job,
    cache: KvCache,
    tokens: Vec<u32>,
    /// States kept so far; for `Random`, the reservoir.
    states: Vec<Captured>,
    /// Positions seen (for the reservoir).
    seen: u64,
    rng: SplitMix64,
    prefilled: bool,
}

impl<'a> BatchGenerator<'a> {
    pub fn new(runner: &'a Runner, batch: usize, max_new_tokens: usize) -> Self {
        Self {
            runner,
            batch: batch.max(1),
            max_new_tokens: max_new_tokens.max(1),
            layers: LayerSet::NONE,
            positions: Positions::None,
        }
    }

    /// Capture `layers` at `positions` (and the prompt mean of `layers`).
    pub fn capture(mut self, layers: LayerSet, positions: Positions) -> Self {
        if layers.is_empty() {
            self.positions = Positions::None;
        } else {
            self.positions = positions;
        }
        self.layers = if self.positions == Positions::None {
            LayerSet::NONE
        } else {
            layers
        };
        self
    }

    /// The layers captured (ascending), empty when nothing is.
    pub fn layers(&self) -> LayerSet {
        self.layers
    }

    /// Generates every job, `batch` at a time, calling `on_finish` as each ends (in completion
    /// order) and `on_step` after every step. An error from a callback stops the run.
    pub fn run(
        &self,
        jobs: impl IntoIterator<Item = Job>,
        mut on_finish: impl FnMut(Finished) -> Result<()>,
        mut on_step: impl FnMut(&StepStats),
    ) -> Result<()> {
        let ctx = self.runner.config().max_position_embeddings;
        let mut queue = jobs.into_iter();
        let mut active: Vec<Active> = Vec::with_capacity(self.batch);
        let mut exhausted = false;
        loop {
            while !exhausted && active.len() < self.batch {
                match queue.next() {
                    Some(job) => {
                        if job.prompt.is_empty() {
                            return Err(LlmError::Step(format!("job {}: empty prompt", job.id)));
                        }
                        // The last generated token is never fed back, so the sequence holds at
                        // most prompt + max_new − 1 positions.
                        if job.prompt.len() + self.max_new_tokens - 1 > ctx {
                            return Err(LlmError::PromptTooLong {
                                len: job.prompt.len(),
                                max: ctx + 1 - self.max_new_tokens,
                            });
                        }
                        let rng = SplitMix64(job.seed);
                        active.push(Active {
                            cache: self.runner.model().new_cache(),
                            tokens: Vec::new(),
                            states: Vec::new(),
                            seen: 0,
                            rng,
                            prefilled: false,
                            job,
                        });
                    }
                    None => exhausted = true,
                }
            }
            if active.is_empty() {
                return Ok(());
            }
            let (out, stats) = self.step(&mut active)?;
            on_step(&stats);
            // Consume the step in row order: keep states, choose tokens, note who finished.
            let mut done = Vec::new();
            for (row, a) in active.iter_mut().enumerate() {
                let g = a.tokens.len();
                if self.positions.wants(g) {
                    a.keep(self.positions, g as u32, out.row_hidden(row));
                }
                let tok = argmax(out.logits(row));
                a.tokens.push(tok);
                let stop = if a.job.stop_at.is_none() && self.runner.is_stop(tok) {
                    Some(StopReason::StopToken(tok))
                } else if a.tokens.len() >= a.job.limit(self.max_new_tokens) {
                    Some(StopReason::MaxNewTokens)
                } else if a.cache.len() >= ctx {
                    Some(StopReason::ContextFull)
                } else {
                    None
                };
                if let Some(stop) = stop {
                    done.push((row, stop));
                }
            }
            // Retire finished sequences, keeping the others in order; report in row order.
            let mut retired: Vec<Finished> = Vec::with_capacity(done.len());
            for &(row, stop) in done.iter().rev() {
                retired.push(active.remove(row).finish(stop, self.layers));
            }
            for f in retired.into_iter().rev() {
                on_finish(f)?;
            }
        }
    }

    /// One forward step over every active sequence: prefill rows for new ones, a decode row for
    /// the others. Layers are captured only when some row keeps a state at this step.
    fn step(&self, active: &mut [Active]) -> Result<(StepOutput, StepStats)> {
        let capture = active.iter().any(|a| self.positions.wants(a.tokens.len()));
        let layers = if capture { self.layers } else { LayerSet::NONE };
        let mut stats = StepStats {
            rows: active.len(),
            prefill_tokens: 0,
            decode_rows: 0,
            kv_tokens: active.iter().map(|a| a.cache.len()).sum(),
            secs: 0.0,
        };
        let mut rows: Vec<Row<'_>> = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            if a.prefilled {
                stats.decode_rows += 1;
                let last = a.tokens.last().expect("a prefilled sequence has a token");
                rows.push(Row::decode(&mut a.cache, last));
            } else {
                stats.prefill_tokens += a.job.prompt.len();
                a.prefilled = true;
                rows.push(Row::prefill(&mut a.cache, &a.job.prompt));
            }
        }
        let t0 = Instant::now();
        let out = self.runner.model().step(&mut rows, layers)?;
        stats.secs = t0.elapsed().as_secs_f64();
        Ok((out, stats))
    }
}

impl Active {
    fn keep(&mut self, positions: Positions, g: u32, hidden: &[f32]) {
        match positions {
            Positions::Random { count } => {
                // Algorithm R: after n positions, each is in the reservoir with probability
                // count / n.
                let n = self.seen;
                self.seen += 1;
                if (n as usize) < count {
                    self.states.push(Captured {
                        g,
                        hidden: hidden.to_vec(),
                    });
                } else {
                    let j = self.rng.below(n + 1) as usize;
                    if j < count {
                        self.states[j] = Captured {
                            g,
                            hidden: hidden.to_vec(),
                        };
                    }
                }
            }
            _ => self.states.push(Captured {
                g,
                hidden: hidden.to_vec(),
            }),
        }
    }

    fn finish(mut self, stop: StopReason, layers: LayerSet) -> Finished {
        self.states.sort_by_key(|c| c.g);
        let prompt_mean = if layers.is_empty() {
            None
        } else {
            self.cache.prompt_mean().map(|(_, mean)| mean)
        };
        Finished {
            id: self.job.id,
            prompt_tokens: self.job.prompt.len(),
            tokens: self.tokens,
            stop,
            prompt_mean,
            states: self.states,
        }
    }
}
