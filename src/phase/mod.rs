//! The request pipeline, phase by phase. `pipeline` is the one driver that
//! knows the order (route match → upstream → response → log); each other
//! module is one concern a phase uses.

pub mod body;
pub mod headers;
pub mod limit;
pub mod lua;
pub mod pipeline;
pub mod respond;
pub mod upgrade;
pub mod variable;
