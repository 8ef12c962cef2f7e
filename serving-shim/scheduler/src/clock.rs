//! Time source of the scheduler: [`Clock`] gives seconds as `f64`.
//!
//! The scheduler reads time only through this trait, so a discrete-event simulator (or a test)
//! can drive it with a [`ManualClock`] while the engine uses the [`SystemClock`], or, with a
//! [`VirtualTime`], a [`ManualClock`] that each step moves by the [`StepTimeModel`]'s time.

use std::sync::Mutex;
use std::time::Instant;

use crate::steps::{StepShape, StepTimeModel};

/// A source of the current time in seconds.
pub trait Clock: Send + Sync {
    /// Seconds since an arbitrary origin fixed for the clock's lifetime.
    fn now(&self) -> f64;
}

/// Wall-clock time: seconds since the clock was created (monotonic).
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }
}

/// A clock that moves only when told to (tests and simulators).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Mutex<f64>,
}

impl ManualClock {
    /// A clock at time `t` seconds.
    pub fn at(t: f64) -> Self {
        Self { now: Mutex::new(t) }
    }

    /// Sets the time; it may not go backwards.
    ///
    /// # Panics
    /// When `t` is earlier than the current time.
    pub fn set(&self, t: f64) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        assert!(t >= *now, "ManualClock cannot go back from {} to {t}", *now);
        *now = t;
    }

    /// Moves the clock forward by `dt` seconds.
    pub fn advance(&self, dt: f64) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        assert!(dt >= 0.0, "ManualClock cannot advance by {dt}");
        *now += dt;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> f64 {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Virtual time for the engine: its clock starts at 0, moves by the step-time model's seconds
/// for each step's shape (the step's tokens are stamped at its end), and jumps to the next
/// arrival when the engine is idle. Latencies then depend on the schedule and the model, not on
/// how fast or how loaded the machine is while the cell runs; the forward passes, tokens and
/// predictions are real.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualTime {
    /// Step time by shape (fitted to a step log).
    pub model: StepTimeModel,
}

impl VirtualTime {
    /// Virtual time stepped by `model`.
    pub fn new(model: StepTimeModel) -> Self {
        Self { model }
    }

    /// Seconds a step of this shape takes on virtual time, its swaps included
    /// ([`StepTimeModel::step_secs`]).
    pub fn step_secs(&self, shape: &StepShape) -> f64 {
        self.model.step_secs(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at(1.5);
        assert_eq!(c.now(), 1.5);
        c.advance(0.25);
        assert_eq!(c.now(), 1.75);
        c.set(3.0);
        assert_eq!(c.now(), 3.0);
    }

    #[test]
    #[should_panic(expected = "cannot go back")]
    fn manual_clock_refuses_to_go_back() {
        ManualClock::at(2.0).set(1.0);
    }

    #[test]
    fn virtual_time_steps_by_the_model() {
        let model = StepTimeModel {
            per_swap_token_s: 0.03125,
            ..StepTimeModel::linear(0.5, 0.25, 0.125, 0.0625)
        };
        let vt = VirtualTime::new(model);
        let shape = |decode_rows, prefill_tokens, kv_tokens, swapped_tokens| StepShape {
            decode_rows,
            prefill_tokens,
            kv_tokens,
            swapped_tokens,
        };
        assert_eq!(vt.step_secs(&shape(2, 4, 8, 0)), 0.5 + 0.5 + 0.5 + 0.5);
        assert_eq!(vt.step_secs(&shape(2, 4, 8, 16)), 2.0 + 0.5);
        assert_eq!(vt.step_secs(&shape(3, 5, 7, 0)), model.predict(3, 5, 7));
        assert_eq!(
            VirtualTime::new(StepTimeModel::constant(1.0)).step_secs(&shape(9, 9, 9, 9)),
            1.0
        );
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let a = c.now();
        let b = c.now();
        assert!(a >= 0.0 && b >= a);
    }
}
