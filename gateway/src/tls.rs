//! TLS interception building blocks: the gateway's CA, on-the-fly leaf
//! certificates, and sniffing the first bytes of a connection.
// The interception pipeline (issue 4) wires this in.
#![cfg_attr(not(test), allow(dead_code))]

pub mod ca;
pub mod sniff;

#[cfg(test)]
mod tests;
