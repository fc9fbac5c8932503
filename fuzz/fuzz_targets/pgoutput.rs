//! The replication stream's decoders on arbitrary bytes: the CopyData framing
//! (`stream::parse_copy_data`), the pgoutput decoder (`pgoutput::decode`) and the event decoding on
//! top of it (`event::EventDecoder`). Whatever the bytes, each returns a value or an error; a panic,
//! an overflow or a runaway allocation is a bug.
//!
//! One input holds one or more messages separated by [`SEPARATOR`], so a fuzzed Relation message
//! shapes the rows that follow it. The decoder starts out knowing the real event table (a PG 15
//! capture), so fuzzed inserts reach the event decoding from the first message on.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use listener::event::{Decoded, EventDecoder};
use listener::pgoutput::{decode, OldTuple, PgOutputMessage};
use listener::stream::{parse_copy_data, ReplicationMessage};
use listener::Lsn;

/// Separates the messages of one input.
const SEPARATOR: &[u8] = b"\n--pgoutput--\n";

/// The Relation message of `domain_events.event`, captured from PostgreSQL 15.
const EVENT_RELATION: &[u8] = include_bytes!("../../listener/tests/fixtures/04-relation-event.bin");

fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(at) => {
                let frame = &data[..at];
                data = &data[at + SEPARATOR.len()..];
                Some(frame)
            }
            None => Some(std::mem::take(&mut data)),
        }
    })
}

fn event_decoder() -> EventDecoder {
    let mut decoder = EventDecoder::default();
    let Ok(PgOutputMessage::Relation(relation)) = decode(Bytes::from_static(EVENT_RELATION)) else {
        panic!("the captured event relation no longer decodes");
    };
    decoder
        .relation(&relation)
        .expect("the captured event relation has every event column");
    decoder
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = event_decoder();
    let mut commit_lsn = Lsn(1);
    for frame in frames(data) {
        // The frame as the CopyData that carries it: an XLogData wraps one pgoutput message.
        if let Ok(ReplicationMessage::XLogData { data, .. }) =
            parse_copy_data(Bytes::copy_from_slice(frame))
        {
            let _ = decode(data);
        }
        let Ok(message) = decode(Bytes::copy_from_slice(frame)) else {
            continue;
        };
        match message {
            PgOutputMessage::Begin(begin) => commit_lsn = begin.final_lsn,
            PgOutputMessage::Relation(relation) => {
                let _ = decoder.relation(&relation);
            }
            PgOutputMessage::Insert(insert) => {
                let _ = decoder.identify(insert.relation, &insert.new);
                if let Ok(Decoded::Event(event)) =
                    decoder.decode_insert(insert.relation, &insert.new, commit_lsn)
                {
                    // What handlers do with an event: serialize it, parse its payload.
                    serde_json::to_vec(&event).expect("a decoded event serializes");
                    let _ = event.payload_as::<serde_json::Value>();
                }
            }
            PgOutputMessage::Update(update) => {
                let _ = decoder.is_event_relation(update.relation);
                if let Some(OldTuple::Key(old) | OldTuple::Row(old)) = &update.old {
                    let _ = decoder.identify(update.relation, old);
                }
            }
            PgOutputMessage::Delete(delete) => {
                let (OldTuple::Key(old) | OldTuple::Row(old)) = &delete.old;
                let _ = decoder.identify(delete.relation, old);
            }
            _ => {}
        }
    }
});
