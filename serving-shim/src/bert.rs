//! [`BertPredictor`]: each request's initial total-length prediction from its prompt, by the
//! exported fine-tuned BERT ([`BertPrior`], the `bert.safetensors` of `trail export --bert`), as
//! in the paper. It runs on its own thread, off the engine thread: prompts that arrive while it
//! works are predicted together in its next batch (up to [`MAX_BATCH`]). The HTTP front end
//! awaits a request's prediction before submitting it, so `sjf-bert`, `sprpt` and `trail` order
//! the waiting queue by it; the engine keeps it as the request's first prediction (the one
//! TRAIL's limit `c` applies to).

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use trail_checkpoints::prior::BertPrior;

use crate::error::EngineError;

/// Most prompts predicted in one BERT forward.
pub const MAX_BATCH: usize = 32;

struct Job {
    text: String,
    /// The request's `max_tokens`: what BERT's cap class (v2) reads out.
    cap: u32,
    reply: oneshot::Sender<Result<f64, String>>,
}

/// The fine-tuned BERT on its own thread (see the module docs).
pub struct BertPredictor {
    tx: Option<std_mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for BertPredictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertPredictor")
            .field("path", &self.path)
            .finish()
    }
}

impl BertPredictor {
    /// Loads `path` (`bert.safetensors` from `trail export --bert`) and starts its thread.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::new(BertPrior::load(path)?, path)
    }

    /// Starts the thread over a loaded `prior` (`path` names it in diagnostics).
    pub fn new(prior: BertPrior, path: &Path) -> Result<Self, EngineError> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("trail-bert".into())
            .spawn(move || serve(&prior, &rx))
            .map_err(|e| EngineError::Stopped(format!("cannot start the BERT thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    fn send(
        &self,
        text: String,
        cap: u32,
    ) -> Result<oneshot::Receiver<Result<f64, String>>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(Job { text, cap, reply }).ok())
            .ok_or_else(|| EngineError::Stopped("the BERT thread is gone".into()))?;
        Ok(rx)
    }

    /// The predicted total output length of the request whose user message is `text` and
    /// whose client capped it at `cap` tokens (a v2 BERT's cap class reads out that cap).
    pub async fn predict(&self, text: String, cap: u32) -> Result<f64, EngineError> {
        let rx = self.send(text, cap)?;
        finish(rx.await)
    }

    /// [`predict`](Self::predict) for callers outside an async runtime.
    pub fn predict_blocking(&self, text: String, cap: u32) -> Result<f64, EngineError> {
        let rx = self.send(text, cap)?;
        finish(rx.blocking_recv())
    }
}

impl Drop for BertPredictor {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn finish(r: Result<Result<f64, String>, oneshot::error::RecvError>) -> Result<f64, EngineError> {
    r.map_err(|_| EngineError::Stopped("the BERT thread is gone".into()))?
        .map_err(EngineError::Predictor)
}

/// The thread: waits for a prompt, takes every prompt queued meanwhile (up to [`MAX_BATCH`])
/// and predicts them in one forward.
fn serve(prior: &BertPrior, rx: &std_mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        let caps: Vec<u32> = jobs.iter().map(|j| j.cap).collect();
        match prior.predict_capped(&texts, &caps, MAX_BATCH) {
            Ok(lengths) => {
                for (j, len) in jobs.into_iter().zip(lengths) {
                    let _ = j.reply.send(Ok(len));
                }
            }
            Err(e) => {
                let msg = format!("BERT: {e}");
                tracing::error!("{msg}");
                for j in jobs {
                    let _ = j.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
