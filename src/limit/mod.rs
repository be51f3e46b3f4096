//! Limits shared by the layers that open connections.

pub mod fds;
