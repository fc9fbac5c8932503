//! The sink: records buffered by `handle`, produced per partition by `flush`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::options::{KafkaOptions, KafkaTls, TlsError, DEFAULT_MAX_MESSAGE_BYTES};
use super::record::record;
use super::topic::partition_for;
use crate::delivery::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// A record batch's header; each record adds its own framing (estimated by [`RECORD_OVERHEAD`]).
const BATCH_OVERHEAD: usize = 61;
/// Upper bound of a record's framing besides its key, value and header bytes (varint lengths,
/// attributes, deltas), so that a batch estimate never undershoots.
pub const RECORD_OVERHEAD: usize = 64;
/// Produce requests are kept under this size (estimated, with room for the request's own
/// headers and the topic name): the client writes a request's length prefix and its body as two
/// writes when the body does not fit its 8 KiB write buffer, and without `TCP_NODELAY` (the client
/// does not set it) the body then waits for the broker's delayed ACK of the prefix, about 40 ms
/// per request. Measured here: 0.2-0.4 ms per request up to 6 KiB, 44 ms from 9 KiB.
pub const SMALL_REQUEST_BYTES: usize = 8 * 1024 - 512;
/// Buffered bytes after which `handle` sends what it has instead of waiting for `flush`: a huge
/// transaction must not hold unbounded memory.
const BUFFER_LIMIT: usize = 8 * 1024 * 1024;

/// A topic's partitions, each with its client made on first use.
struct Route {
    topic: Arc<str>,
    partitions: Vec<OnceCell<Arc<PartitionClient>>>,
}

/// One record waiting for its broker ack.
struct Pending {
    /// The task (dispatcher worker) that handled it, whose flush answers for it.
    owner: Option<tokio::task::Id>,
    topic: Arc<str>,
    partition: i32,
    record: Record,
    size: usize,
    failures: u32,
}

/// Records waiting for their broker ack, in handling order.
#[derive(Default)]
struct Buffer {
    records: Vec<Pending>,
    bytes: usize,
}

impl Buffer {
    /// Appends a record; returns the bytes buffered now.
    fn push(&mut self, record: Pending) -> usize {
        self.bytes += record.size;
        self.records.push(record);
        self.bytes
    }

    fn take(&mut self) -> Vec<Pending> {
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }

    /// Puts records back before those buffered since they were taken.
    fn restore(&mut self, records: Vec<Pending>) {
        self.bytes += records.iter().map(|p| p.size).sum::<usize>();
        self.records.splice(0..0, records);
    }
}

/// One partition's records of a flush.
struct PartitionBatch {
    route: Arc<Route>,
    records: Vec<Pending>,
}

/// The outcome of producing one partition's records.
struct Produced {
    /// What was not acknowledged, in order.
    failed: Vec<Pending>,
    error: Option<HandlerError>,
    /// The connection is suspect: build a new client before the next attempt.
    reset: bool,
    /// The topic is unknown to the broker: look it up (and create it) again.
    forget_topic: bool,
}

/// Produces each event as a record: key = aggregate id, value = the event JSON, headers with
/// the event's identity, timestamp = `recorded_at`.
///
/// Records are buffered by [`Handler::handle`] and produced by [`Handler::flush`] (run before
/// the transaction is acknowledged): per partition in order, one batch after the other (each
/// acknowledged by all in-sync replicas, `acks = -1`), partitions in parallel. Anything not
/// acknowledged stays buffered and is produced again by the next flush, so a transaction is
/// confirmed only once the broker stored all of its records. A record produced again after a
/// lost ack may be stored twice: consumers deduplicate by the `event_id` header.
///
/// The client, topic checks and creation are made on first use: an unreachable broker is a
/// transient failure of the event at hand.
pub struct KafkaSink {
    options: KafkaOptions,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    routes: tokio::sync::Mutex<HashMap<String, Arc<Route>>>,
    pending: Mutex<Buffer>,
    /// Held while records are produced: with several workers, a flush must not return while
    /// another worker's flush still produces records this worker handled, and one partition's
    /// batches must not overtake each other.
    settling: tokio::sync::Mutex<()>,
}

