//! TLS interception building blocks: the gateway's CA, on-the-fly leaf
//! certificates, and sniffing the first bytes of a connection.

pub mod ca;
pub mod sniff;

#[cfg(test)]
mod tests;
