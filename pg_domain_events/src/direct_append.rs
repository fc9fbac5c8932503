//! Appends events to existing streams without running an SQL statement.
//!
//! The SQL path ([`crate::store::INSERT_ONE`]) starts an executor for every event: two
//! `ModifyTable` nodes, the event table's `CHECK` constraints read back from their catalog
//! text and planned, the result relations and their indexes opened — per call, which is most
//! of what a `raise_event` called once per row costs (docs/benchmarks.md, "Per-row raising").
//! This path takes the steps logical replication's apply worker and `COPY` take instead:
//!
//! 1. route the new rows to their month's partition (`ExecFindPartition`; the events of one
//!    call are all recorded at the transaction's time, so they share one partition);
//! 2. find each stream head through the `aggregate` primary key, wait for and lock it like an
//!    `UPDATE` would (`RelationFindReplTupleByIndex`) — for a batch in the order the batch
//!    statement locks them, so that concurrent batches cannot deadlock — and move it on by
//!    the stream's events (`ExecSimpleRelationUpdate`, which keeps its indexes and
//!    constraints); a head this transaction already holds counts on in memory until its row
//!    must be written (see [`crate::held_heads`]);
//! 3. check each row against the partition's constraints (`ExecConstraints`: the same `NOT
//!    NULL` and `CHECK` constraints, the same errors), insert it and its index entries.
//!
//! Column defaults (`position` from its sequence, `txid`) are the table's own default
//! expressions, evaluated as `INSERT` would. Those and the constraint expressions are prepared
//! once and kept until a relation or function changes (see [`Prepared`]).
//!
//! The error paths are Postgres' own: a constraint violation, a missing partition or a lock
//! wait that ends in a deadlock raise the same errors, with the same SQLSTATEs, as the
//! statement would, and abort the transaction with everything this call wrote.
//!
//! It covers the common case only. Whenever anything is unusual it writes nothing, returns
//! `None`, and the caller runs the SQL statement, which handles all of it: a new
//! aggregate anywhere in the call (its head is created by `INSERT … ON CONFLICT`'s
//! speculative insertion, which two transactions may race), imported events (their own
//! `recorded_at`), `REPEATABLE READ` or `SERIALIZABLE` (where the statement raises
//! the serialization failures those levels promise), row-level security or triggers someone
//! added to the tables, a partition whose columns are laid out differently from the parent's,
//! missing privileges.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::ptr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::event::NewEvent;
use crate::held_heads;
use crate::partition::relation_oid;
use crate::pg_major;
use crate::store::Stored;

/// Appends `events` (with their new `ids`), in order, as the next versions of their existing
/// streams; `None`, with nothing written, when this path does not apply (see the module
/// documentation).
pub fn append(events: &[NewEvent], ids: &[pgrx::Uuid]) -> Option<Vec<Stored>> {
    if events.is_empty() || events.iter().any(|e| e.recorded_at.is_some()) {
        return None;
    }
    // SAFETY: called inside a transaction from a SQL function or trigger, as the SQL path is;
    // every pointer below comes from the server and lives in the executor state freed last.
    unsafe {
        if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32
            || !pg_sys::ActiveSnapshotSet()
        {
            return None;
        }
        let (event_oid, aggregate_oid) = tables()?;
        // As SPI does before each statement: the rows earlier calls of this statement wrote
        // (the head this call updates again) become visible and updatable.
        pg_sys::CommandCounterIncrement();

        // A raise from inside an append (a default or constraint someone made call SQL that
        // raises) goes through the statement.
        let append = kept_append(event_oid, aggregate_oid)?;
        // Its relations are held by the transaction's resource owner (see `Kept`); whatever
        // this call opens or pins goes there too, and is released there.
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        (*append).in_use = true;
        let caller_context = (*append).begin_call();
        let result = (*append).run(events, ids);
        (*append).end_call(caller_context);
        (*append).in_use = false;
        pg_sys::CurrentResourceOwner = owner;
        if (*append).close_requested {
            close_kept();
        }
        result
    }
}

/// The appends of one statement share an executor state and their open relations, as the
/// rows of one `INSERT` do: a per-row `raise_event` opens the tables, their indexes and the
/// partition once per statement, not per row. The state lives in the transaction's memory
/// and its relations are held by the transaction's resource owner, so a subtransaction
/// ending in between (a PL/pgSQL exception block) leaves them alone. It is closed at the end
/// of every query and utility statement (executor and utility hooks, see `held_heads`),
/// before commit or prepare, on a subtransaction's abort (its call may have stopped half
/// way), and whenever a relation or function changed (the invalidation generation); a
/// transaction's abort frees it with the transaction.
#[derive(Clone, Copy)]
struct Kept {
    append: *mut Append,
    generation: u64,
    event_oid: pg_sys::Oid,
    aggregate_oid: pg_sys::Oid,
}

thread_local! {
    static KEPT: std::cell::Cell<Option<Kept>> = const { std::cell::Cell::new(None) };
}

