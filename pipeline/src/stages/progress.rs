//! [`Steps`]: progress on the terminal for a stage's long steps whose length is not known in
//! advance (a download, scoring, the BERT baselines, plots): a spinner naming the step, with
//! the time spent on it. When stderr is not a terminal the spinner is hidden and each step is
//! one plain line, as the logs had it.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner over a stage's steps.
pub struct Steps {
    bar: ProgressBar,
}

impl Steps {
    /// A spinner (hidden when stderr is not a terminal), ticking on its own.
    pub fn new() -> Self {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    /// Starts the step `what` (a plain line when the spinner is hidden).
    pub fn step(&self, what: impl Into<String>) {
        let what = what.into();
        if self.bar.is_hidden() {
            eprintln!("{what}");
        }
        self.bar.reset_elapsed();
        self.bar.set_message(what);
    }
}

impl Default for Steps {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
