//! The replication connection: startup and authentication, simple queries on a
//! `replication=database` walsender, slot management, and CopyBoth streaming of XLogData and
//! keepalives with standby status updates.
//!
//! Framing comes from `postgres-protocol`; its `Message::parse` does not know `W`
//! (CopyBothResponse), so frames are classified by their header first.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use openssl::ssl::SslConnector;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

pub use super::copy_data::{now_pg_micros, parse_copy_data, pg_micros_to_utc, ReplicationMessage};
use crate::error::{Error, ServerError};
use crate::lsn::Lsn;
use crate::postgres::tls::{SslMode, Transport};

/// The largest server frame accepted (its length field, which counts itself). The server
/// builds each message in a buffer capped at 1 GB (`MaxAllocSize`), so no honest frame is
/// longer, however large the event (its whole row, payload and metadata included, must fit that
/// buffer); 1 MB more covers the message headers. A longer announced length is a broken or
/// hostile peer, refused before anything is allocated for it.
const MAX_FRAME_LEN: usize = (1 << 30) + (1 << 20);

/// Bytes reserved ahead of a long frame's data at a time: the buffer grows with what arrives,
/// not with what the header announces.
const FRAME_RESERVE: usize = 1 << 20;

/// Where and as whom to connect. `Debug` leaves the password out.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
    /// Database.
    pub dbname: String,
    /// `application_name`.
    pub application_name: String,
    /// Limit for TCP connect plus authentication.
    pub connect_timeout: Duration,
    /// TLS mode.
    pub sslmode: SslMode,
    /// Connector for TLS (`None` when `sslmode` is `disable`).
    pub tls: Option<SslConnector>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("sslmode", &self.sslmode)
            .finish_non_exhaustive()
    }
}

/// A frame from the server.
enum Frame {
    /// `W`: CopyBothResponse; streaming has started.
    CopyBoth,
    /// Anything `postgres-protocol` parses.
    Message(backend::Message),
}

/// One row of a simple query result, as text.
pub type TextRow = Vec<Option<String>>;

/// `IDENTIFY_SYSTEM` result.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    /// Cluster identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database of this connection.
    pub dbname: Option<String>,
}

/// Outcome of [`ReplicationConnection::create_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Another session created it between our lookup and our `CREATE_REPLICATION_SLOT`.
    CreatedConcurrently,
    /// We created it; streaming can start at its consistent point.
    Created(Lsn),
}

/// A `replication=database` connection.
pub struct ReplicationConnection {
    // One stream, not split halves: reads and writes never overlap (a `select!` drops the
    // pending read before running a branch that writes), and splitting would add a lock per I/O.
    pub(super) transport: Box<dyn Transport>,
    pub(super) inbuf: BytesMut,
    pub(super) outbuf: BytesMut,
    pub(super) streaming: bool,
}

