//! The pgoutput decoder against hand-built messages and the recorded fixtures.
//!
//! Fixtures were captured from a real PG 15 stream by `examples/capture_fixtures.rs`; the
//! scenario (and so the expected values below) is described there.

use super::*;

fn fixtures() -> Vec<(String, Bytes)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 45,
        "expected the captured fixtures in {}",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, Bytes::from(std::fs::read(&p).expect("read fixture")))
        })
        .collect()
}

fn fixture(prefix: &str) -> PgOutputMessage {
    let (_, bytes) = fixtures()
        .into_iter()
        .find(|(name, _)| name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no fixture {prefix}"));
    decode(bytes).expect("fixture decodes")
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn every_fixture_decodes_to_the_kind_in_its_name() {
    for (name, bytes) in fixtures() {
        let kind = name.split_once('-').map(|(_, k)| k).unwrap_or_default();
        let message = decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ok = match (&message, kind) {
            (PgOutputMessage::Begin(_), "begin") => true,
            (PgOutputMessage::Commit(_), "commit") => true,
            (PgOutputMessage::Origin(_), "origin") => true,
            (PgOutputMessage::Insert(_), "insert") => true,
            (PgOutputMessage::Update(_), "update") => true,
            (PgOutputMessage::Delete(_), "delete") => true,
            (PgOutputMessage::Truncate(_), "truncate") => true,
            (PgOutputMessage::Message(_), "message") => true,
            (PgOutputMessage::Relation(r), k) => k == format!("relation-{}", r.name),
            (PgOutputMessage::Type(t), k) => k == format!("type-{}", t.name),
            _ => false,
        };
        assert!(ok, "{name} decoded as {message:?}");
    }
}

#[test]
fn transactions_are_well_formed() {
    let mut open: Option<Begin> = None;
    let mut last_end = Lsn::ZERO;
    let mut commits = 0;
    for (name, bytes) in fixtures() {
        match decode(bytes).unwrap() {
            PgOutputMessage::Begin(b) => {
                assert!(open.is_none(), "{name}: nested begin");
                assert!(b.xid > 0);
                open = Some(b);
            }
            PgOutputMessage::Commit(c) => {
                let b = open
                    .take()
                    .unwrap_or_else(|| panic!("{name}: commit without begin"));
                assert_eq!(b.final_lsn, c.commit_lsn, "{name}");
                assert_eq!(b.timestamp, c.timestamp, "{name}");
                assert!(c.end_lsn > c.commit_lsn, "{name}");
                assert!(c.commit_lsn > last_end, "{name}: commits out of order");
                assert_eq!(c.flags, 0);
                last_end = c.end_lsn;
                commits += 1;
            }
            _ => assert!(open.is_some(), "{name}: change outside a transaction"),
        }
    }
    assert_eq!(commits, 11);
}

#[test]
fn relation_and_type() {
    let PgOutputMessage::Relation(item) = fixture("10-relation-item") else {
        panic!()
    };
    assert_eq!(
        (item.namespace.as_str(), item.name.as_str()),
        ("public", "item")
    );
    assert_eq!(item.replica_identity, b'd');
    let names: Vec<_> = item.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "status", "note"]);
    assert_eq!(item.columns[0].flags, 1, "id is the key");
    assert_eq!(item.columns[0].type_oid, 23, "int4");
    assert_eq!(item.columns[2].type_oid, 25, "text");
    assert_eq!(item.columns[2].type_modifier, -1);
    let PgOutputMessage::Type(mood) = fixture("09-type-mood") else {
        panic!()
    };
    assert_eq!(
        (mood.namespace.as_str(), mood.name.as_str()),
        ("public", "mood")
    );
    assert_eq!(item.columns[1].type_oid, mood.oid);

    let PgOutputMessage::Relation(full) = fixture("20-relation-full_item") else {
        panic!()
    };
    assert_eq!(full.replica_identity, b'f');
    assert!(
        full.columns.iter().all(|c| c.flags == 1),
        "identity full: every column is key"
    );

    let PgOutputMessage::Relation(event) = fixture("04-relation-event") else {
        panic!()
    };
    assert_eq!(
        (event.namespace.as_str(), event.name.as_str()),
        ("domain_events", "event")
    );
    assert_eq!(event.columns.len(), 12);
}

