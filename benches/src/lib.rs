//! Criterion benches over the pure cores live in benches/benches/.
