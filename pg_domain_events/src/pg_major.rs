//! The server API that differs between the supported PostgreSQL majors (15, 16, 17, 18), each
//! behind the `pg15` … `pg18` feature the extension is built with. Everything else the
//! extension calls is the same on all four.

use pgrx::pg_sys;

/// Whether `role` may EXECUTE the function `function` (Postgres's own ACL check, with
/// role membership and PUBLIC grants).
///
/// PostgreSQL 16 replaced the per-object-kind checks (`pg_proc_aclcheck`, `pg_class_aclcheck`,
/// …) with one `object_aclcheck(class, object, role, mode)`; 15 has only the former.
pub fn function_execute_aclcheck(
    function: pg_sys::Oid,
    role: pg_sys::Oid,
) -> pg_sys::AclResult::Type {
    let mode = pg_sys::ACL_EXECUTE as pg_sys::AclMode;
    // SAFETY: a catalog lookup with no side effect; the caller is inside a transaction.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::pg_proc_aclcheck(function, role, mode)
        }
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        {
            pg_sys::object_aclcheck(pg_sys::ProcedureRelationId, function, role, mode)
        }
    }
}

/// Where a result relation keeps its `CHECK` expression states (renamed in PostgreSQL 18).
pub unsafe fn check_constraint_states(
    info: *mut pg_sys::ResultRelInfo,
) -> *mut *mut *mut pg_sys::ExprState {
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        {
            &raw mut (*info).ri_ConstraintExprs
        }
        #[cfg(feature = "pg18")]
        {
            &raw mut (*info).ri_CheckConstraintExprs
        }
    }
}

/// `ExecInsertIndexTuples` for a plain insert; PostgreSQL 16 added the `onlySummarizing`
/// argument.
pub unsafe fn insert_index_entries(
    info: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) -> *mut pg_sys::List {
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::ExecInsertIndexTuples(
                info,
                slot,
                estate,
                false,
                false,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        {
            pg_sys::ExecInsertIndexTuples(
                info,
                slot,
                estate,
                false,
                false,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                false,
            )
        }
    }
}
