//! Who runs a request's rows ([`Executor`]): the model, or the request's recording.
//!
//! - On the model ([`ModelExecutor`]), every such row of a step shares one batched forward,
//!   with the requests' KV caches lent to it; the rows that produce a token are sampled, and
//!   the predictor's probes run batched over those whose filter needs them (the prompt
//!   predictor on the prefilled cache at a start, the decode probe on the captured layers).
//! - A replayed request ([`Replay`], see [`crate::recording`]) runs no model: its token and its
//!   predictor outputs are read from its recording.
//!
//! Either way a row that produced a token comes back as a [`Produced`], so the step applies
//! both alike; the recording is exact, so the two give the same bits.

use std::sync::Arc;
use std::time::Instant;

use trail_checkpoints::schedule::Need;
use trail_llm::{KvCache, LayerSet, Row, Runner, Sampler, StepOutput};

use super::row::RowSpec;
use crate::error::EngineError;
use crate::predictor::Predictor;
use crate::recording::{Recorder, RecordingKey, Recordings, Replay};
use crate::request::GenRequest;
use crate::sequence::SeqId;

/// Who runs a request's rows.
pub(super) enum Executor {
    /// The model.
    Model(Box<ModelState>),
    /// The request's recording.
    Replay(Replay),
}

/// A request run on the model: its KV cache and sampler; `recorder` keeps its tokens and
/// predictor outputs for replay when the engine has recordings.
pub(super) struct ModelState {
    cache: KvCache,
    sampler: Sampler,
    recorder: Option<Recorder>,
}

impl Executor {
    /// `req`'s executor: its recording when `recordings` hold one this engine can use (with
    /// predictor outputs when `with_predictor`); otherwise the model, recording the request
    /// when there are recordings.
    pub(super) fn for_request(
        req: &GenRequest,
        runner: &Runner,
        recordings: Option<&Arc<Recordings>>,
        with_predictor: bool,
    ) -> Self {
        let recorder = match recordings {
            Some(recs) => {
                let key = RecordingKey::of(req);
                if let Some(rec) = recs.get(&key, with_predictor) {
                    return Self::Replay(Replay::new(rec));
                }
                Some(Recorder::new(recs.clone(), key))
            }
            None => None,
        };
        Self::Model(Box::new(ModelState {
            cache: runner.model().new_cache(),
            sampler: Sampler::new(req.sampling),
            recorder,
        }))
    }

    /// Whether the request is replayed.
    pub(super) fn is_replay(&self) -> bool {
        matches!(self, Self::Replay(_))
    }

    /// Drops the KV cache (the request was preempted by recompute).
    pub(super) fn clear_cache(&mut self) {
        if let Self::Model(m) = self {
            m.cache.clear();
        }
    }

    /// Where a recorded request keeps its predictor outputs.
    pub(super) fn recorder_mut(&mut self) -> Option<&mut Recorder> {
        match self {
            Self::Model(m) => m.recorder.as_mut(),
            Self::Replay(_) => None,
        }
    }

    /// The request finished with `tokens`: a recorded one keeps its recording.
    pub(super) fn finish(self, tokens: &[u32], with_predictor: bool) {
        if let Self::Model(m) = self
            && let Some(r) = m.recorder
        {
            r.finish(tokens.to_vec(), with_predictor);
        }
    }

    fn cache(&self) -> &KvCache {
        match self {
            Self::Model(m) => &m.cache,
            Self::Replay(_) => unreachable!("replayed requests run no model"),
        }
    }

    fn cache_mut(&mut self) -> &mut KvCache {
        match self {
            Self::Model(m) => &mut m.cache,
            Self::Replay(_) => unreachable!("replayed requests run no model"),
        }
    }

    fn sampler_mut(&mut self) -> &mut Sampler {
        match self {
            Self::Model(m) => &mut m.sampler,
            Self::Replay(_) => unreachable!("replayed requests run no model"),
        }
    }

    fn replay_mut(&mut self) -> &mut Replay {
        match self {
            Self::Replay(rp) => rp,
            Self::Model(_) => unreachable!("only replayed requests are read from recordings"),
        }
    }
}

