//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod export;
pub mod fetch;
pub mod report;
pub mod sim;
pub mod train;
