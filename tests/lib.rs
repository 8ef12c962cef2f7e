//! Shared helpers for the integration tests (`tests/it`).
