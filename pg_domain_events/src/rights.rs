//! Whose rights the extension's code runs with where Postgres does not switch them itself:
//! table capture and the registry functions act as the extension's owner (as its `SECURITY
//! DEFINER` functions do), sync handlers as the role that registered them.

use std::cell::RefCell;

use pgrx::prelude::*;

use crate::partition;
use crate::store;

thread_local! {
    static RIGHTS: RefCell<Option<(pg_sys::Oid, ExtensionRights)>> = const { RefCell::new(None) };
}

/// The function capture checks and the owner to act as; see [`store::CAPTURE_RIGHTS`].
#[derive(Clone, Copy)]
pub struct ExtensionRights {
    /// `domain_events.raise_events(jsonb)`.
    pub raise_events: pg_sys::Oid,
    /// The extension's owner.
    pub owner: pg_sys::Oid,
}

/// The extension's rights, read once per backend (and again after a DROP/CREATE EXTENSION).
pub fn extension_rights() -> ExtensionRights {
    // Keyed by the event table's OID: a DROP/CREATE EXTENSION in this backend starts afresh.
    let table = partition::event_table();
    if let Some((key, rights)) = RIGHTS.with(|r| *r.borrow()) {
        if key == table {
            return rights;
        }
    }
    let rights = Spi::connect(|client| {
        let row = client
            .select(store::CAPTURE_RIGHTS, Some(1), &[])
            .unwrap_or_else(|e| panic!("reading the extension's rights failed: {e}"))
            .first();
        ExtensionRights {
            raise_events: row
                .get::<pg_sys::Oid>(1)
                .ok()
                .flatten()
                .expect("raise_events oid"),
            owner: row
                .get::<pg_sys::Oid>(2)
                .ok()
                .flatten()
                .expect("extension owner"),
        }
    });
    RIGHTS.with(|r| *r.borrow_mut() = Some((table, rights)));
    rights
}

/// Runs `f` as `owner` with `search_path = pg_catalog, pg_temp`, as Postgres runs a SECURITY
/// DEFINER function with a SET clause. An error inside `f` aborts the (sub)transaction, which
/// restores both the user and the setting.
pub fn as_extension_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: the same calls fmgr_security_definer makes, balanced below.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        nest
    };
    let result = f();
    // SAFETY: undoes exactly what was set up above.
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

/// Runs `f` with `role`'s rights, as Postgres runs a `SECURITY DEFINER` function owned by it
/// (`SET ROLE` inside is refused). An error inside `f` aborts the (sub)transaction, which
/// restores the user.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: the calls fmgr_security_definer makes, balanced below.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let result = f();
    // SAFETY: undoes exactly what was set up above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// The current user (inside a `SECURITY DEFINER` function: its owner).
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::GetUserId() }
}

/// Postgres' own check for calling a function: `EXECUTE` for the current user, else the
/// standard `42501 permission denied for function <name>`.
pub fn require_execute(function: pg_sys::Oid, name: &std::ffi::CStr) {
    // SAFETY: plain catalog lookups; aclcheck_error raises the ERROR and does not return.
    unsafe {
        let result = crate::pg_major::function_execute_aclcheck(function, pg_sys::GetUserId());
        if result != pg_sys::AclResult::ACLCHECK_OK {
            pg_sys::aclcheck_error(result, pg_sys::ObjectType::OBJECT_FUNCTION, name.as_ptr());
        }
    }
}
