//! criterion benches of claude-tower live in `benches/`; this library is empty.
//!
//! Run them with `cargo bench -p claude-benches`.
