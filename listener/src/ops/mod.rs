//! Operating a listener: the admin HTTP server, metrics, traces, and the status and slot queries
//! behind `listener status` and `listener slot drop`.

pub mod admin;
pub mod database_figures;
pub mod handler_metrics;
pub mod metrics;
pub mod operations;
pub mod traces;
