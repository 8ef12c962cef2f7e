//! trail's one integration-test binary.
