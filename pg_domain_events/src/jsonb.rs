//! `jsonb` read in place, as Postgres stores it.
//!
//! The raising functions take their `jsonb` arguments without printing them: they look keys up
//! in the binary document and hand payloads and metadata on to the insert as `jsonb` values
//! copied out of it. JSON text is produced only where text is the point (the payload size
//! limit, an error message, a registered schema's check). Printing and re-parsing every event
//! was most of the raise path's cost (docs/benchmarks.md).
//!
//! Everything here points into memory Postgres allocated in the current memory context: a
//! [`Jsonb`] and the [`Node`]s read from it are valid for the SQL function call that made them,
//! and are never kept beyond it.

use std::ffi::CStr;
use std::marker::PhantomData;

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::prelude::*;
use pgrx::{pg_sys, FromDatum};
use serde_json::Value;

use crate::errors::EventError;

/// A `jsonb` value (an argument, or one built here), detoasted.
#[derive(Clone, Copy)]
pub struct Jsonb(*mut pg_sys::Jsonb);

impl_sql_translatable!(Jsonb, arg_only = "jsonb");

impl FromDatum for Jsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Jsonb> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null jsonb datum; the detoasted copy lives in the current context.
        Some(unsafe { Jsonb::from_datum_unchecked(datum) })
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for Jsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

impl Jsonb {
    /// # Safety
    /// `datum` is a non-null `jsonb` datum.
    pub unsafe fn from_datum_unchecked(datum: pg_sys::Datum) -> Jsonb {
        // SAFETY: per the contract; the 4-byte-header copy is what the jsonb API reads.
        Jsonb(unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) }.cast())
    }

    /// Parses JSON text with Postgres' own `jsonb` input (its errors and limits).
    pub fn parse(text: &str) -> Jsonb {
        let text = std::ffi::CString::new(text).expect("JSON text has no NUL");
        // SAFETY: jsonb_in takes a cstring and returns a jsonb in the current context.
        let datum = unsafe {
            pgrx::direct_function_call::<pg_sys::Datum>(
                pg_sys::jsonb_in,
                &[text.as_c_str().into_datum()],
            )
        }
        .expect("jsonb_in returns a value");
        // SAFETY: jsonb_in returned a jsonb.
        unsafe { Jsonb::from_datum_unchecked(datum) }
    }

    /// The datum, for a statement parameter or a function argument.
    pub fn datum(self) -> pg_sys::Datum {
        pg_sys::Datum::from(self.0)
    }

    fn container(&self) -> Container<'_> {
        // SAFETY: a detoasted jsonb: a 4-byte varlena header, then the root container.
        unsafe {
            let size = pgrx::varlena::varsize_any(self.0.cast());
            Container {
                data: &raw mut (*self.0).root,
                len: i32::try_from(size - pg_sys::VARHDRSZ).expect("a jsonb fits in 1 GB"),
                document: PhantomData,
            }
        }
    }

    /// Whether arrays and objects nest more than `limit` levels deep (the top level is 1).
    /// Walks the containers' entries without reading any value.
    pub fn nests_deeper_than(&self, limit: usize) -> bool {
        let root = self.container();
        // Each level below the top takes its own 4-byte header and a 4-byte entry in its
        // parent: a small document cannot be deep.
        if (root.len as usize) < 4 + 8 * limit {
            return false;
        }
        let mut stack = vec![(root.data, 1usize)];
        while let Some((container, depth)) = stack.pop() {
            if depth > limit {
                return true;
            }
            // SAFETY: a container of the live document: a header, `entries` JEntries, then
            // the children's data, each container child at an int-aligned offset
            // (jsonb_util.c's layout: an entry holds its end offset when JENTRY_HAS_OFF is
            // set, its length otherwise).
            unsafe {
                let header = (*container).header;
                let count = (header & pg_sys::JB_CMASK) as usize;
                let entries = if header & pg_sys::JB_FOBJECT != 0 {
                    count * 2
                } else {
                    count
                };
                let children = (*container).children.as_ptr();
                let data = children.add(entries).cast::<u8>();
                let mut end = 0u32;
                for index in 0..entries {
                    let entry = *children.add(index);
                    let start = end;
                    end = if entry & pg_sys::JENTRY_HAS_OFF != 0 {
                        entry & pg_sys::JENTRY_OFFLENMASK
                    } else {
                        start + (entry & pg_sys::JENTRY_OFFLENMASK)
                    };
                    if entry & pg_sys::JENTRY_TYPEMASK == pg_sys::JENTRY_ISCONTAINER {
                        let aligned = (start as usize + 3) & !3;
                        stack.push((data.add(aligned).cast_mut().cast(), depth + 1));
                    }
                }
            }
        }
        false
    }

    /// The document's top-level value.
    pub fn root(&self) -> Node<'_> {
        let root = self.container();
        // SAFETY: the root container of a valid jsonb.
        if unsafe { (*root.data).header } & pg_sys::JB_FSCALAR != 0 {
            let mut value = pg_sys::JsonbValue::default();
            // SAFETY: a scalar document is a one-element pseudo-array; this reads its element.
            unsafe { pg_sys::JsonbExtractScalar(root.data, &mut value) };
            // SAFETY: JsonbExtractScalar filled in a scalar.
            unsafe { Node::of(&value) }
        } else {
            root.node()
        }
    }
}

