//! The attack suite: each test starts its own luagate (the binary cargo
//! built, or `LUAGATE_ATTACK_BIN`) with its own config and open-file limit,
//! and its own testbed backends; replays one attack with bounded size and
//! duration; samples luagate's RSS and open descriptors from /proc while it
//! runs; and has an innocent client ask for a page every 100 ms, which must
//! be served, every time, within the stated latency. Attacks run one at a
//! time (they measure); the limit tests (`limits`) check each limit's exact
//! behaviour on the wire, beside each other.
//!
//! `cargo test --test attack -- --nocapture` prints each attack's figures.

mod attacks;
mod limits;
mod support;
