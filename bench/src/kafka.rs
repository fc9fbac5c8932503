//! The Kafka part of `bench sinks`: a tansu broker of the run's own (unless `--kafka` names
//! one), the `kafka` handler alone against the raw client producing the same records in
//! batches of the same size, and record counting for the whole-path run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use listener::sink::kafka::partition_for;
use listener::sink::{KafkaCompression, KafkaOptions, KafkaSink, TopicTemplate};
use listener::{Event, Handler};
use rskafka::client::partition::{Compression, OffsetAt, UnknownTopicHandling};
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

/// Records stored in `topic` (the sum of its partitions' high watermarks); 0 when it does not
/// exist yet.
pub(crate) async fn record_count(client: &Client, topic: &str) -> anyhow::Result<u64> {
    let Some(found) = client
        .list_topics()
        .await?
        .into_iter()
        .find(|t| t.name == topic)
    else {
        return Ok(0);
    };
    let mut total = 0;
    for partition in found.partitions {
        let reader = client
            .partition_client(topic.to_string(), partition, UnknownTopicHandling::Retry)
            .await?;
        total += reader.get_offset(OffsetAt::Latest).await? as u64;
    }
    Ok(total)
}

/// The handler alone, a flush every 1, 10 and 100 events, against the raw client producing
/// the same records (the handler's own, in the same partitions) in batches of the same size,
/// partition after partition.
pub(crate) async fn handler_against_raw_client(
    broker: &Broker,
    events: &[Event],
    tag: u32,
) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 3;
    let client = broker.client().await?;
    let controller = client.controller_client()?;
    println!(
        "kafka handler alone, {} synthetic events, topics of {PARTITIONS} partitions:",
        events.len()
    );
    println!(
        "| events per flush (batch) | raw client events/s | handler events/s | handler / raw |"
    );
    println!("|---:|---:|---:|---:|");
    for per_flush in [1usize, 10, 100] {
        // The raw client: records built outside the clock.
        let raw_topic = format!("bench{tag}raw{per_flush}");
        controller
            .create_topic(&raw_topic, PARTITIONS, 1, 5_000)
            .await
            .context("create topic")?;
        let mut partitions = Vec::new();
        for p in 0..PARTITIONS {
            partitions.push(
                client
                    .partition_client(raw_topic.clone(), p, UnknownTopicHandling::Retry)
                    .await?,
            );
        }
        let records: Vec<(i32, Record)> = events
            .iter()
            .map(|e| {
                let partition = partition_for(e.aggregate_id.as_bytes(), PARTITIONS);
                Ok((partition, listener::sink::kafka::record(e)?))
            })
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        for chunk in records.chunks(per_flush) {
            for (p, client) in partitions.iter().enumerate() {
                let batch: Vec<Record> = chunk
                    .iter()
                    .filter(|(partition, _)| *partition == p as i32)
                    .map(|(_, r)| r.clone())
                    .collect();
                client.produce(batch, Compression::NoCompression).await?;
            }
        }
        let raw = events.len() as f64 / started.elapsed().as_secs_f64();

        let topic = format!("bench{tag}h{per_flush}");
        let sink = KafkaSink::new(KafkaOptions {
            brokers: vec![broker.address.clone()],
            topic: TopicTemplate::parse(&topic)?,
            create_topics: true,
            partitions: PARTITIONS,
            replication_factor: 1,
            compression: KafkaCompression::None,
            max_message_bytes: listener::sink::kafka::DEFAULT_MAX_MESSAGE_BYTES,
            timeout: Duration::from_secs(10),
            max_attempts: 1,
        });
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
        let stored = record_count(&client, &topic).await?;
        anyhow::ensure!(
            stored == events.len() as u64 + 1,
            "{topic} holds {stored} records"
        );
        println!(
            "| {per_flush} | {raw:.0} | {handler:.0} | {:.2}× |",
            handler / raw
        );
    }
    Ok(())
}