/// An array or object inside a document.
#[derive(Clone, Copy)]
pub struct Container<'doc> {
    data: *mut pg_sys::JsonbContainer,
    len: i32,
    document: PhantomData<&'doc Jsonb>,
}

impl<'doc> Container<'doc> {
    fn header(self) -> u32 {
        // SAFETY: points to a container of a live document.
        unsafe { (*self.data).header }
    }

    fn node(self) -> Node<'doc> {
        if self.header() & pg_sys::JB_FOBJECT != 0 {
            Node::Object(self)
        } else {
            Node::Array(self)
        }
    }

    /// Number of elements, or of keys.
    pub fn len(self) -> usize {
        (self.header() & pg_sys::JB_CMASK) as usize
    }

    /// An object's value for `key`.
    pub fn get(self, key: &str) -> Option<Node<'doc>> {
        let mut value = pg_sys::JsonbValue::default();
        // SAFETY: an object container of a live document; the key is passed with its length
        // (no NUL needed); the result points into the document.
        let found = unsafe {
            pg_sys::getKeyJsonValueFromContainer(
                self.data,
                key.as_ptr().cast(),
                i32::try_from(key.len()).ok()?,
                &mut value,
            )
        };
        // SAFETY: filled in by the lookup.
        (!found.is_null()).then(|| unsafe { Node::of(&value) })
    }

    /// An array's `index`th element.
    pub fn element(self, index: usize) -> Node<'doc> {
        // SAFETY: an array container of a live document and an index below its length.
        unsafe {
            let value = pg_sys::getIthJsonbValueFromContainer(
                self.data,
                u32::try_from(index).expect("fewer than 2^28 elements"),
            );
            Node::of(&*value)
        }
    }

    /// An object's keys, in the document's (length, then byte) order.
    pub fn keys(self) -> Vec<String> {
        let mut keys = Vec::with_capacity(self.len());
        let mut value = pg_sys::JsonbValue::default();
        // SAFETY: iterates a container of a live document, skipping nested ones.
        unsafe {
            let mut iterator = pg_sys::JsonbIteratorInit(self.data);
            loop {
                let token = pg_sys::JsonbIteratorNext(&mut iterator, &mut value, true);
                if token == pg_sys::JsonbIteratorToken::WJB_DONE {
                    break;
                }
                if token == pg_sys::JsonbIteratorToken::WJB_KEY {
                    keys.push(string_of(&value));
                }
            }
        }
        keys
    }

    /// This container as a `jbvBinary` value (pointing at it, not copying it).
    fn binary_value(self) -> pg_sys::JsonbValue {
        pg_sys::JsonbValue {
            type_: pg_sys::jbvType::jbvBinary,
            val: pg_sys::JsonbValue__bindgen_ty_1 {
                binary: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_4 {
                    len: self.len,
                    data: self.data,
                },
            },
        }
    }

    /// This container as a document of its own (a copy, in the current memory context).
    pub fn to_jsonb(self) -> Jsonb {
        let mut value = self.binary_value();
        // SAFETY: a binary value copies the container's bytes into a new jsonb.
        Jsonb(unsafe { pg_sys::JsonbValueToJsonb(&mut value) })
    }

    /// The container as Postgres prints it (`jsonb::text`).
    pub fn text(self) -> String {
        // SAFETY: prints a container of a live document into a new palloc'd string.
        unsafe {
            let text = pg_sys::JsonbToCString(std::ptr::null_mut(), self.data, self.len);
            let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
            pg_sys::pfree(text.cast());
            owned
        }
    }
}

