//! The encoder: a serde `Serializer` writing CBOR into a `Vec<u8>`.

use serde::Serialize;
use serde::ser::{self, SerializeSeq};

use super::*;
use crate::buffer;

/// Encodes `value` as CBOR.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut encoder = Encoder { out: Vec::new() };
    value.serialize(&mut encoder)?;
    Ok(encoder.out)
}

/// Appends the CBOR encoding of `value` to `out`, which keeps what it held.
pub fn append_to<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut encoder = Encoder {
        out: std::mem::take(out),
    };
    let result = value.serialize(&mut encoder);
    *out = encoder.out;
    result
}

struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    fn head(&mut self, major: u8, value: u64) {
        let major = major << 5;
        if value < 24 {
            self.out.push(major | value as u8);
        } else if value <= u64::from(u8::MAX) {
            self.out.extend_from_slice(&[major | 24, value as u8]);
        } else if value <= u64::from(u16::MAX) {
            self.out.push(major | 25);
            self.out.extend_from_slice(&(value as u16).to_be_bytes());
        } else if value <= u64::from(u32::MAX) {
            self.out.push(major | 26);
            self.out.extend_from_slice(&(value as u32).to_be_bytes());
        } else {
            self.out.push(major | 27);
            self.out.extend_from_slice(&value.to_be_bytes());
        }
    }

    fn bytes(&mut self, major: u8, bytes: &[u8]) {
        buffer::off_the_runtime(bytes.len(), || {
            buffer::reserve(&mut self.out, bytes.len() + 9);
            self.head(major, bytes.len() as u64);
            self.out.extend_from_slice(bytes);
        });
    }

    fn bignum(&mut self, tag: u64, magnitude: u128) {
        let bytes = magnitude.to_be_bytes();
        let first = bytes
            .iter()
            .position(|&byte| byte != 0)
            .unwrap_or(bytes.len());
        self.head(MAJOR_TAG, tag);
        self.bytes(MAJOR_BYTES, &bytes[first..]);
    }

    fn length(&mut self, major: u8, len: Option<usize>) {
        match len {
            Some(len) => self.head(major, len as u64),
            None => self.out.push((major << 5) | INDEFINITE),
        }
    }

    /// Writes a byte string from an iterator known to yield `u8`s or `&u8`s.
    fn byte_string<I: Iterator>(
        &mut self,
        items: I,
        read: impl Fn(&I::Item) -> u8,
    ) -> Result<(), CodecError> {
        match items.size_hint() {
            (low, Some(high)) if low == high => {
                let start = buffer::off_the_runtime(low, || {
                    buffer::reserve(&mut self.out, low + 9);
                    self.head(MAJOR_BYTES, low as u64);
                    let start = self.out.len();
                    self.out.extend(items.map(|item| read(&item)));
                    start
                });
                if self.out.len() - start != low {
                    return Err(CodecError::new(
                        "a sequence yielded another number of bytes than it announced",
                    ));
                }
            }
            _ => {
                let collected: Vec<u8> = items.map(|item| read(&item)).collect();
                self.bytes(MAJOR_BYTES, &collected);
            }
        }
        Ok(())
    }
}

/// An array, map or indefinite container under construction.
struct Compound<'a> {
    encoder: &'a mut Encoder,
    indefinite: bool,
}

