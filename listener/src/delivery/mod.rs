//! Delivering events to handlers: the `Handler` contract and filters (`handler`), retry and
//! failure policies (`retry`), the registry, the item/ack contract with the readers (`item`),
//! the dispatcher and its worker tasks, dead letters and their redrive.

mod attempt;
pub mod dead_letter;
pub mod dispatch;
pub mod handler;
pub mod item;
pub(crate) mod redrive;
pub mod registry;
pub mod retry;
mod worker;