/// How long a slot that another session is creating is waited for (its creation waits for the
/// transactions running at the time to end).
const SLOT_CREATION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl ReplicationConnection {
    /// Runs one statement with the simple query protocol and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
        context: &'static str,
    ) -> Result<Vec<TextRow>, Error> {
        if self.streaming {
            return Err(Error::Protocol("simple query while streaming".into()));
        }
        frontend::query(sql, &mut self.outbuf).map_err(Error::ConnectionLost)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.read_message(context).await {
                Ok(backend::Message::DataRow(row)) => {
                    let buf = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next().map_err(Error::ConnectionLost)? {
                        values.push(match range {
                            Some(r) => Some(
                                std::str::from_utf8(buf.get(r).ok_or_else(|| {
                                    Error::Protocol("data row range out of bounds".into())
                                })?)
                                .map_err(|_| Error::Protocol("non-UTF-8 text value".into()))?
                                .to_string(),
                            ),
                            None => None,
                        });
                    }
                    rows.push(values);
                }
                Ok(backend::Message::ReadyForQuery(_)) => break,
                Ok(backend::Message::NoticeResponse(body)) => log_notice(body.fields()),
                Ok(_) => {}
                // The server follows an ErrorResponse with ReadyForQuery; read up to it so the
                // connection stays usable, and report the first error.
                Err(err @ Error::Server { .. }) => failure = failure.or(Some(err)),
                Err(err) => return Err(err),
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, Error> {
        let rows = self
            .simple_query("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM")
            .await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 4)
            .ok_or_else(|| Error::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row[i].clone().unwrap_or_default();
        Ok(SystemInfo {
            system_id: field(0),
            timeline: field(1)
                .parse()
                .map_err(|_| Error::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            xlogpos: field(2)
                .parse()
                .map_err(|_| Error::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?,
            dbname: row[3].clone(),
        })
    }

    /// Looks up logical slot `slot`: `None` when it does not exist, else its confirmed position.
    /// A slot of another plugin or database, or a lost one, is a definite error.
    pub async fn find_slot(
        &mut self,
        slot: &str,
        dbname: &str,
    ) -> Result<Option<Option<Lsn>>, Error> {
        let slot_error = |problem: String| Error::Slot {
            name: slot.to_string(),
            problem,
        };
        let query = format!(
            "SELECT plugin, database, slot_type, wal_status, confirmed_flush_lsn, {} \
             FROM pg_catalog.pg_replication_slots s WHERE slot_name = {}",
            crate::replication::retention::INVALIDATION_REASON,
            postgres_protocol::escape::escape_literal(slot)
        );
        // A slot another listener is creating shows as logical with no plugin yet until its
        // CREATE_REPLICATION_SLOT finishes: wait for it rather than call it foreign.
        let deadline = tokio::time::Instant::now() + SLOT_CREATION_WAIT;
        let rows = loop {
            let rows = self
                .simple_query(&query, "looking up the replication slot")
                .await?;
            let being_created = rows.first().is_some_and(|row| {
                row.get(2).cloned().flatten().as_deref() == Some("logical")
                    && row
                        .first()
                        .cloned()
                        .flatten()
                        .unwrap_or_default()
                        .is_empty()
            });
            if !being_created || tokio::time::Instant::now() >= deadline {
                break rows;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let get = |i: usize| row.get(i).cloned().flatten();
        if get(2).as_deref() != Some("logical") || get(0).as_deref() != Some("pgoutput") {
            return Err(slot_error(format!(
                "exists but is not a logical pgoutput slot (type {:?}, plugin {:?}); choose \
                 another replication.slot",
                get(2),
                get(0)
            )));
        }
        if get(1).as_deref() != Some(dbname) {
            return Err(slot_error(format!(
                "belongs to database {:?}, not {dbname:?}; slots are per database",
                get(1)
            )));
        }
        if get(3).as_deref() == Some("lost") {
            return Err(crate::replication::retention::slot_lost(
                slot,
                crate::replication::retention::invalidated(get(5).as_deref()),
            ));
        }
        Ok(Some(get(4).and_then(|s| s.parse().ok())))
    }

    /// Creates logical slot `slot` with `pgoutput`. When another listener created it first, that
    /// slot is used.
    pub async fn create_slot(&mut self, slot: &str) -> Result<SlotState, Error> {
        let create_sql =
            format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'nothing')");
        // Postgres must see every transaction running now end before the slot is consistent;
        // say so, or a long transaction elsewhere looks like a hung listener.
        info!(
            slot,
            "creating the replication slot (waits for transactions running now to end)"
        );
        match self
            .simple_query(&create_sql, "creating the replication slot")
            .await
        {
            Ok(rows) => {
                let consistent_point = rows
                    .first()
                    .and_then(|r| r.get(1).cloned().flatten())
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        Error::Protocol(
                            "CREATE_REPLICATION_SLOT returned no consistent point".into(),
                        )
                    })?;
                info!(slot, lsn = %consistent_point, "created the replication slot");
                Ok(SlotState::Created(consistent_point))
            }
            // Created concurrently between our lookup and our CREATE: fine.
            Err(Error::Server { error, .. }) if error.code == "42710" => {
                Ok(SlotState::CreatedConcurrently)
            }
            Err(err) => Err(err),
        }
    }

    /// `START_REPLICATION` from `start` (the server starts at its confirmed position when that is
    /// later) and waits for CopyBothResponse.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<(), Error> {
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} \
             (proto_version '1', publication_names '{publication}', messages 'true')"
        );
        frontend::query(&sql, &mut self.outbuf).map_err(Error::ConnectionLost)?;
        self.send().await?;
        loop {
            match self.read_frame().await? {
                Frame::CopyBoth => {
                    self.streaming = true;
                    return Ok(());
                }
                Frame::Message(backend::Message::ErrorResponse(body)) => {
                    let error = server_error(body.fields())?;
                    return Err(match error.code.as_str() {
                        "42704" => crate::replication::retention::slot_lost(
                            slot,
                            format!("disappeared (was it dropped?): {error}"),
                        ),
                        // Invalidated between our lookup and now: 15 to 17 say "This slot has
                        // been invalidated because …", 18 "This replication slot has been
                        // invalidated due to \"wal_removed\"": the error names the cause.
                        "55000"
                            if error
                                .detail
                                .as_deref()
                                .is_some_and(|d| d.contains("invalidated")) =>
                        {
                            crate::replication::retention::slot_lost(
                                slot,
                                format!("has been invalidated ({error})"),
                            )
                        }
                        "55000" => Error::Slot {
                            name: slot.to_string(),
                            problem: format!("cannot be used: {error}"),
                        },
                        _ => Error::Server {
                            context: "START_REPLICATION",
                            error,
                        },
                    });
                }
                Frame::Message(backend::Message::NoticeResponse(body)) => log_notice(body.fields()),
                Frame::Message(backend::Message::ParameterStatus(_)) => {}
                Frame::Message(_) => {
                    return Err(Error::Protocol(
                        "unexpected reply to START_REPLICATION".into(),
                    ))
                }
            }
        }
    }

    /// Next replication message; `Ok(None)` when the server ended the copy.
    ///
    /// Cancel-safe: partial input stays buffered, so this can sit in a `select!`.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, Error> {
        loop {
            let message = match self.read_frame().await? {
                Frame::Message(m) => m,
                Frame::CopyBoth => return Err(Error::Protocol("second CopyBothResponse".into())),
            };
            match message {
                backend::Message::CopyData(body) => {
                    return parse_copy_data(body.into_bytes()).map(Some)
                }
                // A walsender that shuts down (server stop, or after we confirmed everything it
                // sent) ends the stream with CommandComplete ("COPY 0") instead of CopyDone.
                backend::Message::CopyDone | backend::Message::CommandComplete(_) => {
                    self.streaming = false;
                    return Ok(None);
                }
                backend::Message::ErrorResponse(body) => {
                    let error = server_error(body.fields())?;
                    return Err(Error::Server {
                        context: "replication stream",
                        error,
                    });
                }
                backend::Message::NoticeResponse(body) => log_notice(body.fields()),
                backend::Message::ParameterStatus(_) => {}
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {} while streaming",
                        describe(&other)
                    )))
                }
            }
        }
    }

    /// Sends a standby status update (`r`) reporting `lsn` as written, flushed and applied.
    pub async fn send_status(&mut self, lsn: Lsn, reply_requested: bool) -> Result<(), Error> {
        let mut payload = [0u8; 34];
        let mut out = &mut payload[..];
        out.put_u8(b'r');
        out.put_u64(lsn.0);
        out.put_u64(lsn.0);
        out.put_u64(lsn.0);
        out.put_i64(now_pg_micros());
        out.put_u8(u8::from(reply_requested));
        let data = frontend::CopyData::new(&payload[..]).map_err(Error::ConnectionLost)?;
        data.write(&mut self.outbuf);
        self.send().await
    }

    /// Ends streaming cleanly: CopyDone, drain what the server still sends up to its
    /// ReadyForQuery (bounded by `timeout`), then Terminate.
    pub async fn close(mut self, timeout: Duration) {
        if self.streaming {
            frontend::copy_done(&mut self.outbuf);
            if self.send().await.is_err() {
                return;
            }
            let drain = async {
                loop {
                    match self.read_frame().await {
                        Ok(Frame::Message(backend::Message::ReadyForQuery(_))) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            if tokio::time::timeout(timeout, drain).await.is_err() {
                debug!("server did not finish the copy in time; closing anyway");
            }
        }
        frontend::terminate(&mut self.outbuf);
        let _ = self.send().await;
        let _ = self.transport.shutdown().await;
    }

    pub(super) async fn send(&mut self) -> Result<(), Error> {
        let out = self.outbuf.split();
        self.transport
            .write_all(&out)
            .await
            .map_err(Error::ConnectionLost)
    }

    /// Reads a non-CopyBoth message, turning ErrorResponse into [`Error::Server`].
    pub(super) async fn read_message(
        &mut self,
        context: &'static str,
    ) -> Result<backend::Message, Error> {
        match self.read_frame().await? {
            Frame::Message(backend::Message::ErrorResponse(body)) => Err(Error::Server {
                context,
                error: server_error(body.fields())?,
            }),
            Frame::Message(m) => Ok(m),
            Frame::CopyBoth => Err(Error::Protocol(format!(
                "unexpected CopyBothResponse ({context})"
            ))),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(header) = backend::Header::parse(&self.inbuf)
                .map_err(|e| Error::Protocol(format!("malformed message header: {e}")))?
            {
                let len = header.len() as usize;
                if len > MAX_FRAME_LEN {
                    return Err(Error::Protocol(format!(
                        "the server announced a {len}-byte message (tag {:?}), more than the \
                         {MAX_FRAME_LEN} bytes any message can have",
                        char::from(header.tag())
                    )));
                }
                let total = len + 1;
                if self.inbuf.len() >= total {
                    if header.tag() == b'W' {
                        self.inbuf.advance(total);
                        return Ok(Frame::CopyBoth);
                    }
                    return match backend::Message::parse(&mut self.inbuf) {
                        Ok(Some(message)) => Ok(Frame::Message(message)),
                        Ok(None) => Err(Error::Protocol(
                            "incomplete frame after length check".into(),
                        )),
                        Err(e) => Err(Error::Protocol(format!("malformed backend message: {e}"))),
                    };
                }
                self.inbuf
                    .reserve((total - self.inbuf.len()).min(FRAME_RESERVE));
            }
            if self.inbuf.capacity() - self.inbuf.len() < 8 * 1024 {
                self.inbuf.reserve(64 * 1024);
            }
            let n = self
                .transport
                .read_buf(&mut self.inbuf)
                .await
                .map_err(Error::ConnectionLost)?;
            if n == 0 {
                return Err(Error::ConnectionLost(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }
}

/// Names a backend message for error messages.
fn describe(message: &backend::Message) -> &'static str {
    match message {
        backend::Message::CommandComplete(_) => "CommandComplete",
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::RowDescription(_) => "RowDescription",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::EmptyQueryResponse => "EmptyQueryResponse",
        backend::Message::NotificationResponse(_) => "NotificationResponse",
        backend::Message::CopyOutResponse(_) => "CopyOutResponse",
        backend::Message::CopyInResponse(_) => "CopyInResponse",
        backend::Message::BackendKeyData(_) => "BackendKeyData",
        _ => "backend message",
    }
}

fn server_error(mut fields: backend::ErrorFields<'_>) -> Result<Box<ServerError>, Error> {
    let mut error = Box::new(ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    });
    while let Some(field) = fields.next().map_err(Error::ConnectionLost)? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => error.severity = value,
            b'S' if error.severity.is_empty() => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    Ok(error)
}

pub(super) fn log_notice(fields: backend::ErrorFields<'_>) {
    match server_error(fields) {
        Ok(notice) => debug!(code = %notice.code, message = %notice.message, "server notice"),
        Err(err) => warn!(error = %err, "unreadable server notice"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(transport: tokio::io::DuplexStream) -> ReplicationConnection {
        ReplicationConnection {
            transport: Box::new(transport),
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            streaming: false,
        }
    }

    fn header(tag: u8, len: u32) -> [u8; 5] {
        let [a, b, c, d] = len.to_be_bytes();
        [tag, a, b, c, d]
    }

    #[tokio::test]
    async fn an_oversized_frame_is_a_protocol_error_before_anything_is_allocated() {
        for len in [MAX_FRAME_LEN as u32 + 1, i32::MAX as u32] {
            let (mut server, client) = tokio::io::duplex(1024);
            let mut conn = connection(client);
            server.write_all(&header(b'd', len)).await.unwrap();
            let result = tokio::time::timeout(Duration::from_secs(5), conn.read_frame())
                .await
                .expect("an answer at once, not a wait for the announced bytes");
            match result {
                Err(err @ Error::Protocol(_)) => {
                    assert!(!err.is_transient());
                    assert!(err.to_string().contains(&len.to_string()), "{err}");
                }
                Err(other) => panic!("{other:?}"),
                Ok(_) => panic!("a frame"),
            }
            assert!(
                conn.inbuf.capacity() <= 64 * 1024,
                "{}",
                conn.inbuf.capacity()
            );
        }
        // A length below its own four bytes is as broken.
        let (mut server, client) = tokio::io::duplex(1024);
        let mut conn = connection(client);
        server.write_all(&header(b'd', 3)).await.unwrap();
        assert!(matches!(conn.read_frame().await, Err(Error::Protocol(_))));
    }

    #[tokio::test]
    async fn a_long_frame_grows_the_buffer_with_its_data_and_a_split_one_parses() {
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let mut conn = connection(client);
        // 1 GB announced is allowed; nothing like it is reserved before the data comes.
        server.write_all(&header(b'd', 1 << 30)).await.unwrap();
        server.write_all(&[0; 1000]).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(200), conn.read_frame()).await;
        assert!(waiting.is_err(), "no frame before its data");
        assert!(
            conn.inbuf.capacity() <= 4 * FRAME_RESERVE,
            "{}",
            conn.inbuf.capacity()
        );

        let (mut server, client) = tokio::io::duplex(1024);
        let mut conn = connection(client);
        let read = tokio::spawn(async move {
            conn.read_frame()
                .await
                .map(|f| matches!(f, Frame::Message(backend::Message::ReadyForQuery(_))))
        });
        server.write_all(&header(b'Z', 5)[..3]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        server.write_all(&header(b'Z', 5)[3..]).await.unwrap();
        server.write_all(b"I").await.unwrap();
        assert!(read.await.unwrap().unwrap(), "ReadyForQuery");
    }
}