impl Compound<'_> {
    fn finish(self) {
        if self.indefinite {
            self.encoder.out.push(BREAK);
        }
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, value: bool) -> Result<(), CodecError> {
        self.out.push(if value { TRUE } else { FALSE });
        Ok(())
    }

    fn serialize_i8(self, value: i8) -> Result<(), CodecError> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i16(self, value: i16) -> Result<(), CodecError> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i32(self, value: i32) -> Result<(), CodecError> {
        self.serialize_i64(i64::from(value))
    }

    fn serialize_i64(self, value: i64) -> Result<(), CodecError> {
        if value >= 0 {
            self.head(MAJOR_UNSIGNED, value as u64);
        } else {
            self.head(MAJOR_NEGATIVE, !value as u64);
        }
        Ok(())
    }

    fn serialize_i128(self, value: i128) -> Result<(), CodecError> {
        if let Ok(small) = i64::try_from(value) {
            return self.serialize_i64(small);
        }
        if value >= 0 {
            return self.serialize_u128(value as u128);
        }
        let magnitude = !value as u128;
        if let Ok(small) = u64::try_from(magnitude) {
            self.head(MAJOR_NEGATIVE, small);
        } else {
            self.bignum(TAG_NEGATIVE_BIGNUM, magnitude);
        }
        Ok(())
    }

    fn serialize_u8(self, value: u8) -> Result<(), CodecError> {
        self.head(MAJOR_UNSIGNED, u64::from(value));
        Ok(())
    }

    fn serialize_u16(self, value: u16) -> Result<(), CodecError> {
        self.head(MAJOR_UNSIGNED, u64::from(value));
        Ok(())
    }

    fn serialize_u32(self, value: u32) -> Result<(), CodecError> {
        self.head(MAJOR_UNSIGNED, u64::from(value));
        Ok(())
    }

    fn serialize_u64(self, value: u64) -> Result<(), CodecError> {
        self.head(MAJOR_UNSIGNED, value);
        Ok(())
    }

    fn serialize_u128(self, value: u128) -> Result<(), CodecError> {
        match u64::try_from(value) {
            Ok(small) => self.head(MAJOR_UNSIGNED, small),
            Err(_) => self.bignum(TAG_POSITIVE_BIGNUM, value),
        }
        Ok(())
    }

    fn serialize_f32(self, value: f32) -> Result<(), CodecError> {
        self.out.push(SINGLE);
        self.out.extend_from_slice(&value.to_bits().to_be_bytes());
        Ok(())
    }

    fn serialize_f64(self, value: f64) -> Result<(), CodecError> {
        self.out.push(DOUBLE);
        self.out.extend_from_slice(&value.to_bits().to_be_bytes());
        Ok(())
    }

    fn serialize_char(self, value: char) -> Result<(), CodecError> {
        self.serialize_str(value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), CodecError> {
        self.bytes(MAJOR_TEXT, value.as_bytes());
        Ok(())
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<(), CodecError> {
        self.bytes(MAJOR_BYTES, value);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), CodecError> {
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CodecError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), CodecError> {
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CodecError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), CodecError> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        self.head(MAJOR_MAP, 1);
        self.bytes(MAJOR_TEXT, variant.as_bytes());
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'a>, CodecError> {
        self.length(MAJOR_ARRAY, len);
        Ok(Compound {
            encoder: self,
            indefinite: len.is_none(),
        })
    }

    fn collect_seq<I>(self, items: I) -> Result<(), CodecError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let items = items.into_iter();
        // Sequences of bytes become one byte string. The type ids compare
        // with lifetimes erased, and the reads below happen only when the
        // item type is exactly `u8` or `&u8`.
        if typeid::of::<I::Item>() == typeid::of::<u8>() {
            // SAFETY: the item type is u8.
            return self.byte_string(items, |item| unsafe {
                std::mem::transmute_copy::<I::Item, u8>(item)
            });
        }
        if typeid::of::<I::Item>() == typeid::of::<&u8>() {
            // SAFETY: the item type is &u8 (with some lifetime), pointing at a live byte.
            return self.byte_string(items, |item| unsafe {
                *std::mem::transmute_copy::<I::Item, &u8>(item)
            });
        }
        let (low, high) = items.size_hint();
        let len = (Some(low) == high).then_some(low);
        let mut sequence = self.serialize_seq(len)?;
        let mut count = 0usize;
        for item in items {
            sequence.serialize_element(&item)?;
            count += 1;
        }
        if len.is_some_and(|len| len != count) {
            return Err(CodecError::new(
                "a sequence yielded another number of items than it announced",
            ));
        }
        SerializeSeq::end(sequence)
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>, CodecError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, CodecError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, CodecError> {
        self.head(MAJOR_MAP, 1);
        self.bytes(MAJOR_TEXT, variant.as_bytes());
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'a>, CodecError> {
        self.length(MAJOR_MAP, len);
        Ok(Compound {
            encoder: self,
            indefinite: len.is_none(),
        })
    }

    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Compound<'a>, CodecError> {
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, CodecError> {
        self.head(MAJOR_MAP, 1);
        self.bytes(MAJOR_TEXT, variant.as_bytes());
        self.serialize_map(Some(len))
    }
}

macro_rules! sequence_like {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = CodecError;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
                value.serialize(&mut *self.encoder)
            }

            fn end(self) -> Result<(), CodecError> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

sequence_like!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CodecError> {
        key.serialize(&mut *self.encoder)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        value.serialize(&mut *self.encoder)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish();
        Ok(())
    }
}

macro_rules! struct_like {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = CodecError;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), CodecError> {
                self.encoder.bytes(MAJOR_TEXT, key.as_bytes());
                value.serialize(&mut *self.encoder)
            }

            fn end(self) -> Result<(), CodecError> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

struct_like!(SerializeStruct, SerializeStructVariant);
