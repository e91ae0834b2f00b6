//! A compact CBOR (RFC 8949) codec for serde, for argument and result values
//! and the rare protocol messages.
//!
//! It follows the data model ciborium uses (structs as maps with text keys,
//! enums as `{variant: value}` or a bare text variant name, `None` and `()`
//! as null), with two differences that make bulk data cheap:
//!
//! - any sequence of `u8` (`Vec<u8>`, `&[u8]`, `VecDeque<u8>`, ...) is
//!   written as one byte string instead of an array of integers, and a byte
//!   string is accepted wherever a sequence is expected;
//! - a byte string decodes into a buffer allocated once at its final size.
//!
//! Decoding is bounded: lengths are checked against the input before
//! anything is allocated, nesting is limited to [`MAX_DEPTH`] levels, and
//! trailing bytes are an error.

mod decode;
mod encode;

use std::fmt;

pub use decode::from_slice;
pub use encode::{append_to, to_vec};

/// How deeply arrays, maps, tags and enums may nest in decoded input.
pub const MAX_DEPTH: usize = 128;

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl CodecError {
    fn new(message: impl fmt::Display) -> Self {
        CodecError(message.to_string())
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl serde::ser::Error for CodecError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        CodecError::new(message)
    }
}

impl serde::de::Error for CodecError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        CodecError::new(message)
    }
}

const MAJOR_UNSIGNED: u8 = 0;
const MAJOR_NEGATIVE: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const MAJOR_TAG: u8 = 6;
const MAJOR_SIMPLE: u8 = 7;

const FALSE: u8 = 0xf4;
const TRUE: u8 = 0xf5;
const NULL: u8 = 0xf6;
const UNDEFINED: u8 = 0xf7;
const SINGLE: u8 = 0xfa;
const DOUBLE: u8 = 0xfb;
const BREAK: u8 = 0xff;
const INDEFINITE: u8 = 31;

const TAG_POSITIVE_BIGNUM: u64 = 2;
const TAG_NEGATIVE_BIGNUM: u64 = 3;

#[cfg(test)]
mod tests;