/// One value read from a document.
#[derive(Clone, Copy)]
pub enum Node<'doc> {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number (Postgres `numeric`).
    Number(pg_sys::Numeric),
    /// A string: its UTF-8 bytes inside the document.
    String(*const u8, usize),
    /// An array.
    Array(Container<'doc>),
    /// An object.
    Object(Container<'doc>),
}

fn string_of(value: &pg_sys::JsonbValue) -> String {
    // SAFETY: a string value: `len` bytes at `val`, inside the document.
    unsafe {
        let bytes = std::slice::from_raw_parts(
            value.val.string.val.cast::<u8>(),
            usize::try_from(value.val.string.len).unwrap_or(0),
        );
        String::from_utf8_lossy(bytes).into_owned()
    }
}

impl<'doc> Node<'doc> {
    /// # Safety
    /// `value` was filled in by the jsonb API from a live document that outlives `'doc`.
    unsafe fn of(value: &pg_sys::JsonbValue) -> Node<'doc> {
        // SAFETY: the union member read is the one `type_` names.
        unsafe {
            match value.type_ {
                pg_sys::jbvType::jbvNull => Node::Null,
                pg_sys::jbvType::jbvBool => Node::Bool(value.val.boolean),
                pg_sys::jbvType::jbvNumeric => Node::Number(value.val.numeric),
                pg_sys::jbvType::jbvString => Node::String(
                    value.val.string.val.cast::<u8>().cast_const(),
                    usize::try_from(value.val.string.len).unwrap_or(0),
                ),
                _ => Container {
                    data: value.val.binary.data,
                    len: value.val.binary.len,
                    document: PhantomData,
                }
                .node(),
            }
        }
    }

    /// What the value is, for error messages ("a string", "an object", ...).
    pub fn kind(self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Number(_) => "a number",
            Node::String(..) => "a string",
            Node::Array(_) => "an array",
            Node::Object(_) => "an object",
        }
    }

    /// A string's text.
    pub fn as_str(self) -> Option<&'doc str> {
        match self {
            // SAFETY: `len` bytes of the live document; jsonb strings are valid in the
            // database encoding, checked as UTF-8 here.
            Node::String(ptr, len) => {
                std::str::from_utf8(unsafe { std::slice::from_raw_parts(ptr, len) }).ok()
            }
            _ => None,
        }
    }

    /// A number as Postgres prints it (`numeric` output: `1e2` was stored as `100`).
    pub fn number_text(self) -> Option<String> {
        let Node::Number(numeric) = self else {
            return None;
        };
        // SAFETY: numeric_out takes a numeric datum and returns a palloc'd cstring.
        unsafe {
            pgrx::direct_function_call::<&CStr>(
                pg_sys::numeric_out,
                &[Some(pg_sys::Datum::from(numeric))],
            )
        }
        .map(|text| text.to_string_lossy().into_owned())
    }

    /// A number without fraction or exponent that fits an `i64`.
    pub fn as_i64(self) -> Option<i64> {
        self.number_text()?.parse().ok()
    }

    /// A whole number (`i64` or `u64`) as its decimal text.
    pub fn as_integer_text(self) -> Option<String> {
        let text = self.number_text()?;
        (text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok()).then_some(text)
    }

    /// The value as JSON text.
    pub fn text(self) -> String {
        match self {
            Node::Null => "null".to_string(),
            Node::Bool(b) => b.to_string(),
            Node::Number(_) => self.number_text().unwrap_or_default(),
            Node::String(..) => serde_json::to_string(self.as_str().unwrap_or_default())
                .expect("a string serialises"),
            Node::Array(c) | Node::Object(c) => c.text(),
        }
    }

    /// The value as a `serde_json` tree (for a registered schema's check); `field` names it in
    /// the error for a document nested deeper than serde_json reads (128 levels).
    pub fn to_value(self, field: &str) -> Result<Value, EventError> {
        crate::json_arg::parse_json(field, &self.text())
    }
}

impl IntoDatum for Jsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.datum())
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// A `jsonb[]` built here, for a statement parameter.
pub struct JsonbArray(pg_sys::Datum);

impl IntoDatum for JsonbArray {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBARRAYOID
    }
}

