//! [`Recordings`]: what requests produced on earlier engines, so that an engine on virtual time
//! replays a request instead of running the model for it.
//!
//! A [`Recording`] holds a finished request's tokens and, when the engine had a predictor, the
//! predictor's class probabilities at each start and refresh, with the number of tokens
//! generated before each. Replaying is exact, not an approximation: the runner is deterministic
//! and batch-invariant, and its prefill equals its decode (all tested in `trail-llm`), so a
//! request's tokens and hidden states do not depend on which requests share its steps, when it
//! was preempted, or whether its cache was recomputed. What does depend on those, the schedule
//! and the clock, still runs for real: the scheduler, the policy, the Bayesian filter and the
//! virtual clock see the same steps either way.
//!
//! Share one [`Recordings`] only between engines over the same model, predictor checkpoint and
//! refresh interval (`trail eval latency` shares one across the cells of a run).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use trail_llm::Sampling;

use crate::request::GenRequest;

/// What decides a request's tokens: prompt, length limit, evaluation stop, stop handling (stop
/// tokens and stop strings) and sampling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordingKey {
    prompt: Vec<u32>,
    max_new_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eval_stop: Option<usize>,
    ignore_eos: bool,
    /// Stop strings (none under an evaluation stop, which ignores them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stop: Vec<String>,
    /// `None` for greedy; top-p's temperature and mass as bits, and its seed.
    sampling: Option<(u64, u64, u64)>,
}

impl RecordingKey {
    /// The key of a request. With an evaluation stop the tokens end there whatever the cap and
    /// stop tokens, and the predictor's outputs do not depend on the cap either (only the
    /// filter's clamp does, which runs on replay too): requests that differ only in their cap
    /// share one recording.
    pub fn of(req: &GenRequest) -> Self {
        Self {
            prompt: req.prompt.clone(),
            max_new_tokens: req.eval_stop.map_or(req.max_new_tokens, |_| 0),
            eval_stop: req.eval_stop,
            ignore_eos: req.ignore_eos || req.eval_stop.is_some(),
            stop: match req.eval_stop {
                Some(_) => Vec::new(),
                None => req.stop.as_slice().to_vec(),
            },
            sampling: match req.sampling {
                Sampling::Greedy => None,
                Sampling::TopP {
                    temperature,
                    top_p,
                    seed,
                } => Some((temperature.to_bits(), top_p.to_bits(), seed)),
            },
        }
    }
}

/// A predictor output at a start or refresh: the row (tokens generated before the step that
/// made it) and the class probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorEvent {
    /// Tokens the request had generated before this step (the row `g`).
    pub generated: usize,
    /// The probe's probabilities over the bins.
    pub probs: Vec<f32>,
    /// The prompt predictor's, at a start with a prompt predictor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<f32>>,
}

/// One finished request: its tokens and, if the engine had a predictor, every predictor
/// output in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    /// Generated tokens (a stop token included).
    pub tokens: Vec<u32>,
    /// Predictor outputs, in order; `None` when recorded without a predictor.
    pub events: Option<Vec<PredictorEvent>>,
}

/// Recordings by request, shared between engines.
#[derive(Debug, Default)]
pub struct Recordings {
    map: Mutex<HashMap<RecordingKey, Arc<Recording>>>,
    /// Requests handed a recording to replay.
    hits: AtomicUsize,
}

impl Recordings {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The recording of `key` usable by an engine with (`with_predictor`) or without a
    /// predictor: one made without a predictor cannot serve an engine that has one.
    pub fn get(&self, key: &RecordingKey, with_predictor: bool) -> Option<Arc<Recording>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let rec = map
            .get(key)
            .filter(|r| !with_predictor || r.events.is_some())
            .cloned();
        if rec.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        rec
    }

    /// Every recording (in no particular order), e.g. to save them.
    pub fn entries(&self) -> Vec<(RecordingKey, Arc<Recording>)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, r)| (k.clone(), r.clone())).collect()
    }

    /// How many requests were handed a recording to replay.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Keeps `rec` for `key`, unless one with predictor outputs is already there.
    pub fn insert(&self, key: RecordingKey, rec: Recording) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&key).is_none_or(|r| r.events.is_none()) {
            map.insert(key, Arc::new(rec));
        }
    }

    /// Requests recorded.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request being recorded: where it goes, under which key, and its predictor outputs so far.
#[derive(Debug)]
pub(crate) struct Recorder {
    recordings: Arc<Recordings>,
    key: RecordingKey,
    events: Vec<PredictorEvent>,
}

impl Recorder {
    pub(crate) fn new(recordings: Arc<Recordings>, key: RecordingKey) -> Self {
        Self {
            recordings,
            key,
            events: Vec::new(),
        }
    }

    /// Keeps a predictor output (in the order the request met them).
    pub(crate) fn push(&mut self, event: PredictorEvent) {
        self.events.push(event);
    }

    /// The request finished with `tokens`: keeps its recording, with the predictor outputs when
    /// the engine had a predictor (`with_predictor`).
    pub(crate) fn finish(self, tokens: Vec<u32>, with_predictor: bool) {
        let events = with_predictor.then_some(self.events);
        self.recordings
            .insert(self.key, Recording { tokens, events });
    }
}