/// This statement's append state for the tables, opened now if there is none (or it is
/// stale); `None` while a call is using it.
unsafe fn kept_append(event_oid: pg_sys::Oid, aggregate_oid: pg_sys::Oid) -> Option<*mut Append> {
    unsafe {
        let generation = generation();
        if let Some(kept) = KEPT.with(std::cell::Cell::get) {
            if (*kept.append).in_use {
                return None;
            }
            if kept.generation == generation
                && kept.event_oid == event_oid
                && kept.aggregate_oid == aggregate_oid
            {
                return Some(kept.append);
            }
            close_kept();
        }
        // The hooks that close it at the end of the query.
        held_heads::install_hooks();
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let caller_context = pg_sys::MemoryContextSwitchTo(pg_sys::TopTransactionContext);
        let estate = pg_sys::CreateExecutorState();
        pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let append = Box::into_raw(Box::new(Append::open(estate, event_oid, aggregate_oid)));
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::CurrentResourceOwner = owner;
        KEPT.with(|k| {
            k.set(Some(Kept {
                append,
                generation,
                event_oid,
                aggregate_oid,
            }))
        });
        Some(append)
    }
}

/// Closes this statement's append state (see [`Kept`]); one in use is closed when its call
/// ends.
pub fn close_kept() {
    let Some(kept) = KEPT.with(std::cell::Cell::take) else {
        return;
    };
    // SAFETY: the state is ours and not in use; its relations are held by the transaction's
    // resource owner, which must be current to let them go.
    unsafe {
        if (*kept.append).in_use {
            (*kept.append).close_requested = true;
            KEPT.with(|k| k.set(Some(kept)));
            return;
        }
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let mut append = Box::from_raw(kept.append);
        let estate = append.estate;
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        append.close();
        pg_sys::FreeExecutorState(estate);
        pg_sys::CurrentResourceOwner = owner;
    }
}

/// A subtransaction is aborting: the state is closed even if a call was using it (that call
/// ended with the error).
pub fn close_kept_after_error() {
    KEPT.with(|k| {
        if let Some(kept) = k.get() {
            // SAFETY: the state is ours; nothing runs it any more.
            unsafe { (*kept.append).in_use = false };
        }
    });
    close_kept();
}

/// The transaction is aborting: its memory and resource owner free the state.
pub fn forget_kept() {
    if let Some(kept) = KEPT.with(std::cell::Cell::take) {
        // SAFETY: only the Rust allocation is freed; the server's memory goes with the
        // transaction.
        drop(unsafe { Box::from_raw(kept.append) });
    }
}

/// Runs `work` with a fresh executor state (its memory the current context, this command
/// as its output command), freed afterwards with its tuple slots.
unsafe fn in_executor_state<T>(work: impl FnOnce(*mut pg_sys::EState) -> T) -> T {
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let caller_context = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        let result = work(estate);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::FreeExecutorState(estate);
        result
    }
}

