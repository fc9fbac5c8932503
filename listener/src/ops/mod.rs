//! Operating a listener: the admin HTTP server, metrics, and the status and slot queries
//! behind `listener status` and `listener slot drop`.

pub mod admin;
pub mod metrics;
pub mod operations;