/// A request being replayed: its recording and the next predictor output to hand out.
#[derive(Debug)]
pub(crate) struct Replay {
    rec: Arc<Recording>,
    next_event: usize,
}

impl Replay {
    pub(crate) fn new(rec: Arc<Recording>) -> Self {
        Self { rec, next_event: 0 }
    }

    /// The token produced after `generated` tokens.
    pub(crate) fn token(&self, generated: usize) -> Option<u32> {
        self.rec.tokens.get(generated).copied()
    }

    /// The next predictor output, which must have been made after `generated` tokens.
    pub(crate) fn next_event(&mut self, generated: usize) -> Result<&PredictorEvent, String> {
        let ev = self
            .rec
            .events
            .as_ref()
            .and_then(|e| e.get(self.next_event))
            .ok_or_else(|| {
                format!(
                    "the recording has no predictor output #{} (at {generated} tokens)",
                    self.next_event
                )
            })?;
        if ev.generated != generated {
            return Err(format!(
                "the recording's predictor output #{} came after {} tokens, this one after \
                 {generated}: it was made with another refresh interval",
                self.next_event, ev.generated
            ));
        }
        self.next_event += 1;
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(max_new: usize) -> RecordingKey {
        RecordingKey::of(&GenRequest::greedy(vec![1, 2, 3], max_new))
    }

    #[test]
    fn a_recording_without_predictor_outputs_serves_only_engines_without_a_predictor() {
        let r = Recordings::new();
        r.insert(
            key(4),
            Recording {
                tokens: vec![5, 6],
                events: None,
            },
        );
        assert!(r.get(&key(4), false).is_some());
        assert!(r.get(&key(4), true).is_none());
        assert!(
            r.get(&key(5), false).is_none(),
            "the length limit is part of the key"
        );
        // With an evaluation stop, the cap is not.
        let stop_at = |cap: usize| {
            let mut g = GenRequest::greedy(vec![1, 2, 3], cap);
            g.eval_stop = Some(4);
            RecordingKey::of(&g)
        };
        assert_eq!(stop_at(4), stop_at(512));
        assert_ne!(stop_at(4), key(4));
        // Stop strings end a request early: part of the key, and written only when present.
        let mut g = GenRequest::greedy(vec![1, 2, 3], 4);
        g.stop = crate::stop::StopStrings::new(vec!["\n".into()]).unwrap();
        assert_ne!(RecordingKey::of(&g), key(4));
        assert!(!serde_json::to_string(&key(4)).unwrap().contains("stop"));
        let with = Recording {
            tokens: vec![5, 6],
            events: Some(vec![PredictorEvent {
                generated: 0,
                probs: vec![1.0],
                prompt: None,
            }]),
        };
        r.insert(key(4), with.clone());
        assert_eq!(*r.get(&key(4), true).unwrap(), with);
        // A later recording without outputs does not replace it.
        r.insert(
            key(4),
            Recording {
                tokens: vec![5, 6],
                events: None,
            },
        );
        assert_eq!(*r.get(&key(4), false).unwrap(), with);
        assert_eq!(r.len(), 1);
        assert_eq!(r.hits(), 3, "every get that found a usable recording");
    }

    #[test]
    fn a_recorder_keeps_its_outputs_only_for_an_engine_with_a_predictor() {
        let recs = Arc::new(Recordings::new());
        let event = PredictorEvent {
            generated: 0,
            probs: vec![0.5, 0.5],
            prompt: None,
        };
        let mut without = Recorder::new(recs.clone(), key(4));
        without.push(event.clone());
        without.finish(vec![5, 6], false);
        assert_eq!(recs.get(&key(4), false).unwrap().events, None);
        let mut with = Recorder::new(recs.clone(), key(4));
        with.push(event.clone());
        with.finish(vec![5, 6], true);
        let rec = recs.get(&key(4), true).unwrap();
        assert_eq!(
            (rec.tokens.clone(), rec.events.clone()),
            (vec![5, 6], Some(vec![event]))
        );
    }

    #[test]
    fn replay_hands_out_outputs_in_order_and_names_a_mismatch() {
        let rec = Arc::new(Recording {
            tokens: vec![7, 8, 9],
            events: Some(vec![
                PredictorEvent {
                    generated: 0,
                    probs: vec![0.5, 0.5],
                    prompt: Some(vec![0.9, 0.1]),
                },
                PredictorEvent {
                    generated: 8,
                    probs: vec![0.25, 0.75],
                    prompt: None,
                },
            ]),
        });
        let mut rp = Replay::new(rec);
        assert_eq!(rp.token(2), Some(9));
        assert_eq!(rp.token(3), None);
        let start = rp.next_event(0).unwrap();
        assert_eq!(start.probs, [0.5, 0.5]);
        assert_eq!(start.prompt.as_deref(), Some(&[0.9, 0.1][..]));
        let err = rp.next_event(4).unwrap_err();
        assert!(err.contains("after 8 tokens"), "{err}");
        assert_eq!(rp.next_event(8).unwrap().probs, [0.25, 0.75]);
        assert!(rp.next_event(16).is_err());
    }
}
