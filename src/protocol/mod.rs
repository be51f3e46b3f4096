//! Protocol knowledge the proxy needs beyond plain HTTP.

pub mod grpc;
pub mod uri;
