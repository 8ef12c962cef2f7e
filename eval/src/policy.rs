//! Single-server scheduling policies, each as a SOAP rank (lower rank is served first; ties go
//! to the earlier arrival).

use crate::Error;

/// A scheduling policy of the M/G/1 queue.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Policy {
    /// First come, first served (constant rank).
    Fcfs,
    /// Shortest remaining processing time on true sizes: rank x − a.
    Srpt,
    /// Shortest predicted remaining processing time: rank y − a.
    Sprpt,
    /// SPRPT with limited preemption (TRAIL): rank y − a while the attained service
    /// a ≤ c·y, −∞ (never preempted) once a > c·y.
    SprptLimited { c: f64 },
    /// Non-preemptive shortest predicted job first (SPRPT-limited with c = 0).
    SjfPredicted,
}

impl Policy {
    /// A short, stable name for tables and file names.
    pub fn name(&self) -> String {
        match self {
            Self::Fcfs => "fcfs".into(),
            Self::Srpt => "srpt".into(),
            Self::Sprpt => "sprpt".into(),
            Self::SprptLimited { c } => format!("sprpt-limited(c={c})"),
            Self::SjfPredicted => "sjf-predicted".into(),
        }
    }

    /// How a paper names it (plot legends).
    pub fn label(&self) -> String {
        match self {
            Self::Fcfs => "FCFS".into(),
            Self::Srpt => "SRPT".into(),
            Self::Sprpt => "SPRPT".into(),
            Self::SprptLimited { c } => format!("SPRPT, limited preemption (c = {c})"),
            Self::SjfPredicted => "SJF (predicted)".into(),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        if let Self::SprptLimited { c } = *self {
            if c.is_nan() {
                return Err(Error::NotFinite("c".into()));
            }
            if c < 0.0 {
                return Err(Error::BadParameter(format!("c must be >= 0, got {c}")));
            }
        }
        Ok(())
    }

    /// The preemption limit c (∞ for fully preemptive SRPT/SPRPT; 0 for SJF), or `None` for
    /// FCFS. SRPT is SPRPT with y = x.
    pub(crate) fn limit(&self) -> Option<f64> {
        match *self {
            Self::Fcfs => None,
            Self::Srpt | Self::Sprpt => Some(f64::INFINITY),
            Self::SprptLimited { c } => Some(c),
            Self::SjfPredicted => Some(0.0),
        }
    }

    /// Whether the policy ranks by the true size instead of the prediction.
    pub(crate) fn uses_true_size(&self) -> bool {
        matches!(self, Self::Srpt)
    }

    /// The rank of a job with (size x, prediction y) at attained service `a`.
    pub fn rank(&self, x: f64, y: f64, a: f64) -> f64 {
        match self.limit() {
            None => 0.0,
            Some(c) => {
                let y = if self.uses_true_size() { x } else { y };
                if c.is_infinite() || a <= c * y {
                    y - a
                } else {
                    f64::NEG_INFINITY
                }
            }
        }
    }
}
