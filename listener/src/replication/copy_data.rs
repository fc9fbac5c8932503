//! The CopyData messages of a replication stream: XLogData and keepalives, and the server's
//! clock (Postgres-epoch microseconds).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};

use crate::error::Error;
use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A message received while streaming.
#[derive(Debug, Clone)]
pub enum ReplicationMessage {
    /// `w`: a chunk of logical decoding output (one pgoutput message).
    XLogData {
        /// WAL position of the data (0 for messages with no position, e.g. Relation).
        wal_start: Lsn,
        /// Server's current end of WAL.
        wal_end: Lsn,
        /// Server time, Postgres-epoch microseconds.
        server_time: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `k`: primary keepalive.
    Keepalive {
        /// Everything before this position has been decoded and sent by the server.
        wal_end: Lsn,
        /// Server time, Postgres-epoch microseconds.
        server_time: i64,
        /// The server wants a status update now (it will time us out otherwise).
        reply_requested: bool,
    },
}

/// Parses the content of a CopyData during streaming.
pub fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, Error> {
    let short = || Error::Protocol("truncated replication message".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let server_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(data.get_u64()),
                server_time: data.get_i64(),
                reply_requested: data.get_u8() != 0,
            })
        }
        tag => Err(Error::Protocol(format!(
            "unknown replication message tag {tag:#04x}"
        ))),
    }
}

/// Current time as Postgres-epoch microseconds.
pub fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

/// Converts Postgres-epoch microseconds to a UTC time.
pub fn pg_micros_to_utc(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_OFFSET_MICROS)?)
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x10);
        w.put_u64(0x20);
        w.put_i64(7);
        w.put_slice(b"B...");
        match parse_copy_data(w.freeze()).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                assert_eq!((wal_start, wal_end, server_time), (Lsn(0x10), Lsn(0x20), 7));
                assert_eq!(&data[..], b"B...");
            }
            other => panic!("{other:?}"),
        }
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x30);
        k.put_i64(9);
        k.put_u8(1);
        match parse_copy_data(k.freeze()).unwrap() {
            ReplicationMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            } => {
                assert_eq!(
                    (wal_end, server_time, reply_requested),
                    (Lsn(0x30), 9, true)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_copy_data(Bytes::from_static(b"k\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"w")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"x")).is_err());
        assert!(parse_copy_data(Bytes::new()).is_err());
    }

    #[test]
    fn pg_epoch_round_trips() {
        let now = now_pg_micros();
        let utc = pg_micros_to_utc(now).unwrap();
        assert!((chrono::Utc::now() - utc).num_seconds().abs() < 5);
        assert_eq!(
            pg_micros_to_utc(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
    }
}
