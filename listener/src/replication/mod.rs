//! Following committed events: the walsender client and its pgoutput decoder, the publication
//! and slot checks, the subscription row (durable position and delivered snapshot), slot safety,
//! hot standby, lost-slot recovery, and the notify-mode poller. It hands events to
//! [`crate::delivery`] as items and learns what was handled from its acknowledgements.

pub mod apply;
pub mod copy_data;
pub mod notify;
pub mod pgoutput;
pub mod publication;
pub mod recovery;
pub mod retention;
pub mod standby;
mod startup;
pub mod stream;
pub mod subscription;