/// Where a step finds its requests' executors (the live requests, by id).
pub(super) trait Executors {
    /// The executor of live request `id`.
    fn executor(&self, id: SeqId) -> &Executor;
    /// The same, to run it.
    fn executor_mut(&mut self, id: SeqId) -> &mut Executor;
}

/// What a row that produced a token brings back.
pub(super) struct Produced {
    /// The token.
    pub(super) token: u32,
    /// The prompt predictor's probabilities (a start with a prompt predictor).
    pub(super) prompt: Option<Vec<f32>>,
    /// The probe's probabilities (a start or a refresh).
    pub(super) probe: Option<Vec<f32>>,
}

/// What a step's executors did.
pub(super) struct Ran {
    /// Per row of the step: what it produced (`None` for a prefill chunk that ends before
    /// the request's context does).
    pub(super) produced: Vec<Option<Produced>>,
    /// Seconds in the model's forward step.
    pub(super) forward_secs: f64,
    /// Seconds in the predictor's probes.
    pub(super) probe_secs: f64,
}

/// Runs a step's `rows`: those of replayed requests from their recordings, the others on
/// `model`.
pub(super) fn run(
    model: &ModelExecutor<'_>,
    rows: &[RowSpec],
    live: &mut impl Executors,
) -> Result<Ran, EngineError> {
    let (replayed, computed): (Vec<usize>, Vec<usize>) =
        (0..rows.len()).partition(|&r| live.executor(rows[r].id).is_replay());
    let mut produced: Vec<Option<Produced>> = rows.iter().map(|_| None).collect();
    let (forward_secs, probe_secs) = model.run(rows, &computed, live, &mut produced)?;
    replay(rows, &replayed, live, &mut produced)?;
    Ok(Ran {
        produced,
        forward_secs,
        probe_secs,
    })
}

/// Reads the rows `mine` (indices into `rows`) of replayed requests from their recordings:
/// the token after the tokens generated so far, and the next predictor output when the filter
/// needs one. A recording that ends early or whose outputs came at other rows is an
/// [`EngineError::Replay`].
fn replay(
    rows: &[RowSpec],
    mine: &[usize],
    live: &mut impl Executors,
    produced: &mut [Option<Produced>],
) -> Result<(), EngineError> {
    for &r in mine.iter().filter(|&&r| rows[r].produces) {
        let row = &rows[r];
        let rp = live.executor_mut(row.id).replay_mut();
        let token = rp.token(row.generated).ok_or_else(|| {
            EngineError::Replay(format!(
                "request {}: its recording ends at {} tokens",
                row.id, row.generated
            ))
        })?;
        let (prompt, probe) = if row.need == Need::Nothing {
            (None, None)
        } else {
            let ev = rp
                .next_event(row.generated)
                .map_err(|e| EngineError::Replay(format!("request {}: {e}", row.id)))?;
            (ev.prompt.clone(), Some(ev.probs.clone()))
        };
        produced[r] = Some(Produced {
            token,
            prompt,
            probe,
        });
    }
    Ok(())
}

/// The model's side of a step: the runner and the predictor whose layers it captures.
pub(super) struct ModelExecutor<'a> {
    pub(super) runner: &'a Runner,
    pub(super) predictor: Option<&'a Predictor>,
}

