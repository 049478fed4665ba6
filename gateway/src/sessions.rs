//! Session recordings (stub: being written).

pub mod cli;