#[test]
fn inserts_updates_deletes() {
    let PgOutputMessage::Relation(item) = fixture("10-relation-item") else {
        panic!()
    };
    let PgOutputMessage::Insert(insert) = fixture("11-insert") else {
        panic!()
    };
    assert_eq!(insert.relation, item.oid);
    assert_eq!(insert.new.0, [text("1"), text("happy"), text("hello")]);

    let PgOutputMessage::Update(update) = fixture("14-update") else {
        panic!()
    };
    assert_eq!(update.old, None, "key unchanged: no old tuple");
    assert_eq!(update.new.0, [text("1"), text("sad"), text("hello")]);

    let PgOutputMessage::Update(update) = fixture("17-update") else {
        panic!()
    };
    assert_eq!(
        update.old,
        Some(OldTuple::Key(Tuple(vec![
            text("1"),
            TupleValue::Null,
            TupleValue::Null
        ])))
    );
    assert_eq!(update.new.0, [text("2"), text("sad"), text("hello")]);

    let PgOutputMessage::Insert(big) = fixture("21-insert") else {
        panic!()
    };
    let TupleValue::Text(big_value) = &big.new.0[1] else {
        panic!()
    };
    assert_eq!(big_value.len(), 3200);

    let PgOutputMessage::Update(update) = fixture("24-update") else {
        panic!()
    };
    let Some(OldTuple::Row(old)) = &update.old else {
        panic!("{update:?}")
    };
    assert_eq!(old.0[1], TupleValue::Text(big_value.clone()));
    assert_eq!(old.0[2], text("a"));
    assert_eq!(
        update.new.0,
        [text("1"), TupleValue::UnchangedToast, text("b")]
    );

    let PgOutputMessage::Delete(delete) = fixture("27-delete") else {
        panic!()
    };
    assert_eq!(delete.relation, item.oid);
    assert_eq!(
        delete.old,
        OldTuple::Key(Tuple(vec![text("2"), TupleValue::Null, TupleValue::Null]))
    );
    let PgOutputMessage::Delete(delete) = fixture("30-delete") else {
        panic!()
    };
    let OldTuple::Row(row) = delete.old else {
        panic!()
    };
    assert_eq!(row.0[2], text("b"));
}

#[test]
fn truncate_message_origin() {
    let PgOutputMessage::Relation(item) = fixture("34-relation-item") else {
        panic!()
    };
    let PgOutputMessage::Truncate(truncate) = fixture("35-truncate") else {
        panic!()
    };
    assert_eq!(truncate.relations, [item.oid]);
    assert_eq!(truncate.options, 0);

    let PgOutputMessage::Message(message) = fixture("38-message") else {
        panic!()
    };
    assert!(message.transactional);
    assert_eq!(message.prefix, "fixture");
    assert_eq!(&message.content[..], b"hello");
    assert!(message.lsn > Lsn::ZERO);

    let PgOutputMessage::Origin(origin) = fixture("41-origin") else {
        panic!()
    };
    assert_eq!(origin.lsn, Lsn(0xABCDEF));
    assert_eq!(origin.name, "fixture_origin");
}

#[test]
fn malformed_input_is_an_error_never_a_panic() {
    assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    assert_eq!(
        decode(Bytes::from_static(b"Zsomething")),
        Err(DecodeError::UnknownTag { tag: b'Z' })
    );
    // Protocol 2 streaming messages are unknown to a protocol 1 decoder.
    assert!(matches!(
        decode(Bytes::from_static(b"S")),
        Err(DecodeError::UnknownTag { .. })
    ));
    for (name, bytes) in fixtures() {
        // Every truncation fails cleanly.
        for len in 0..bytes.len().min(400) {
            assert!(
                decode(bytes.slice(..len)).is_err(),
                "{name} truncated to {len} decoded"
            );
        }
        // Trailing garbage is reported.
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(
            matches!(
                decode(Bytes::from(longer)),
                Err(DecodeError::TrailingBytes { .. })
            ),
            "{name} with a trailing byte"
        );
        // Byte flips (deterministic) never panic.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ bytes.len() as u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut mutated = bytes.to_vec();
            let at = (seed % mutated.len() as u64) as usize;
            mutated[at] = (seed >> 32) as u8;
            let _ = decode(Bytes::from(mutated));
        }
    }
    // A column count far beyond the buffer does not allocate or panic.
    assert!(decode(Bytes::from_static(b"I\0\0\0\x01N\xff\xff")).is_err());
    assert!(matches!(
        decode(Bytes::from_static(b"I\0\0\0\x01N\0\x01x")),
        Err(DecodeError::InvalidByte {
            field: "column kind",
            value: b'x',
            ..
        })
    ));
}
