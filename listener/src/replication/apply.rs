//! The stream loop: reads the walsender's messages, applies pgoutput to the transaction state,
//! hands events and commits to the dispatcher (with backpressure), and confirms to the server
//! what the dispatcher acknowledged.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::delivery::dispatch::{Ack, Item, Undecodable};
use crate::error::Error;
use crate::event::{Decoded, EventDecoder, EventError};
use crate::lsn::Lsn;
use crate::replication::pgoutput::{self, PgOutputMessage};
use crate::replication::stream::{ReplicationConnection, ReplicationMessage};
use crate::replication::subscription::HEARTBEAT_PREFIX;

/// The stream loop's bookkeeping.
pub(crate) struct StreamState {
    decoder: EventDecoder,
    /// Inside Begin..Commit.
    in_txn: bool,
    /// Commit LSN of the current transaction (from Begin).
    commit_lsn: Lsn,
    /// Inserted rows seen so far in the current transaction.
    rows_in_txn: u64,
    /// End LSN of the last Commit handed to the dispatcher.
    last_commit: Lsn,
    /// Highest keepalive position: all WAL before it has been decoded and sent.
    server_wal_end: Lsn,
    /// Highest server WAL end seen in any message (XLogData included): for the lag metric only,
    /// never confirmed (WAL up to it may not have been decoded yet).
    server_wal_tip: Lsn,
    /// `replication_lag_bytes`.
    lag_gauge: ::metrics::Gauge,
    /// An item the full queue did not take yet; reading pauses until it is delivered.
    pending: Option<Item>,
    /// Last position sent in a status update, and when.
    last_sent: Lsn,
    last_sent_at: Instant,
    status_interval: Duration,
    /// When the server last sent anything (or we last resumed reading after backpressure).
    last_heard: Instant,
    /// Silence after which the connection counts as dead; zero disables the check.
    server_timeout: Duration,
    warned_relations: std::collections::HashSet<u32>,
}

impl StreamState {
    pub(crate) fn new(
        start: Lsn,
        status_interval: Duration,
        server_timeout: Duration,
    ) -> StreamState {
        StreamState {
            decoder: EventDecoder::default(),
            in_txn: false,
            commit_lsn: Lsn::ZERO,
            rows_in_txn: 0,
            last_commit: start,
            server_wal_end: start,
            server_wal_tip: start,
            lag_gauge: ::metrics::Gauge::noop(),
            pending: None,
            last_sent: Lsn::ZERO,
            last_sent_at: Instant::now(),
            status_interval,
            last_heard: Instant::now(),
            server_timeout,
            warned_relations: Default::default(),
        }
    }

    /// Reports the replication lag on `gauge`.
    pub(crate) fn with_lag_gauge(mut self, gauge: ::metrics::Gauge) -> StreamState {
        self.lag_gauge = gauge;
        self
    }

    /// Updates the lag metric: server WAL end minus the position last confirmed.
    fn record_lag(&mut self, wal_end: Lsn) {
        self.server_wal_tip = self.server_wal_tip.max(wal_end);
        // Nothing confirmed in this session yet: no meaningful difference to report.
        if self.last_sent > Lsn::ZERO {
            self.lag_gauge
                .set(self.server_wal_tip.0.saturating_sub(self.last_sent.0) as f64);
        }
    }

    /// The position we may confirm given the dispatcher's acknowledgement `acked`: the
    /// acknowledged commit, or, when every transaction received so far is handled and we are not
    /// inside one, the server's keepalive position (any later transaction commits beyond it).
    pub(crate) fn confirmable(&self, acked: Lsn) -> Lsn {
        if !self.in_txn && self.pending.is_none() && acked >= self.last_commit {
            acked.max(self.server_wal_end)
        } else {
            acked
        }
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        acked: Lsn,
        reply: bool,
    ) -> Result<(), Error> {
        let lsn = self.confirmable(acked).max(self.last_sent);
        conn.send_status(lsn, reply).await?;
        if lsn > self.last_sent {
            debug!(lsn = %lsn, "confirmed");
        }
        self.last_sent = lsn;
        self.last_sent_at = Instant::now();
        self.record_lag(lsn);
        Ok(())
    }

