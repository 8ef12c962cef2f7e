//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod fetch;
pub mod sim;