/// A result relation for `rel` without a range-table entry, its indexes open.
unsafe fn result_relation(rel: pg_sys::Relation) -> *mut pg_sys::ResultRelInfo {
    unsafe {
        let info = new_node::<pg_sys::ResultRelInfo>(pg_sys::NodeTag::T_ResultRelInfo);
        pg_sys::InitResultRelInfo(info, rel, 0, ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(info, false);
        info
    }
}

/// The relations and executor state of one append.
struct Append {
    estate: *mut pg_sys::EState,
    events: pg_sys::Relation,
    root: *mut pg_sys::ResultRelInfo,
    modify: *mut pg_sys::ModifyTableState,
    routing: *mut pg_sys::PartitionTupleRouting,
    heads: pg_sys::Relation,
    head_info: *mut pg_sys::ResultRelInfo,
    /// The `aggregate` primary key.
    head_key_index: pg_sys::Oid,
    /// The head lookup's key slot.
    search: *mut pg_sys::TupleTableSlot,
    /// The event row's slot.
    row: *mut pg_sys::TupleTableSlot,
    /// Slots holding the heads a call locked (`heads_used` of them this call), and the one
    /// their next versions are built in.
    head_slots: Vec<*mut pg_sys::TupleTableSlot>,
    heads_used: usize,
    next_head: *mut pg_sys::TupleTableSlot,
    /// Memory of one call, reset at the start of the next.
    call_context: pg_sys::MemoryContext,
    in_use: bool,
    close_requested: bool,
}

impl Append {
    unsafe fn open(
        estate: *mut pg_sys::EState,
        event_oid: pg_sys::Oid,
        aggregate_oid: pg_sys::Oid,
    ) -> Append {
        unsafe {
            let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
            let events = pg_sys::table_open(event_oid, lock);
            // The root gets no range-table entry (index 0): error messages built for a
            // constraint violation then show the row by the table-level privilege, as they
            // do for the extension owner the raising functions run as.
            let root = new_node::<pg_sys::ResultRelInfo>(pg_sys::NodeTag::T_ResultRelInfo);
            pg_sys::InitResultRelInfo(root, events, 0, ptr::null_mut(), 0);
            // The routing machinery wants the ModifyTable node it normally serves; COPY FROM
            // gives it one without a plan, as here.
            let modify = new_node::<pg_sys::ModifyTableState>(pg_sys::NodeTag::T_ModifyTableState);
            (*modify).ps.plan = ptr::null_mut();
            (*modify).ps.state = estate;
            (*modify).operation = pg_sys::CmdType::CMD_INSERT;
            (*modify).mt_nrels = 1;
            (*modify).resultRelInfo = root;
            (*modify).rootResultRelInfo = root;
            let routing = partition_routing::setup(estate, events);

            let heads = pg_sys::table_open(aggregate_oid, lock);
            let head_info = result_relation(heads);
            pg_sys::list_free(pg_sys::RelationGetIndexList(heads));
            Append {
                estate,
                events,
                root,
                modify,
                routing,
                heads,
                head_info,
                head_key_index: (*heads).rd_pkindex,
                search: pg_sys::ExecInitExtraTupleSlot(
                    estate,
                    (*heads).rd_att,
                    &pg_sys::TTSOpsVirtual,
                ),
                row: pg_sys::ExecInitExtraTupleSlot(
                    estate,
                    (*events).rd_att,
                    &pg_sys::TTSOpsVirtual,
                ),
                head_slots: Vec::new(),
                heads_used: 0,
                next_head: pg_sys::ExecInitExtraTupleSlot(
                    estate,
                    (*heads).rd_att,
                    &pg_sys::TTSOpsVirtual,
                ),
                call_context: pg_sys::AllocSetContextCreateInternal(
                    (*estate).es_query_cxt,
                    c"domain_events append call".as_ptr(),
                    0,
                    8 * 1024,
                    8 * 1024 * 1024,
                ),
                in_use: false,
                close_requested: false,
            }
        }
    }

    /// Starts a call: this command's snapshot and id, the previous call's memory freed; the
    /// caller's memory context, to give back to [`Append::end_call`].
    unsafe fn begin_call(&mut self) -> pg_sys::MemoryContext {
        unsafe {
            (*self.estate).es_snapshot = pg_sys::GetActiveSnapshot();
            (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            if let Some(econtext) = (*self.estate).es_per_tuple_exprcontext.as_mut() {
                pg_sys::MemoryContextReset(econtext.ecxt_per_tuple_memory);
            }
            pg_sys::MemoryContextReset(self.call_context);
            self.heads_used = 0;
            pg_sys::MemoryContextSwitchTo(self.call_context)
        }
    }

    /// Ends a call: the heads' buffers unpinned, the rows let go.
    unsafe fn end_call(&mut self, caller_context: pg_sys::MemoryContext) {
        unsafe {
            for &slot in &self.head_slots[..self.heads_used] {
                pg_sys::ExecClearTuple(slot);
            }
            pg_sys::ExecClearTuple(self.row);
            pg_sys::ExecClearTuple(self.next_head);
            pg_sys::ExecClearTuple(self.search);
            pg_sys::MemoryContextSwitchTo(caller_context);
        }
    }

    unsafe fn close(&mut self) {
        unsafe {
            pg_sys::ExecCloseIndices(self.head_info);
            partition_routing::cleanup(self.modify, self.routing);
            pg_sys::table_close(self.heads, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(self.events, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }

    unsafe fn run(&mut self, events: &[NewEvent], ids: &[pgrx::Uuid]) -> Option<Vec<Stored>> {
        unsafe {
            if inserts_fire_triggers((*self.events).trigdesc)
                || (*(*self.events).rd_rel).relrowsecurity
                || !(*self.heads).trigdesc.is_null()
                || (*(*self.heads).rd_rel).relrowsecurity
            {
                return None;
            }
            let now = pg_sys::GetCurrentTransactionStartTimestamp();
            let slot = self.row;
            let first = EventRow::of(self.events, &events[0], ids[0], now);
            first.store_in(slot);
            // Every row is recorded at `now`: the first one's partition is all of theirs.
            let leaf =
                partition_routing::find(self.modify, self.root, self.routing, slot, self.estate);
            let leaf_rel = (*leaf).ri_RelationDesc;
            if !(*leaf).ri_PartitionTupleSlot.is_null()
                || (*(*leaf_rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
                || (*(*leaf_rel).rd_rel).relrowsecurity
                || inserts_fire_triggers((*leaf).ri_TrigDesc)
            {
                return None;
            }
            let versions = self.next_versions(events, now)?;
            // Defaults only now: `position` draws from its sequence, which rows handed back
            // to the SQL path must not consume.
            let prepared = Prepared::for_append(self.events, leaf);
            let mut checks = prepared.checks;
            let mut stored = Vec::with_capacity(events.len());
            let mut row = first;
            for (n, version) in versions.into_iter().enumerate() {
                if n > 0 {
                    if let Some(econtext) = (*self.estate).es_per_tuple_exprcontext.as_mut() {
                        pg_sys::MemoryContextReset(econtext.ecxt_per_tuple_memory);
                    }
                    row = EventRow::of(self.events, &events[n], ids[n], now);
                    row.store_in(slot);
                }
                row.fill_defaults(slot, self.estate, &prepared.defaults);
                set(slot, row.version_column, version.into_datum());
                if !(*(*leaf_rel).rd_att).constr.is_null() {
                    checks = check_constraints(leaf, slot, self.estate, checks);
                }
                pg_sys::simple_table_tuple_insert(leaf_rel, slot);
                if (*leaf).ri_NumIndices > 0 {
                    let recheck = pg_major::insert_index_entries(leaf, slot, self.estate);
                    pg_sys::list_free(recheck);
                }
                let position = i64::from_datum(*(*slot).tts_values.add(row.position_column), false)
                    .expect("position is set");
                stored.push(Stored {
                    id: ids[n],
                    position,
                    aggregate_version: version,
                    recorded_at: TimestampWithTimeZone::from_datum(pg_sys::Datum::from(now), false)
                        .expect("a timestamp"),
                });
            }
            Some(stored)
        }
    }

    /// Locks the stream head of every aggregate `events` raise for and moves it on by that
    /// stream's events; each event's version, or `None` (nothing changed) when one aggregate
    /// has no head yet.
    unsafe fn next_versions(
        &mut self,
        events: &[NewEvent],
        now: pg_sys::TimestampTz,
    ) -> Option<Vec<i64>> {
        unsafe {
            // Streams in the order the batch statement upserts their heads (`event::columns`).
            let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
            for event in events {
                *counts
                    .entry((event.aggregate_type.as_str(), event.aggregate_id.as_str()))
                    .or_default() += 1;
            }
            // First every head is found and locked: an aggregate without one sends the whole
            // call to the statement before anything was written.
            let mut found = Vec::with_capacity(counts.len());
            for (&(aggregate_type, aggregate_id), &count) in &counts {
                let key = held_heads::key(aggregate_type, aggregate_id);
                let locked = if held_heads::holds(&key) {
                    None
                } else {
                    Some(self.lock_head(aggregate_type, aggregate_id)?)
                };
                found.push((key, count, locked));
            }
            // Then each moves on by its stream's events; `counts` becomes the version before
            // each stream's first event.
            for ((key, count, locked), before) in found.into_iter().zip(counts.values_mut()) {
                let head = match locked {
                    // A stream this transaction already holds counts on in memory; its row is
                    // written before anything can read it (see `held_heads`).
                    None => held_heads::advance(&key, count).expect("held: checked above"),
                    Some((current, old)) => {
                        let head = old
                            .checked_add(count)
                            .expect("a stream has fewer than 2^63 events");
                        let tid = write_head(
                            self.estate,
                            self.head_info,
                            current,
                            self.next_head,
                            head,
                            now,
                        );
                        held_heads::record(key, tid, head);
                        head
                    }
                };
                *before = head - count;
            }
            Some(
                events
                    .iter()
                    .map(|e| {
                        let version = counts
                            .get_mut(&(e.aggregate_type.as_str(), e.aggregate_id.as_str()))
                            .expect("counted above");
                        *version += 1;
                        *version
                    })
                    .collect(),
            )
        }
    }

    /// Finds the head of `(aggregate_type, aggregate_id)`, waits for a transaction holding it
    /// and locks the version it left, as `UPDATE` and `ON CONFLICT DO UPDATE` do in READ
    /// COMMITTED: a slot holding it (its columns read) and its version, or `None` when the
    /// aggregate has no head.
    unsafe fn lock_head(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Option<(*mut pg_sys::TupleTableSlot, i64)> {
        unsafe {
            let rel = self.heads;
            let desc = (*rel).rd_att;
            if self.head_key_index == pg_sys::InvalidOid {
                return None;
            }
            let search = self.search;
            pg_sys::ExecClearTuple(search);
            clear_to_nulls(search, desc);
            set(
                search,
                column(desc, c"aggregate_type"),
                aggregate_type.into_datum(),
            );
            set(
                search,
                column(desc, c"aggregate_id"),
                aggregate_id.into_datum(),
            );
            pg_sys::ExecStoreVirtualTuple(search);

            if self.heads_used == self.head_slots.len() {
                // In the executor state's memory, not the call's: kept for later calls.
                let context = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
                self.head_slots.push(pg_sys::table_slot_create(
                    rel,
                    &raw mut (*self.estate).es_tupleTable,
                ));
                pg_sys::MemoryContextSwitchTo(context);
            }
            let current = self.head_slots[self.heads_used];
            self.heads_used += 1;
            if !pg_sys::RelationFindReplTupleByIndex(
                rel,
                self.head_key_index,
                pg_sys::LockTupleMode::LockTupleNoKeyExclusive,
                search,
                current,
            ) {
                return None;
            }
            pg_sys::slot_getsomeattrs_int(current, (*desc).natts);
            let version =
                i64::from_datum(*(*current).tts_values.add(column(desc, c"version")), false)
                    .expect("version is not null");
            Some((current, version))
        }
    }
}

/// Whether `tid` holds the newest version of the head `(type, id)`, written by this transaction
/// and not rolled back, into `slot`. Anything else (the head was updated since by something
/// other than the raising functions, the slot was reused after an aborted version was pruned)
/// is `false`.
unsafe fn own_head_version(
    rel: pg_sys::Relation,
    tid: &mut pg_sys::ItemPointerData,
    slot: *mut pg_sys::TupleTableSlot,
    key_columns: [usize; 2],
    key: [&str; 2],
) -> bool {
    unsafe {
        // SnapshotSelf: this transaction's own changes count, including the current command's.
        if !pg_sys::table_tuple_fetch_row_version(rel, tid, &raw mut pg_sys::SnapshotSelfData, slot)
        {
            return false;
        }
        let tuple = (*slot.cast::<pg_sys::HeapTupleTableSlot>()).tuple;
        if tuple.is_null() {
            return false;
        }
        let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
        if !pg_sys::TransactionIdIsCurrentTransactionId(xmin) {
            return false;
        }
        let natts = (*(*rel).rd_att).natts;
        pg_sys::slot_getsomeattrs_int(slot, natts);
        key_columns.iter().zip(key).all(|(&column, expected)| {
            !*(*slot).tts_isnull.add(column)
                && <&str>::from_datum(*(*slot).tts_values.add(column), false) == Some(expected)
        })
    }
}

/// Writes `version` into the head row held in `current` (its columns read), with this
/// transaction's time, building the new row in `next` (a virtual slot of the table); where
/// the new row version is.
unsafe fn write_head(
    estate: *mut pg_sys::EState,
    head_info: *mut pg_sys::ResultRelInfo,
    current: *mut pg_sys::TupleTableSlot,
    next: *mut pg_sys::TupleTableSlot,
    version: i64,
    now: pg_sys::TimestampTz,
) -> pg_sys::ItemPointerData {
    unsafe {
        let desc = (*(*head_info).ri_RelationDesc).rd_att;
        let natts = (*desc).natts as usize;
        pg_sys::ExecClearTuple(next);
        for i in 0..natts {
            *(*next).tts_values.add(i) = *(*current).tts_values.add(i);
            *(*next).tts_isnull.add(i) = *(*current).tts_isnull.add(i);
        }
        set(next, column(desc, c"version"), version.into_datum());
        set(
            next,
            column(desc, c"updated_at"),
            Some(pg_sys::Datum::from(now)),
        );
        pg_sys::ExecStoreVirtualTuple(next);
        // No EPQ state: it only serves BEFORE UPDATE triggers, and a head table with
        // triggers never gets here.
        pg_sys::ExecSimpleRelationUpdate(head_info, estate, ptr::null_mut(), current, next);
        (*next).tts_tid
    }
}

/// Writes every held head whose stream counted on in memory (see [`crate::held_heads`]).
pub fn write_held_heads() {
    // SAFETY: called inside a transaction (executor and utility hooks, the raising functions,
    // pre-commit); the relation and slots live in the executor state freed last.
    unsafe {
        // No writes while parallel workers run; the next hook or the commit writes them.
        if pg_sys::IsInParallelMode() {
            return;
        }
        let heads = held_heads::to_write();
        if heads.is_empty() {
            held_heads::all_written();
            return;
        }
        let aggregate_oid = relation_oid("aggregate");
        if aggregate_oid == pg_sys::InvalidOid {
            held_heads::all_written();
            return;
        }
        // The rows were last written by this command or an earlier one of this statement.
        pg_sys::CommandCounterIncrement();
        in_executor_state(|estate| {
            let rel =
                pg_sys::table_open(aggregate_oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            let head_info = result_relation(rel);
            let desc = (*rel).rd_att;
            let key_columns = [
                column(desc, c"aggregate_type"),
                column(desc, c"aggregate_id"),
            ];
            let now = pg_sys::GetCurrentTransactionStartTimestamp();
            let next = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
            for (key, head) in heads {
                let current = pg_sys::table_slot_create(rel, &raw mut (*estate).es_tupleTable);
                let mut tid = head.tid;
                let (aggregate_type, aggregate_id) = key.split_once('\0').expect("a head key");
                if !own_head_version(
                    rel,
                    &mut tid,
                    current,
                    key_columns,
                    [aggregate_type, aggregate_id],
                ) {
                    // Only a direct change of `domain_events.aggregate` in this transaction
                    // gets here; the events counted since are aborted with it.
                    crate::errors::EventError::HeadMoved {
                        aggregate_type: aggregate_type.to_string(),
                        aggregate_id: aggregate_id.to_string(),
                    }
                    .report();
                }
                let tid = write_head(estate, head_info, current, next, head.current, now);
                held_heads::written(&key, tid);
            }
            held_heads::all_written();
            pg_sys::ExecCloseIndices(head_info);
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        });
    }
}

/// Writes the held heads and forgets where they are: the statement path is about to move
/// stream heads itself, and the next direct append finds them afresh.
pub fn release_held_heads() {
    write_held_heads();
    held_heads::forget();
}

/// The values of one event row, by the parent table's columns.
struct EventRow {
    values: Vec<Option<pg_sys::Datum>>,
    version_column: usize,
    position_column: usize,
}

impl EventRow {
    unsafe fn of(
        events: pg_sys::Relation,
        event: &NewEvent,
        id: pgrx::Uuid,
        now: pg_sys::TimestampTz,
    ) -> EventRow {
        unsafe {
            let desc = (*events).rd_att;
            let mut values = vec![None; (*desc).natts as usize];
            let now_datum = Some(pg_sys::Datum::from(now));
            let mut put = |name: &CStr, value: Option<pg_sys::Datum>| {
                values[column(desc, name)] = value;
            };
            put(c"id", id.into_datum());
            put(
                c"aggregate_type",
                event.aggregate_type.as_str().into_datum(),
            );
            put(c"aggregate_id", event.aggregate_id.as_str().into_datum());
            put(c"event_type", event.event_type.as_str().into_datum());
            put(c"event_version", event.event_version.into_datum());
            put(c"payload", Some(event.payload.datum()));
            put(c"metadata", Some(event.metadata.datum()));
            put(
                c"occurred_at",
                match event.occurred_at {
                    Some(at) => at.into_datum(),
                    None => now_datum,
                },
            );
            put(c"recorded_at", now_datum);
            EventRow {
                values,
                version_column: column(desc, c"aggregate_version"),
                position_column: column(desc, c"position"),
            }
        }
    }

    /// Stores the row, as far as it is known before the heads are locked (enough to route
    /// it), in `slot`, a slot of the parent table; see [`EventRow::fill_defaults`].
    unsafe fn store_in(&self, slot: *mut pg_sys::TupleTableSlot) {
        unsafe {
            pg_sys::ExecClearTuple(slot);
            // `values` has every column of the descriptor.
            for (i, value) in self.values.iter().enumerate() {
                set(slot, i, *value);
            }
            pg_sys::ExecStoreVirtualTuple(slot);
        }
    }

    /// Gives the columns this module does not set their default (`position`, `txid`), as
    /// `INSERT` does.
    unsafe fn fill_defaults(
        &self,
        slot: *mut pg_sys::TupleTableSlot,
        estate: *mut pg_sys::EState,
        defaults: &[(usize, *mut pg_sys::ExprState)],
    ) {
        unsafe {
            let econtext = pg_sys::MakePerTupleExprContext(estate);
            for &(i, state) in defaults {
                if self.values[i].is_some() || i == self.version_column {
                    continue;
                }
                let mut is_null = false;
                let evaluate = (*state).evalfunc.expect("an expression state evaluates");
                let datum = evaluate(state, econtext, &mut is_null);
                set(slot, i, (!is_null).then_some(datum));
            }
        }
    }
}

/// What the appends of a backend prepare once: the event table's column defaults and a
/// partition's `CHECK` constraints as expression states. Postgres rebuilds the constraints
/// from their catalog text for every statement and the defaults for every `INSERT` plan (a
/// third of a single-event transaction's own work before this); here they are built once and
/// kept until any relation or function changes (relcache and `pg_proc` invalidations), then
/// built again.
struct Prepared {
    /// Invalidation generation the entry was built in.
    generation: u64,
    event_table: pg_sys::Oid,
    /// Holds the expression states; deleted when the entry is replaced.
    context: pg_sys::MemoryContext,
    /// Partition whose constraint states `checks` holds (`InvalidOid`: none yet).
    leaf: pg_sys::Oid,
    /// `ri_ConstraintExprs` (`ri_CheckConstraintExprs` on 18) as Postgres built it.
    checks: *mut *mut pg_sys::ExprState,
    /// Columns of the event table with a default, and its prepared expression.
    defaults: Vec<(usize, *mut pg_sys::ExprState)>,
}

/// The tables, and that the current user may use them. Kept until a relation changes (its
/// privileges are in `pg_class`: relcache invalidation) or a role does (membership and
/// superuser status: `pg_authid` and `pg_auth_members` invalidations), as Postgres keeps its
/// own role membership cache.
#[derive(Clone, Copy)]
struct Tables {
    generation: u64,
    user: pg_sys::Oid,
    event_table: pg_sys::Oid,
    aggregate_table: pg_sys::Oid,
}

thread_local! {
    static PREPARED: std::cell::RefCell<Option<Prepared>> = const { std::cell::RefCell::new(None) };
    static TABLES: std::cell::Cell<Option<Tables>> = const { std::cell::Cell::new(None) };
    /// Bumped by every relcache, `pg_proc`, `pg_authid` and `pg_auth_members` invalidation
    /// this backend processes.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static WATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
}

#[pg_guard]
unsafe extern "C-unwind" fn catalog_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
}

/// The current invalidation generation (the callbacks are registered on first use).
fn generation() -> u64 {
    if !WATCHING.with(std::cell::Cell::get) {
        // SAFETY: registers callbacks that only bump a counter; once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
            for cache in [
                pg_sys::SysCacheIdentifier::PROCOID,
                pg_sys::SysCacheIdentifier::AUTHOID,
                pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            ] {
                pg_sys::CacheRegisterSyscacheCallback(
                    cache as i32,
                    Some(catalog_changed),
                    pg_sys::Datum::from(0),
                );
            }
        }
        WATCHING.with(|w| w.set(true));
        GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
    }
    GENERATION.with(std::cell::Cell::get)
}

/// The event and aggregate tables, when the current user may raise through this path.
unsafe fn tables() -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    unsafe {
        let user = pg_sys::GetUserId();
        let generation = generation();
        if let Some(t) = TABLES.with(std::cell::Cell::get) {
            if t.generation == generation && t.user == user {
                return Some((t.event_table, t.aggregate_table));
            }
        }
        let event_table = relation_oid("event");
        let aggregate_table = relation_oid("aggregate");
        if event_table == pg_sys::InvalidOid || aggregate_table == pg_sys::InvalidOid {
            return None;
        }
        let granted = |oid, mode: u32| {
            pg_sys::pg_class_aclcheck(oid, user, mode as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        let allowed = granted(event_table, pg_sys::ACL_INSERT)
            && granted(aggregate_table, pg_sys::ACL_SELECT)
            && granted(aggregate_table, pg_sys::ACL_UPDATE)
            && granted(aggregate_table, pg_sys::ACL_INSERT);
        if !allowed {
            return None;
        }
        TABLES.with(|t| {
            t.set(Some(Tables {
                generation,
                user,
                event_table,
                aggregate_table,
            }))
        });
        Some((event_table, aggregate_table))
    }
}

/// A partition's prepared constraint states, or the context to build them in.
type Checks = Result<*mut *mut pg_sys::ExprState, pg_sys::MemoryContext>;

/// The prepared expressions one append uses (copies of the pointers).
struct Expressions {
    defaults: Vec<(usize, *mut pg_sys::ExprState)>,
    /// The partition's constraint states, with the context to build them in when `None`.
    checks: Checks,
}

impl Prepared {
    /// The expressions for appending to `leaf` through `events`, made now if needed.
    unsafe fn for_append(
        events: pg_sys::Relation,
        leaf: *mut pg_sys::ResultRelInfo,
    ) -> Expressions {
        unsafe {
            let generation = generation();
            let event_table = (*events).rd_id;
            let leaf_oid = (*(*leaf).ri_RelationDesc).rd_id;
            PREPARED.with(|cell| {
                let mut slot = cell.borrow_mut();
                let current = slot
                    .as_ref()
                    .is_some_and(|p| p.generation == generation && p.event_table == event_table);
                if !current {
                    // Deleted here rather than by a destructor, which would also run at
                    // backend exit, after Postgres' memory is gone. No append is using it:
                    // each copies the pointers it needs at its start.
                    if let Some(old) = slot.take() {
                        pg_sys::MemoryContextDelete(old.context);
                    }
                    let context = pg_sys::AllocSetContextCreateInternal(
                        pg_sys::CacheMemoryContext,
                        c"domain_events prepared appends".as_ptr(),
                        0,
                        1024,
                        8192,
                    );
                    *slot = Some(Prepared {
                        generation,
                        event_table,
                        context,
                        leaf: pg_sys::InvalidOid,
                        checks: ptr::null_mut(),
                        defaults: prepare_defaults(events, context),
                    });
                }
                let prepared = slot.as_mut().expect("just set");
                if prepared.leaf != leaf_oid {
                    prepared.leaf = leaf_oid;
                    prepared.checks = ptr::null_mut();
                }
                Expressions {
                    defaults: prepared.defaults.clone(),
                    checks: if prepared.checks.is_null() {
                        Err(prepared.context)
                    } else {
                        Ok(prepared.checks)
                    },
                }
            })
        }
    }
}

/// The event table's column defaults as expression states in `context`.
unsafe fn prepare_defaults(
    events: pg_sys::Relation,
    context: pg_sys::MemoryContext,
) -> Vec<(usize, *mut pg_sys::ExprState)> {
    unsafe {
        let columns = pgrx::PgTupleDesc::from_pg_unchecked((*events).rd_att);
        let caller = pg_sys::MemoryContextSwitchTo(context);
        let mut defaults = Vec::new();
        for i in 0..columns.len() {
            if columns.get(i).is_none_or(|a| a.attisdropped) {
                continue;
            }
            let default = pg_sys::build_column_default(events, i as i32 + 1);
            if !default.is_null() {
                let planned = pg_sys::expression_planner(default.cast());
                defaults.push((i, pg_sys::ExecInitExpr(planned, ptr::null_mut())));
            }
        }
        pg_sys::MemoryContextSwitchTo(caller);
        defaults
    }
}

/// `ExecConstraints` with the partition's `CHECK` expression states prepared once: the first
/// call lets Postgres build them (its own rules: which constraints are enforced, generated
/// columns expanded) into the prepared entry's memory, later calls hand them back to it.
/// Returns what the next row of the same append passes.
unsafe fn check_constraints(
    leaf: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    prepared: Checks,
) -> Checks {
    unsafe {
        let field = pg_major::check_constraint_states(leaf);
        match prepared {
            Ok(checks) => {
                *field = checks;
                pg_sys::ExecConstraints(leaf, slot, estate);
            }
            Err(context) => {
                // The per-tuple context must exist before the swap: it belongs to the
                // executor state.
                pg_sys::MakePerTupleExprContext(estate);
                let query_context = (*estate).es_query_cxt;
                (*estate).es_query_cxt = context;
                pg_sys::ExecConstraints(leaf, slot, estate);
                (*estate).es_query_cxt = query_context;
                let leaf_oid = (*(*leaf).ri_RelationDesc).rd_id;
                PREPARED.with(|p| {
                    if let Some(p) = p.borrow_mut().as_mut() {
                        if p.leaf == leaf_oid && p.context == context {
                            p.checks = *field;
                        }
                    }
                });
            }
        }
        if (*field).is_null() {
            prepared
        } else {
            Ok(*field)
        }
    }
}

// Partition routing (executor/execPartition.h), which pgrx's bindings leave out; called
// through the same error boundary as the bound functions (a Postgres error becomes a Rust
// panic, reported as the error it was).
mod partition_routing {
    use pgrx::pg_sys;

    unsafe extern "C-unwind" {
        fn ExecSetupPartitionTupleRouting(
            estate: *mut pg_sys::EState,
            rel: pg_sys::Relation,
        ) -> *mut pg_sys::PartitionTupleRouting;
        fn ExecFindPartition(
            mtstate: *mut pg_sys::ModifyTableState,
            root: *mut pg_sys::ResultRelInfo,
            proute: *mut pg_sys::PartitionTupleRouting,
            slot: *mut pg_sys::TupleTableSlot,
            estate: *mut pg_sys::EState,
        ) -> *mut pg_sys::ResultRelInfo;
        fn ExecCleanupTupleRouting(
            mtstate: *mut pg_sys::ModifyTableState,
            proute: *mut pg_sys::PartitionTupleRouting,
        );
    }

    pub unsafe fn setup(
        estate: *mut pg_sys::EState,
        rel: pg_sys::Relation,
    ) -> *mut pg_sys::PartitionTupleRouting {
        unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| ExecSetupPartitionTupleRouting(estate, rel))
        }
    }

    pub unsafe fn find(
        mtstate: *mut pg_sys::ModifyTableState,
        root: *mut pg_sys::ResultRelInfo,
        proute: *mut pg_sys::PartitionTupleRouting,
        slot: *mut pg_sys::TupleTableSlot,
        estate: *mut pg_sys::EState,
    ) -> *mut pg_sys::ResultRelInfo {
        unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                ExecFindPartition(mtstate, root, proute, slot, estate)
            })
        }
    }

    pub unsafe fn cleanup(
        mtstate: *mut pg_sys::ModifyTableState,
        proute: *mut pg_sys::PartitionTupleRouting,
    ) {
        unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| ExecCleanupTupleRouting(mtstate, proute)) }
    }
}

/// Whether inserting into a relation with these triggers would fire any (row, statement or
/// transition-table INSERT triggers: the SQL path fires them, this one does not).
unsafe fn inserts_fire_triggers(triggers: *mut pg_sys::TriggerDesc) -> bool {
    unsafe {
        !triggers.is_null() && {
            let t = &*triggers;
            t.trig_insert_before_row
                || t.trig_insert_after_row
                || t.trig_insert_instead_row
                || t.trig_insert_before_statement
                || t.trig_insert_after_statement
                || t.trig_insert_new_table
        }
    }
}

/// The 0-based position of a column the extension's schema defines.
unsafe fn column(desc: pg_sys::TupleDesc, name: &CStr) -> usize {
    let number = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
    assert!(number > 0, "domain_events table lacks column {name:?}");
    number as usize - 1
}

/// Sets every column of a fresh slot to NULL.
unsafe fn clear_to_nulls(slot: *mut pg_sys::TupleTableSlot, desc: pg_sys::TupleDesc) {
    unsafe {
        for i in 0..(*desc).natts as usize {
            *(*slot).tts_values.add(i) = pg_sys::Datum::from(0usize);
            *(*slot).tts_isnull.add(i) = true;
        }
    }
}

unsafe fn set(slot: *mut pg_sys::TupleTableSlot, column: usize, value: Option<pg_sys::Datum>) {
    unsafe {
        *(*slot).tts_values.add(column) = value.unwrap_or(pg_sys::Datum::from(0usize));
        *(*slot).tts_isnull.add(column) = value.is_none();
    }
}

unsafe fn new_node<T>(tag: pg_sys::NodeTag) -> *mut T {
    unsafe {
        let node = pg_sys::palloc0(std::mem::size_of::<T>()).cast::<pg_sys::Node>();
        (*node).type_ = tag;
        node.cast()
    }
}