impl KafkaSink {
    /// A sink for `options`; connects on first use. Reads the TLS files now: an unusable one
    /// is an error here, not at the first event.
    pub fn new(options: KafkaOptions) -> Result<KafkaSink, TlsError> {
        let tls = options
            .tls
            .as_ref()
            .map(KafkaTls::client_config)
            .transpose()?;
        Ok(KafkaSink {
            options,
            tls,
            client: tokio::sync::Mutex::new(None),
            routes: tokio::sync::Mutex::new(HashMap::new()),
            pending: Mutex::new(Buffer::default()),
            settling: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs a client call under the handler's timeout: the client's own retries stop at the
    /// same deadline, and a broker that accepts connections but never answers cannot hang us.
    async fn timed<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, HandlerError> {
        match tokio::time::timeout(self.options.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(what, e)),
            Err(_) => Err(HandlerError::timeout(format!(
                "{what}: no answer from the broker within {:?}",
                self.options.timeout
            ))),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, HandlerError> {
        let mut guard = self.client.lock().await;
        if let Some(client) = &*guard {
            return Ok(Arc::clone(client));
        }
        let o = &self.options;
        let mut builder = ClientBuilder::new(o.brokers.clone())
            .client_id("pg_domain_events-listener")
            .max_message_size(o.max_message_bytes.max(DEFAULT_MAX_MESSAGE_BYTES) * 2)
            .backoff_config(BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 3.0,
                deadline: Some(o.timeout),
            });
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(Arc::clone(tls));
        }
        let client = Arc::new(
            self.timed("cannot connect to Kafka", builder.build())
                .await?,
        );
        *guard = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Forgets the client and every partition client made from it.
    async fn reset(&self) {
        *self.client.lock().await = None;
        self.routes.lock().await.clear();
    }

    /// The topic's route: looked up once, the topic created when missing.
    async fn route(&self, topic: &str) -> Result<Arc<Route>, HandlerError> {
        let mut routes = self.routes.lock().await;
        if let Some(route) = routes.get(topic) {
            return Ok(Arc::clone(route));
        }
        let client = self.client().await?;
        let partitions = match self.partition_count(&client, topic).await? {
            Some(n) => n,
            None if self.options.create_topics => {
                self.create_topic(&client, topic).await?;
                self.partition_count(&client, topic).await?.ok_or_else(|| {
                    HandlerError::transient(format!("topic {topic} is not visible after creation"))
                })?
            }
            None => {
                return Err(HandlerError::transient(format!(
                    "topic {topic} does not exist and create_topics = false"
                )))
            }
        };
        let route = Arc::new(Route {
            topic: Arc::from(topic),
            partitions: (0..partitions).map(|_| OnceCell::new()).collect(),
        });
        routes.insert(topic.to_string(), Arc::clone(&route));
        Ok(route)
    }

    async fn partition_count(
        &self,
        client: &Client,
        topic: &str,
    ) -> Result<Option<usize>, HandlerError> {
        let topics = self
            .timed("cannot read the topic list", client.list_topics())
            .await?;
        Ok(topics
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions.len())
            .filter(|&n| n > 0))
    }

    async fn create_topic(&self, client: &Client, topic: &str) -> Result<(), HandlerError> {
        let o = &self.options;
        let controller = client
            .controller_client()
            .map_err(|e| classify("cannot reach the controller", e))?;
        let timeout_ms = o.timeout.as_millis().min(i32::MAX as u128) as i32;
        let created = self
            .timed(&format!("cannot create topic {topic}"), async {
                match controller
                    .create_topic(topic, o.partitions, o.replication_factor, timeout_ms)
                    .await
                {
                    // Another listener (or an operator) was first.
                    Err(KafkaError::ServerError {
                        protocol_error: ProtocolError::TopicAlreadyExists,
                        ..
                    }) => Ok(false),
                    created => created.map(|()| true),
                }
            })
            .await?;
        if created {
            info!(
                topic,
                partitions = o.partitions,
                replication_factor = o.replication_factor,
                "kafka topic created"
            );
        }
        Ok(())
    }

    async fn partition_client(
        &self,
        route: &Route,
        partition: i32,
    ) -> Result<Arc<PartitionClient>, HandlerError> {
        let cell = &route.partitions[partition as usize];
        let client = cell
            .get_or_try_init(|| async {
                let client = self.client().await?;
                self.timed(
                    "cannot reach the partition leader",
                    client.partition_client(
                        route.topic.to_string(),
                        partition,
                        UnknownTopicHandling::Retry,
                    ),
                )
                .await
                .map(Arc::new)
            })
            .await?;
        Ok(Arc::clone(client))
    }

    /// Produces one partition's records in order, in requests under [`SMALL_REQUEST_BYTES`]
    /// (a larger record alone in its request, up to `max_message_bytes`), stopping at the first
    /// failure (later batches must not overtake it).
    async fn produce_partition(
        &self,
        route: Arc<Route>,
        partition: i32,
        records: Vec<Pending>,
    ) -> Produced {
        let mut produced = Produced {
            failed: Vec::new(),
            error: None,
            reset: false,
            forget_topic: false,
        };
        let client = match self.partition_client(&route, partition).await {
            Ok(client) => client,
            Err(e) => {
                produced.reset = true;
                produced.error = Some(e);
                produced.failed = records;
                return produced;
            }
        };
        let limit = SMALL_REQUEST_BYTES
            .saturating_sub(route.topic.len())
            .min(self.options.max_message_bytes);
        let mut rest = records.into_iter().peekable();
        while rest.peek().is_some() {
            let mut batch = Vec::new();
            let mut size = BATCH_OVERHEAD;
            while let Some(next) = rest.peek() {
                if !batch.is_empty() && size + next.size > limit {
                    break;
                }
                size += next.size;
                batch.extend(rest.next());
            }
            let records = batch.iter().map(|p| p.record.clone()).collect();
            let sent = tokio::time::timeout(
                self.options.timeout,
                client.produce(records, self.options.compression.codec()),
            )
            .await;
            let error = match sent {
                Ok(Ok(_offsets)) => continue,
                Ok(Err(e)) => {
                    if let KafkaError::ServerError { protocol_error, .. } = &e {
                        produced.forget_topic =
                            *protocol_error == ProtocolError::UnknownTopicOrPartition;
                    } else {
                        produced.reset = true;
                    }
                    classify(&format!("produce to {} [{partition}]", route.topic), e)
                }
                Err(_) => {
                    produced.reset = true;
                    HandlerError::timeout(format!(
                        "produce to {} [{partition}]: no ack within {:?}",
                        route.topic, self.options.timeout
                    ))
                }
            };
            produced.error = Some(error);
            produced.failed = batch;
            produced.failed.extend(rest);
            break;
        }
        produced
    }

    /// Produces everything buffered, whichever worker handled it.
    ///
    /// With `counted` (a flush), the calling task's own records that fail count an attempt,
    /// and are given up (no longer produced: the dispatcher dead-letters them now) after
    /// `max_attempts` or at once on a definite error; the first failure among the caller's own
    /// records is returned. Other workers' records that fail stay buffered without counting:
    /// their own worker's flush, whose outcome decides their fate, retries them. So a flush never
    /// returns `Ok` after another worker dropped one of its records. Without `counted` (a send
    /// from `handle` that bounds the buffer), failures only stay buffered.
    async fn settle(&self, counted: bool) -> Result<(), HandlerError> {
        let _settling = self.settling.lock().await;
        let batch = self.lock_pending()?.take();
        if batch.is_empty() {
            return Ok(());
        }
        // Records that were not acknowledged, with why.
        let mut failures: Vec<(Vec<Pending>, HandlerError)> = Vec::new();
        // Per topic and partition, in handling order. A topic is looked up again after a reset
        // (and re-created if it vanished); should it have fewer partitions now, its records are
        // re-partitioned by key.
        let mut by_partition: BTreeMap<(Arc<str>, i32), PartitionBatch> = BTreeMap::new();
        // The topic's route, or the index in `failures` of its lookup failure.
        let mut routes: HashMap<Arc<str>, Result<Arc<Route>, usize>> = HashMap::new();
        for mut item in batch {
            let route = match routes.get(&item.topic) {
                Some(route) => route.clone(),
                None => {
                    let route = self.route(&item.topic).await.map_err(|e| {
                        failures.push((Vec::new(), e));
                        failures.len() - 1
                    });
                    routes.insert(Arc::clone(&item.topic), route.clone());
                    route
                }
            };
            let route = match route {
                Ok(route) => route,
                Err(index) => {
                    failures[index].0.push(item);
                    continue;
                }
            };
            if item.partition as usize >= route.partitions.len() {
                let key = item.record.key.as_deref().unwrap_or_default();
                item.partition = partition_for(key, route.partitions.len() as i32);
            }
            by_partition
                .entry((Arc::clone(&item.topic), item.partition))
                .or_insert_with(|| PartitionBatch {
                    route,
                    records: Vec::new(),
                })
                .records
                .push(item);
        }
        let results = futures_util::future::join_all(by_partition.into_iter().map(
            |((_, partition), batch)| self.produce_partition(batch.route, partition, batch.records),
        ))
        .await;
        let mut reset = false;
        let mut forget = Vec::new();
        for produced in results {
            let Some(error) = produced.error else {
                continue;
            };
            reset |= produced.reset;
            if produced.forget_topic {
                forget.extend(produced.failed.first().map(|p| Arc::clone(&p.topic)));
            }
            failures.push((produced.failed, error));
        }
        if reset {
            self.reset().await;
        } else if !forget.is_empty() {
            let mut routes = self.routes.lock().await;
            for topic in &forget {
                routes.remove(&**topic);
            }
        }
        let caller = tokio::task::try_id();
        let mut own_error = None;
        let mut kept = Vec::new();
        for (records, error) in failures {
            let definite = !error.is_transient();
            let mut own = false;
            for mut item in records {
                if counted && item.owner == caller {
                    own = true;
                    item.failures += 1;
                    if definite || item.failures >= self.options.max_attempts {
                        // The dispatcher gives up on this flush now: the event is a dead
                        // letter, not to be produced later.
                        warn!(topic = %item.topic, partition = item.partition, "kafka record given up");
                        continue;
                    }
                }
                kept.push(item);
            }
            if own && own_error.is_none() {
                own_error = Some(error);
            }
        }
        if !kept.is_empty() {
            self.lock_pending()?.restore(kept);
        }
        match own_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn lock_pending(&self) -> Result<std::sync::MutexGuard<'_, Buffer>, HandlerError> {
        self.pending
            .lock()
            .map_err(|_| HandlerError::definite("kafka pending list poisoned"))
    }
}

/// Classifies a client failure: a record or topic the broker refuses is definite; timeouts,
/// connection failures, leader changes and unknown topics are transient.
fn classify(what: &str, e: KafkaError) -> HandlerError {
    let definite = matches!(
        &e,
        KafkaError::ServerError {
            protocol_error: ProtocolError::MessageTooLarge
                | ProtocolError::RecordListTooLarge
                | ProtocolError::InvalidRecord
                | ProtocolError::CorruptMessage
                | ProtocolError::InvalidTopicException
                | ProtocolError::TopicAuthorizationFailed
                | ProtocolError::InvalidReplicationFactor
                | ProtocolError::InvalidPartitions
                | ProtocolError::PolicyViolation,
            ..
        }
    );
    if definite {
        HandlerError::definite(what.to_string()).with_source(e)
    } else {
        HandlerError::transient(what.to_string()).with_source(e)
    }
}

#[async_trait::async_trait]
impl Handler for KafkaSink {
    fn target(&self) -> Option<String> {
        Some(self.options.topic.as_str().to_string())
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let topic = self
            .options
            .topic
            .render(event)
            .map_err(|e| HandlerError::definite(e.to_string()))?;
        let record = record(event)?;
        let size = record.approximate_size() + RECORD_OVERHEAD;
        if size + BATCH_OVERHEAD > self.options.max_message_bytes {
            return Err(HandlerError::definite(format!(
                "the event's record is about {size} bytes, more than max_message_bytes = {}",
                self.options.max_message_bytes
            )));
        }
        let route = self.route(&topic).await?;
        let partition = partition_for(event.aggregate_id.as_bytes(), route.partitions.len() as i32);
        let buffered = self.lock_pending()?.push(Pending {
            owner: tokio::task::try_id(),
            topic: Arc::clone(&route.topic),
            partition,
            record,
            size,
            failures: 0,
        });
        if buffered >= BUFFER_LIMIT {
            self.settle(false).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), HandlerError> {
        self.settle(true).await
    }
}
