//! `jsonb` arguments taken as their text, parsed by the extension itself.
//!
//! pgrx's `JsonB` parses the argument into a `serde_json::Value` before the function body runs
//! and panics when that fails: a document nested deeper than serde_json's limit (128 levels)
//! would surface as an internal error (`XX000`). Taking the text lets every function report it
//! like any other invalid argument, with SQLSTATE `22023`, a detail and a hint.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::prelude::*;
use pgrx::{direct_function_call, pg_sys, FromDatum};
use serde_json::Value;

use crate::errors::EventError;

/// A `jsonb` argument as the text Postgres prints for it.
pub struct JsonbText(String);

impl_sql_translatable!(JsonbText, arg_only = "jsonb");

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<JsonbText> {
        if is_null {
            return None;
        }
        // jsonb_out returns a palloc'd C string of the canonical text, whatever the nesting.
        let text = unsafe {
            let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            direct_function_call::<&core::ffi::CStr>(pg_sys::jsonb_out, &[Some(detoasted.into())])
        }
        .expect("jsonb_out returns a string");
        Some(JsonbText(text.to_string_lossy().into_owned()))
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

impl JsonbText {
    /// Parses the argument named `field`; a document nested too deeply is a `22023` error.
    pub fn parse(&self, field: &str) -> Result<Value, EventError> {
        parse_json(field, &self.0)
    }
}

/// Parses JSON text into a tree; a document nested deeper than serde_json reads (128 levels)
/// is a `22023` error naming `field`.
pub fn parse_json(field: &str, text: &str) -> Result<Value, EventError> {
    serde_json::from_str(text).map_err(|err| {
        EventError::invalid(
            field,
            format!("cannot be read ({err}); documents may nest at most 128 levels deep"),
            "Flatten the document, or store it elsewhere and put a reference in the event.",
        )
    })
}
