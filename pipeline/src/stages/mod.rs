//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod engine_args;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod model_args;
pub mod predict;
pub mod predictor_args;
pub mod progress;
pub mod report;
pub mod run;
pub mod serve;
pub mod sim;
pub mod step_model;
pub mod train;
pub mod upgrade;
