//! trail-datasets: (skeleton, filled in by its issue).