    /// Reads and forwards until `cancel` fires, then goes on reading up to the commit of a
    /// transaction in progress (so that a shutdown finishes it rather than abandoning it); stops
    /// at once when `abort` fires.
    pub(crate) async fn run(
        &mut self,
        conn: &mut ReplicationConnection,
        items: mpsc::Sender<Item>,
        mut acks: watch::Receiver<Ack>,
        cancel: &CancellationToken,
        abort: &CancellationToken,
        ack_interval_ms: u64,
    ) -> Result<(), Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(ack_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining = false;
        loop {
            if draining && !self.in_txn && self.pending.is_none() {
                debug!(lsn = %self.last_commit, "stopped reading at a transaction boundary");
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                _ = cancel.cancelled(), if !draining => {
                    draining = true;
                    if self.in_txn || self.pending.is_some() {
                        info!(
                            commit_lsn = %self.commit_lsn,
                            "shutting down: receiving the rest of the transaction in flight"
                        );
                    }
                }
                _ = items.closed() => return Ok(()), // the dispatcher stopped; its result says why
                permit = items.reserve(), if self.pending.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    if let Some(item) = self.pending.take() {
                        permit.send(item);
                    }
                    // We were not reading: the server's silence so far says nothing.
                    self.last_heard = Instant::now();
                }
                _ = tick.tick() => {
                    if !self.server_timeout.is_zero()
                        && self.pending.is_none()
                        && self.last_heard.elapsed() > self.server_timeout
                    {
                        // A half-open TCP connection (a vanished host, a dropped NAT entry)
                        // never errors on its own: give up on it and reconnect.
                        return Err(Error::ConnectionLost(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "no message from the server for {} s",
                                self.last_heard.elapsed().as_secs()
                            ),
                        )));
                    }
                    let acked = acks.borrow_and_update().lsn;
                    let due = self.last_sent_at.elapsed() >= self.status_interval;
                    if self.confirmable(acked) > self.last_sent || due {
                        // The periodic update asks for a reply: a live server answers with a
                        // keepalive, which keeps `last_heard` fresh on an idle stream.
                        self.send_status(conn, acked, due).await?;
                    }
                }
                message = conn.next_message(), if self.pending.is_none() => {
                    self.last_heard = Instant::now();
                    match message? {
                        None => return Err(Error::StreamEnded),
                        Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                            self.server_wal_end = self.server_wal_end.max(wal_end);
                            self.record_lag(wal_end);
                            if reply_requested {
                                let acked = acks.borrow_and_update().lsn;
                                self.send_status(conn, acked, false).await?;
                            }
                        }
                        Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                            self.record_lag(wal_end);
                            let decoded = pgoutput::decode(data)
                                .map_err(|source| Error::Decode { lsn: wal_start, source })?;
                            if let Some(item) = self.apply(decoded)? {
                                match items.try_send(item) {
                                    Ok(()) => {}
                                    Err(mpsc::error::TrySendError::Full(item)) => self.pending = Some(item),
                                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Updates the transaction state with one message; returns what to hand to the dispatcher.
    fn apply(&mut self, message: PgOutputMessage) -> Result<Option<Item>, Error> {
        match message {
            PgOutputMessage::Begin(begin) => {
                if self.in_txn {
                    return Err(Error::Protocol("Begin inside a transaction".into()));
                }
                self.in_txn = true;
                self.commit_lsn = begin.final_lsn;
                self.rows_in_txn = 0;
                Ok(None)
            }
            PgOutputMessage::Commit(commit) => {
                if !self.in_txn {
                    return Err(Error::Protocol("Commit outside a transaction".into()));
                }
                self.in_txn = false;
                self.last_commit = commit.end_lsn;
                Ok(Some(Item::Commit {
                    end_lsn: commit.end_lsn,
                }))
            }
            PgOutputMessage::Relation(relation) => {
                self.decoder
                    .relation(&relation)
                    .map_err(|source| Error::Event {
                        commit_lsn: self.commit_lsn,
                        source,
                    })?;
                Ok(None)
            }
            PgOutputMessage::Insert(insert) => {
                if !self.in_txn {
                    return Err(Error::Protocol("Insert outside a transaction".into()));
                }
                let row_index = self.rows_in_txn;
                self.rows_in_txn += 1;
                let decoded =
                    match self
                        .decoder
                        .decode_insert(insert.relation, &insert.new, self.commit_lsn)
                    {
                        Ok(decoded) => decoded,
                        // A bad value in one row: dead-letter that row, keep streaming.
                        Err(source @ EventError::Column { .. }) => {
                            let (id, position) =
                                self.decoder.identify(insert.relation, &insert.new);
                            return Ok(Some(Item::Undecodable(Box::new(Undecodable {
                                // Stable across redeliveries, so a replay updates the same row.
                                event_id: id.unwrap_or_else(|| {
                                    Uuid::from_u64_pair(self.commit_lsn.0, row_index)
                                }),
                                position: position.unwrap_or(0),
                                commit_lsn: self.commit_lsn,
                                error: source.to_string(),
                            }))));
                        }
                        // The relation itself is unknown: the stream is not what we understand.
                        Err(source) => {
                            return Err(Error::Event {
                                commit_lsn: self.commit_lsn,
                                source,
                            })
                        }
                    };
                match decoded {
                    Decoded::Event(event) => Ok(Some(Item::Event(event))),
                    Decoded::NotAnEvent(table) => {
                        if self.warned_relations.insert(insert.relation) {
                            warn!(table = %table, "the publication carries rows of a table that is not the event table; ignoring them");
                        }
                        Ok(None)
                    }
                }
            }
            PgOutputMessage::Update(change) => self.ignored(change.relation, "update"),
            PgOutputMessage::Delete(change) => self.ignored(change.relation, "delete"),
            PgOutputMessage::Truncate(truncate) => {
                debug!(relations = truncate.relations.len(), "ignoring a truncate");
                Ok(None)
            }
            PgOutputMessage::Message(message) => {
                if message.prefix == HEARTBEAT_PREFIX {
                    debug!(lsn = %message.lsn, "heartbeat");
                }
                Ok(None)
            }
            PgOutputMessage::Origin(_) | PgOutputMessage::Type(_) => Ok(None),
        }
    }

    fn ignored(&mut self, relation: u32, what: &'static str) -> Result<Option<Item>, Error> {
        // Events are immutable; an update or delete can only come from a publication that was
        // widened by hand. It carries no new event, so it is skipped, loudly once per table.
        if self.decoder.is_event_relation(relation) && self.warned_relations.insert(relation) {
            warn!(
                change = what,
                "ignoring a change that is not an insert on the event table"
            );
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    //! The stream loop against a scripted fake walsender: behaviour a real server cannot be made
    //! to show on demand (silence, an abrupt end of the copy).

    use super::*;
    use crate::postgres::tls::SslMode;
    use crate::replication::stream::ConnectOptions;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one length-prefixed frontend message (after the optional tag byte).
    async fn read_message(sock: &mut TcpStream, tagged: bool) -> (u8, Vec<u8>) {
        let tag = if tagged {
            sock.read_u8().await.expect("tag")
        } else {
            0
        };
        let len = sock.read_u32().await.expect("length") as usize;
        let mut body = vec![0; len - 4];
        sock.read_exact(&mut body).await.expect("body");
        (tag, body)
    }

    /// Accepts one connection, authenticates it, answers START_REPLICATION with
    /// CopyBothResponse, sends `then` after `delay`, and records the reply-requested flags of the
    /// standby status updates it receives.
    async fn fake_walsender(
        delay: Duration,
        then: Vec<u8>,
    ) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            read_message(&mut sock, false).await; // startup
                                                  // AuthenticationOk, ReadyForQuery(idle).
            sock.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
                .await
                .expect("auth");
            let (tag, _) = read_message(&mut sock, true).await;
            assert_eq!(tag, b'Q', "START_REPLICATION");
            // CopyBothResponse: text format, no columns.
            sock.write_all(&[b'W', 0, 0, 0, 7, 0, 0, 0])
                .await
                .expect("copy both");
            tokio::time::sleep(delay).await;
            sock.write_all(&then).await.expect("script");
            let mut reply_flags = Vec::new();
            while let Ok(tag) = sock.read_u8().await {
                let Ok(len) = sock.read_u32().await else {
                    break;
                };
                let mut body = vec![0; len as usize - 4];
                if sock.read_exact(&mut body).await.is_err() {
                    break;
                }
                if tag == b'd' && body.first() == Some(&b'r') {
                    reply_flags.push(body[33]);
                }
            }
            reply_flags
        });
        (port, task)
    }

    async fn run_against(port: u16, server_timeout: Duration) -> Result<(), Error> {
        let mut conn = ReplicationConnection::connect(&ConnectOptions {
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            password: None,
            dbname: "d".into(),
            application_name: "test".into(),
            connect_timeout: Duration::from_secs(5),
            sslmode: SslMode::Disable,
            tls: None,
        })
        .await?;
        conn.start_replication("s", "p", Lsn::ZERO).await?;
        let (items, _items_rx) = mpsc::channel(8);
        let (_acks_tx, acks_rx) = watch::channel(Ack::default());
        let mut state = StreamState::new(Lsn::ZERO, Duration::from_millis(100), server_timeout);
        let never = CancellationToken::new();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            state.run(&mut conn, items, acks_rx, &never, &never, 20),
        )
        .await
        .expect("the stream loop must not hang");
        drop(conn);
        result
    }

    #[tokio::test]
    async fn a_silent_server_is_a_lost_connection_after_asking_for_replies() {
        let (port, server) = fake_walsender(Duration::ZERO, Vec::new()).await;
        let started = Instant::now();
        let err = run_against(port, Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::ConnectionLost(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(err.is_transient());
        assert!(started.elapsed() >= Duration::from_millis(400));
        let reply_flags = server.await.expect("server");
        assert!(
            reply_flags.contains(&1),
            "periodic status updates must ask for a reply: {reply_flags:?}"
        );
    }

    #[tokio::test]
    async fn command_complete_ends_the_stream_transiently() {
        // A walsender that shuts down sends CommandComplete "COPY 0" instead of CopyDone.
        let mut script = vec![b'C', 0, 0, 0, 11];
        script.extend_from_slice(b"COPY 0\0");
        let (port, server) = fake_walsender(Duration::ZERO, script).await;
        let err = run_against(port, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StreamEnded), "{err}");
        assert!(err.is_transient());
        server.await.expect("server");
    }

    #[tokio::test]
    async fn keepalives_keep_a_quiet_stream_alive() {
        // A keepalive 300 ms in, with a 400 ms timeout: the connection survives it, so the
        // timeout trips 400 ms after the keepalive, not 400 ms after the start.
        let mut keepalive = vec![b'd', 0, 0, 0, 22, b'k'];
        keepalive.extend_from_slice(&[0; 8]); // wal end
        keepalive.extend_from_slice(&[0; 8]); // server time
        keepalive.push(0); // no reply requested
        let (port, server) = fake_walsender(Duration::from_millis(300), keepalive).await;
        let started = Instant::now();
        let err = run_against(port, Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ConnectionLost(_)), "{err:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "timed out {:?} after the start despite the keepalive",
            started.elapsed()
        );
        server.await.expect("server");
    }
}
