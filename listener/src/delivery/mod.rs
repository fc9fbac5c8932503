//! Delivering events to handlers: the `Handler` contract, filters, retries, the registry, the
//! dispatcher and its workers, dead letters and their redrive.

pub mod dead_letter;
pub mod dispatch;
pub(crate) mod redrive;