impl ModelExecutor<'_> {
    /// Layers the forward step captures: the predictor's.
    pub(super) fn layers(&self) -> LayerSet {
        self.predictor.map_or(LayerSet::NONE, Predictor::layers)
    }

    /// Runs the rows `mine` (indices into `rows`): one forward step, then sampling and the
    /// probes for those that produce a token, into `produced`. Returns the seconds of the
    /// forward step and of the probes.
    fn run(
        &self,
        rows: &[RowSpec],
        mine: &[usize],
        live: &mut impl Executors,
        produced: &mut [Option<Produced>],
    ) -> Result<(f64, f64), EngineError> {
        if mine.is_empty() {
            return Ok((0.0, 0.0));
        }
        let tf = Instant::now();
        let out = self.forward(rows, mine, live)?;
        let forward_secs = tf.elapsed().as_secs_f64();
        for (j, &r) in mine.iter().enumerate().filter(|(_, r)| rows[**r].produces) {
            let sampler = live.executor_mut(rows[r].id).sampler_mut();
            produced[r] = Some(Produced {
                token: sampler.sample(out.logits(j)),
                prompt: None,
                probe: None,
            });
        }
        let tp = Instant::now();
        if let Some(pred) = self.predictor {
            probe(pred, &out, rows, mine, live, produced)?;
        }
        Ok((forward_secs, tp.elapsed().as_secs_f64()))
    }

    /// One forward step over the rows `mine`, with their requests' KV caches lent to it (and
    /// given back, whatever the outcome). A cache that does not hold exactly the tokens before
    /// its row is an [`EngineError::Internal`].
    fn forward(
        &self,
        rows: &[RowSpec],
        mine: &[usize],
        live: &mut impl Executors,
    ) -> Result<StepOutput, EngineError> {
        let model = self.runner.model();
        let mut caches: Vec<KvCache> = Vec::with_capacity(mine.len());
        for &r in mine {
            let row = &rows[r];
            let cache = live.executor_mut(row.id).cache_mut();
            if cache.len() != row.start {
                return Err(EngineError::Internal(format!(
                    "request {}: cache holds {} tokens, the plan starts at {}",
                    row.id,
                    cache.len(),
                    row.start
                )));
            }
            caches.push(std::mem::replace(cache, model.new_cache()));
        }
        let out = {
            let mut batch: Vec<Row<'_>> = mine
                .iter()
                .zip(caches.iter_mut())
                .map(|(&r, c)| Row::new(c, &rows[r].tokens, rows[r].prompt_tokens))
                .collect();
            model.step(&mut batch, self.layers())
        };
        for (&r, c) in mine.iter().zip(caches) {
            *live.executor_mut(rows[r].id).cache_mut() = c;
        }
        Ok(out?)
    }
}

/// Runs the predictor's probes for the rows `mine` (the forward step's rows, in `out`'s
/// order) whose filter needs them: the prompt predictor on the prefilled cache at a start
/// (where the checkpoint has one), the decode probe on the row's captured layers; each kind in
/// one call over every row that needs it, row by row as the scorer computes them
/// ([`trail_checkpoints::schedule`]).
fn probe(
    pred: &Predictor,
    out: &StepOutput,
    rows: &[RowSpec],
    mine: &[usize],
    live: &impl Executors,
    produced: &mut [Option<Produced>],
) -> Result<(), EngineError> {
    let mut prompt = Features::default();
    let mut probe = Features::default();
    for (j, &r) in mine.iter().enumerate() {
        let row = &rows[r];
        if !row.produces || row.need == Need::Nothing {
            continue;
        }
        if row.need == Need::Start
            && let Some(f) = pred.prompt_features(live.executor(row.id).cache())
        {
            prompt.push(r, f);
        }
        pred.decode_features(out, j, row.g, &mut probe.values);
        probe.rows.push(r);
    }
    let k = pred.k();
    if !prompt.rows.is_empty() {
        let probs = pred.prompt_proba(&prompt.values)?;
        for (r, p) in prompt.outputs(&probs, k) {
            produced_at(produced, r).prompt = Some(p.to_vec());
        }
    }
    if !probe.rows.is_empty() {
        let probs = pred.decode_proba(&probe.values)?;
        for (r, p) in probe.outputs(&probs, k) {
            produced_at(produced, r).probe = Some(p.to_vec());
        }
    }
    Ok(())
}

/// One predictor's input over the rows that need it, row after row.
#[derive(Default)]
struct Features {
    /// The rows (indices into the step's rows), in order.
    rows: Vec<usize>,
    /// Their features, concatenated.
    values: Vec<f32>,
}

impl Features {
    fn push(&mut self, row: usize, features: Vec<f32>) {
        self.rows.push(row);
        self.values.extend(features);
    }

    /// Each row with its `k` probabilities out of `probs`.
    fn outputs<'p>(&self, probs: &'p [f32], k: usize) -> impl Iterator<Item = (usize, &'p [f32])> {
        self.rows.iter().copied().zip(probs.chunks_exact(k))
    }
}

fn produced_at(produced: &mut [Option<Produced>], r: usize) -> &mut Produced {
    produced[r].as_mut().expect("probed rows produced a token")
}
