//! trail's one integration-test binary.

mod sim;