/// A `jsonb[]` of `values` (in the current memory context).
pub fn array(values: &[Jsonb]) -> JsonbArray {
    let mut datums: Vec<pg_sys::Datum> = values.iter().map(|j| j.datum()).collect();
    // SAFETY: jsonb is a varlena (length -1, by reference) aligned on int; construct_array
    // copies the elements.
    let array = unsafe {
        pg_sys::construct_array(
            datums.as_mut_ptr(),
            i32::try_from(datums.len()).expect("fewer than 2^31 events"),
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        )
    };
    JsonbArray(pg_sys::Datum::from(array))
}

/// `left || right`: the keys of both objects, `right`'s value where both have one.
pub fn concat(left: Jsonb, right: Jsonb) -> Jsonb {
    // SAFETY: jsonb_concat takes two jsonb datums and returns a new one.
    let datum = unsafe {
        pgrx::direct_function_call::<pg_sys::Datum>(
            pg_sys::jsonb_concat,
            &[Some(left.datum()), Some(right.datum())],
        )
    }
    .expect("jsonb_concat returns a value");
    // SAFETY: a jsonb.
    unsafe { Jsonb::from_datum_unchecked(datum) }
}

/// Builds a `jsonb` object value by value, without JSON text.
pub struct ObjectBuilder {
    state: *mut pg_sys::JsonbParseState,
    /// The strings pushed so far: the parse state points to their bytes until `finish`.
    strings: Vec<String>,
}

impl ObjectBuilder {
    /// An empty object.
    pub fn new() -> ObjectBuilder {
        let mut builder = ObjectBuilder {
            state: std::ptr::null_mut(),
            strings: Vec::new(),
        };
        builder.push(pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT, None);
        builder
    }

    fn push(&mut self, token: pg_sys::JsonbIteratorToken::Type, value: Option<pg_sys::JsonbValue>) {
        let mut value = value;
        let pointer = value
            .as_mut()
            .map_or(std::ptr::null_mut(), |v| v as *mut pg_sys::JsonbValue);
        // SAFETY: the parse state is this builder's; a pushed value is copied (its string
        // bytes are kept alive by `strings`, a binary value's container by its document).
        unsafe { pg_sys::pushJsonbValue(&mut self.state, token, pointer) };
    }

    fn key(&mut self, key: &'static str) {
        let value = string_value(key.as_ptr(), key.len());
        self.push(pg_sys::JsonbIteratorToken::WJB_KEY, Some(value));
    }

    /// Adds `key` with a string value.
    pub fn string(&mut self, key: &'static str, value: String) {
        self.key(key);
        let string = string_value(value.as_ptr(), value.len());
        // Moving the String into the Vec keeps its heap buffer where it is.
        self.strings.push(value);
        self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, Some(string));
    }

    /// Adds `key` with an integer value.
    pub fn integer(&mut self, key: &'static str, value: i64) {
        self.key(key);
        // SAFETY: int8_numeric takes an int8 and returns a numeric in the current context.
        let numeric = unsafe {
            pgrx::direct_function_call::<pg_sys::Datum>(pg_sys::int8_numeric, &[value.into_datum()])
        }
        .expect("int8_numeric returns a value");
        let value = pg_sys::JsonbValue {
            type_: pg_sys::jbvType::jbvNumeric,
            val: pg_sys::JsonbValue__bindgen_ty_1 {
                numeric: numeric.cast_mut_ptr(),
            },
        };
        self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, Some(value));
    }

    /// Adds `key` with a whole document as its value.
    pub fn document(&mut self, key: &'static str, value: Jsonb) {
        self.key(key);
        let value = value.container().binary_value();
        self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, Some(value));
    }

    /// The object.
    pub fn finish(mut self) -> Jsonb {
        // SAFETY: closes the object opened in `new`; the result is the whole object, which
        // JsonbValueToJsonb serialises (copying every string) into a new jsonb.
        unsafe {
            let object = pg_sys::pushJsonbValue(
                &mut self.state,
                pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                std::ptr::null_mut(),
            );
            Jsonb(pg_sys::JsonbValueToJsonb(object))
        }
    }
}

fn string_value(bytes: *const u8, len: usize) -> pg_sys::JsonbValue {
    pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvString,
        val: pg_sys::JsonbValue__bindgen_ty_1 {
            string: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                len: i32::try_from(len).expect("a string below 1 GB"),
                val: bytes.cast_mut().cast(),
            },
        },
    }
}
