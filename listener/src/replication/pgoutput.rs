//! Decoder for the `pgoutput` logical decoding plugin's messages, protocol version 1.
//!
//! Every message the plugin sends (Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
//! Truncate, Message) decodes into [`PgOutputMessage`]. The decoder never panics on its input:
//! truncated buffers, unknown tags and invalid UTF-8 are [`DecodeError`] values. Column values stay
//! as [`Bytes`] slices of the received buffer, so decoding a row copies nothing.

use bytes::Bytes;

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch used on the wire.
pub type PgTimestamp = i64;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer was empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte names no pgoutput message of protocol version 1.
    #[error("unknown pgoutput message tag {tag:#04x} ({})", printable(*tag))]
    UnknownTag {
        /// The offending tag byte.
        tag: u8,
    },
    /// The message ended before a field was complete.
    #[error("pgoutput {message} message truncated while reading {field}")]
    Truncated {
        /// Message kind being decoded.
        message: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// A string field was not valid UTF-8.
    #[error("pgoutput {message} message has a non-UTF-8 {field}")]
    InvalidUtf8 {
        /// Message kind being decoded.
        message: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// A byte that selects a variant had a value the protocol does not define.
    #[error("pgoutput {message} message has an invalid {field} byte {value:#04x}")]
    InvalidByte {
        /// Message kind being decoded.
        message: &'static str,
        /// Field being read.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// Bytes were left over after the last field.
    #[error("pgoutput {message} message has {extra} trailing bytes")]
    TrailingBytes {
        /// Message kind being decoded.
        message: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

fn printable(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction came from another node through a replication origin.
    Origin(Origin),
    /// `R`: the shape of a table, sent before its first row in a session and after changes.
    Relation(Relation),
    /// `Y`: a user-defined type used by a column.
    Type(TypeInfo),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a message from `pg_logical_emit_message`.
    Message(LogicalMessage),
}

/// `B`: a transaction starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time.
    pub timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
}

/// `C`: the transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Unused flags (always 0 in Postgres 15).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once the transaction is handled.
    pub end_lsn: Lsn,
    /// Commit time.
    pub timestamp: PgTimestamp,
}

/// `O`: replication origin of the current transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// `R`: a table's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table oid, the key later row messages refer to.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`d`efault, `n`othing, `f`ull, `i`ndex).
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flags; bit 1 marks a column of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// `Y`: a user-defined type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// Type oid.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// `I`: an inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Oid of the [`Relation`].
    pub relation: u32,
    /// The new row.
    pub new: Tuple,
}

/// `U`: an updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Oid of the [`Relation`].
    pub relation: u32,
    /// The old key (`K`) or whole old row (`O`), when the replica identity provides one.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: Tuple,
}

/// `D`: a deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Oid of the [`Relation`].
    pub relation: u32,
    /// The old key or row.
    pub old: OldTuple,
}

/// The old side of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set.
    Key(Tuple),
    /// `O`: the whole old row (replica identity full).
    Row(Tuple),
}

/// `T`: truncated tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    /// Oids of the truncated relations.
    pub relations: Vec<u32>,
}

/// `M`: a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Whether it was emitted inside a transaction (and arrives between Begin and Commit).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// Prefix chosen by the emitter.
    pub prefix: String,
    /// Content, arbitrary bytes.
    pub content: Bytes,
}

/// A row's column values, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary format (only with the `binary` option).
    Binary(Bytes),
}

/// A read cursor that turns every short read into [`DecodeError::Truncated`].
struct Reader {
    buf: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
            })?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn take_bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(field)? as i32)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut arr = [0u8; 8];
        arr.copy_from_slice(b);
        Ok(u64::from_be_bytes(arr))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(field)? as i64)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.u64(field)?))
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
            })?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| DecodeError::InvalidUtf8 {
                message: self.message,
                field,
            })?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let ncols = self.u16("column count")?;
        // Cap the preallocation by what the buffer could hold (one byte per column at least),
        // so a corrupt count cannot make us allocate a huge vector.
        let mut values = Vec::with_capacity(usize::from(ncols).min(self.buf.len() - self.pos));
        for _ in 0..ncols {
            let kind = self.u8("column kind")?;
            let value = match kind {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' | b'b' => {
                    let len = self.u32("column length")? as usize;
                    let data = self.take_bytes(len, "column value")?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                value => {
                    return Err(DecodeError::InvalidByte {
                        message: self.message,
                        field: "column kind",
                        value,
                    })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

/// Decodes one pgoutput message (the payload of one XLogData).
pub fn decode(buf: Bytes) -> Result<PgOutputMessage, DecodeError> {
    let tag = *buf.first().ok_or(DecodeError::Empty)?;
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    let mut r = Reader {
        buf,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => PgOutputMessage::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            timestamp: r.i64("timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => PgOutputMessage::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            timestamp: r.i64("timestamp")?,
        }),
        b'O' => PgOutputMessage::Origin(Origin {
            lsn: r.lsn("origin LSN")?,
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let ncols = r.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(ncols).min(r.buf.len() - r.pos));
            for _ in 0..ncols {
                columns.push(Column {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            PgOutputMessage::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutputMessage::Type(TypeInfo {
            oid: r.u32("type oid")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation = r.u32("relation oid")?;
            expect_byte(&mut r, b'N', "tuple marker")?;
            PgOutputMessage::Insert(Insert {
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                let tuple = r.tuple()?;
                old = Some(if marker == b'K' {
                    OldTuple::Key(tuple)
                } else {
                    OldTuple::Row(tuple)
                });
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::InvalidByte {
                    message,
                    field: "tuple marker",
                    value: marker,
                });
            }
            PgOutputMessage::Update(Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Row(r.tuple()?),
                value => {
                    return Err(DecodeError::InvalidByte {
                        message,
                        field: "tuple marker",
                        value,
                    })
                }
            };
            PgOutputMessage::Delete(Delete { relation, old })
        }
        b'T' => {
            let nrels = r.u32("relation count")?;
            let options = r.u8("options")?;
            let mut relations = Vec::with_capacity((nrels as usize).min(r.buf.len() - r.pos));
            for _ in 0..nrels {
                relations.push(r.u32("relation oid")?);
            }
            PgOutputMessage::Truncate(Truncate { options, relations })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstr("prefix")?;
            let len = r.u32("content length")? as usize;
            let content = r.take_bytes(len, "content")?;
            PgOutputMessage::Message(LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            })
        }
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(decoded)
}

fn expect_byte(r: &mut Reader, expected: u8, field: &'static str) -> Result<(), DecodeError> {
    match r.u8(field)? {
        b if b == expected => Ok(()),
        value => Err(DecodeError::InvalidByte {
            message: r.message,
            field,
            value,
        }),
    }
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
mod tests;
