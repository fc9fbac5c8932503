//! The Kafka part of `bench sinks`: a tansu broker of the run's own (unless `--kafka` names
//! one), the `kafka` handler alone against the raw client producing the same records in
//! batches of the same size, and record counting for the whole-path run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use listener::sink::kafka::{self, partition_for};
use listener::sink::{KafkaCompression, KafkaOptions, KafkaSink, TopicTemplate};
use listener::{Event, Handler};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

/// A broker for the run: the one at `--kafka`, or a tansu (in-memory storage) started here on
/// a free loopback port and killed on drop.
pub(crate) struct Broker {
    pub(crate) address: String,
    child: Option<Child>,
}

impl Broker {
    pub(crate) async fn start(existing: Option<&str>, tansu: &str) -> anyhow::Result<Broker> {
        if let Some(address) = existing {
            return Ok(Broker {
                address: address.to_string(),
                child: None,
            });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu)
            .args(["broker", "--silent", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("cannot start {tansu}: install it with `scripts/setup.sh --kafka`, or pass --kafka host:port")
            })?;
        let broker = Broker {
            address: format!("127.0.0.1:{port}"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&broker.address)
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "tansu did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(broker)
    }

    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        ClientBuilder::new(vec![self.address.clone()])
            .build()
            .await
            .with_context(|| format!("cannot connect to the broker at {}", self.address))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Counts the records of a topic by reading them, from where the last count stopped: tansu
/// 0.6's high watermark can be too low after concurrent produces to several partitions, so it
/// cannot be the count.
pub(crate) struct RecordCounter {
    topic: String,
    /// Each partition's reader and the next offset to read.
    partitions: Vec<(PartitionClient, i64)>,
    counted: u64,
}

impl RecordCounter {
    pub(crate) fn new(topic: &str) -> RecordCounter {
        RecordCounter {
            topic: topic.to_string(),
            partitions: Vec::new(),
            counted: 0,
        }
    }

    /// Records stored so far; 0 while the topic does not exist.
    pub(crate) async fn count(&mut self, client: &Client) -> anyhow::Result<u64> {
        if self.partitions.is_empty() {
            let Some(found) = client
                .list_topics()
                .await?
                .into_iter()
                .find(|t| t.name == self.topic)
            else {
                return Ok(0);
            };
            for partition in found.partitions {
                let reader = client
                    .partition_client(self.topic.clone(), partition, UnknownTopicHandling::Retry)
                    .await?;
                let start = reader.get_offset(OffsetAt::Earliest).await?;
                self.partitions.push((reader, start));
            }
        }
        for (reader, next) in &mut self.partitions {
            loop {
                let (records, _) = reader.fetch_records(*next, 1..8_000_000, 1).await?;
                let Some(last) = records.last() else {
                    break;
                };
                *next = last.offset + 1;
                self.counted += records.len() as u64;
            }
        }
        Ok(self.counted)
    }
}

/// Produces `records` (partition, record) with the raw client to a new topic, a batch of
/// `per_flush` records at a time, each partition's share after the other's; with
/// `max_request_bytes`, a share is split into requests of at most that many (estimated) bytes.
/// Returns records/s; the records are built outside the clock.
async fn raw_client_rate(
    client: &Client,
    topic: &str,
    partitions: i32,
    records: &[(i32, Record)],
    per_flush: usize,
    max_request_bytes: Option<usize>,
) -> anyhow::Result<f64> {
    client
        .controller_client()?
        .create_topic(topic, partitions, 1, 5_000)
        .await
        .context("create topic")?;
    let mut writers = Vec::new();
    for p in 0..partitions {
        writers.push(
            client
                .partition_client(topic.to_string(), p, UnknownTopicHandling::Retry)
                .await?,
        );
    }
    let started = Instant::now();
    for chunk in records.chunks(per_flush) {
        for (p, writer) in writers.iter().enumerate() {
            let mut request: Vec<Record> = Vec::new();
            let mut size = 0;
            for (_, record) in chunk.iter().filter(|(partition, _)| *partition == p as i32) {
                let record_size = record.approximate_size() + kafka::RECORD_OVERHEAD;
                if max_request_bytes
                    .is_some_and(|max| !request.is_empty() && size + record_size > max)
                {
                    writer
                        .produce(std::mem::take(&mut request), Compression::NoCompression)
                        .await?;
                    size = 0;
                }
                size += record_size;
                request.push(record.clone());
            }
            writer.produce(request, Compression::NoCompression).await?;
        }
    }
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

/// The handler alone, a flush every 1, 10 and 100 events, against the raw client producing
/// the same records (the handler's own, in the same partitions), partition after partition:
/// once in one request per partition and flush, once in requests under 7.5 KiB like the
/// handler's (see `SMALL_REQUEST_BYTES` in the handler: larger requests wait ~40 ms for a
/// delayed ACK).
pub(crate) async fn handler_against_raw_client(
    broker: &Broker,
    events: &[Event],
    tag: u32,
) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 3;
    let client = broker.client().await?;
    println!(
        "kafka handler alone, {} synthetic events, topics of {PARTITIONS} partitions:",
        events.len()
    );
    println!(
        "| events per flush | raw client, one request per partition | raw client, requests < 7.5 KiB | handler | handler / raw < 7.5 KiB |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let records: Vec<(i32, Record)> = events
        .iter()
        .map(|e| {
            let partition = partition_for(e.aggregate_id.as_bytes(), PARTITIONS);
            Ok((partition, kafka::record(e)?))
        })
        .collect::<anyhow::Result<_>>()?;
    for per_flush in [1usize, 10, 100] {
        let whole = raw_client_rate(
            &client,
            &format!("bench{tag}raw{per_flush}"),
            PARTITIONS,
            &records,
            per_flush,
            None,
        )
        .await?;
        let small = raw_client_rate(
            &client,
            &format!("bench{tag}small{per_flush}"),
            PARTITIONS,
            &records,
            per_flush,
            Some(kafka::SMALL_REQUEST_BYTES),
        )
        .await?;

        let topic = format!("bench{tag}h{per_flush}");
        let sink = KafkaSink::new(KafkaOptions {
            brokers: vec![broker.address.clone()],
            topic: TopicTemplate::parse(&topic)?,
            create_topics: true,
            partitions: PARTITIONS,
            replication_factor: 1,
            compression: KafkaCompression::None,
            max_message_bytes: kafka::DEFAULT_MAX_MESSAGE_BYTES,
            timeout: Duration::from_secs(10),
            max_attempts: 1,
            tls: None,
        })?;
        // Connects and creates the topic outside the clock.
        sink.handle(&events[0]).await?;
        sink.flush().await?;
        let started = Instant::now();
        for (i, event) in events.iter().enumerate() {
            sink.handle(event).await?;
            if (i + 1).is_multiple_of(per_flush) {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        let handler = events.len() as f64 / started.elapsed().as_secs_f64();
        let stored = RecordCounter::new(&topic).count(&client).await?;
        anyhow::ensure!(
            stored == events.len() as u64 + 1,
            "{topic} holds {stored} records"
        );
        println!(
            "| {per_flush} | {whole:.0} | {small:.0} | {handler:.0} | {:.2}× |",
            handler / small
        );
    }
    Ok(())
}
