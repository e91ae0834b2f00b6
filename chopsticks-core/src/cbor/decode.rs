//! The decoder: a serde `Deserializer` reading CBOR from a byte slice.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

use super::*;
use crate::buffer;

/// Decodes one CBOR value that spans all of `input`; a large input is
/// decoded without holding up a runtime worker ([`buffer::off_the_runtime`]).
pub fn from_slice<T: DeserializeOwned>(input: &[u8]) -> Result<T, CodecError> {
    buffer::off_the_runtime(input.len(), || decode(input))
}

fn decode<T: DeserializeOwned>(input: &[u8]) -> Result<T, CodecError> {
    let mut decoder = Decoder {
        input,
        position: 0,
        depth: 0,
    };
    let value = T::deserialize(&mut decoder)?;
    if decoder.position != input.len() {
        return Err(CodecError::new(format_args!(
            "{} trailing bytes after the value",
            input.len() - decoder.position
        )));
    }
    Ok(value)
}

struct Decoder<'de> {
    input: &'de [u8],
    position: usize,
    depth: usize,
}

/// A decoded initial byte: major type and argument (`None` for indefinite length).
#[derive(Clone, Copy)]
struct Head {
    major: u8,
    info: u8,
    argument: Option<u64>,
}

fn end_of_input() -> CodecError {
    CodecError::new("the input ended in the middle of a value")
}

impl<'de> Decoder<'de> {
    fn peek(&self) -> Result<u8, CodecError> {
        self.input
            .get(self.position)
            .copied()
            .ok_or_else(end_of_input)
    }

    fn take(&mut self, len: u64) -> Result<&'de [u8], CodecError> {
        let available = self.input.len() - self.position;
        if len > available as u64 {
            return Err(CodecError::new(format_args!(
                "a length of {len} bytes exceeds the {available} bytes left in the input"
            )));
        }
        let start = self.position;
        self.position += len as usize;
        Ok(&self.input[start..self.position])
    }

    fn head(&mut self) -> Result<Head, CodecError> {
        let initial = self.take(1)?[0];
        let (major, info) = (initial >> 5, initial & 0x1f);
        let argument = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(u64::from(self.take(1)?[0])),
            25 => Some(u64::from(u16::from_be_bytes(self.array()?))),
            26 => Some(u64::from(u32::from_be_bytes(self.array()?))),
            27 => Some(u64::from_be_bytes(self.array()?)),
            INDEFINITE
                if matches!(
                    major,
                    MAJOR_BYTES | MAJOR_TEXT | MAJOR_ARRAY | MAJOR_MAP | MAJOR_SIMPLE
                ) =>
            {
                None
            }
            _ => {
                return Err(CodecError::new(format_args!(
                    "invalid initial byte {initial:#04x}"
                )));
            }
        };
        Ok(Head {
            major,
            info,
            argument,
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(self.take(N as u64)?);
        Ok(bytes)
    }

    fn enter(&mut self) -> Result<(), CodecError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CodecError::new(format_args!(
                "values nest deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Reads the chunks of an indefinite-length byte or text string.
    fn chunks(&mut self, major: u8) -> Result<Vec<u8>, CodecError> {
        let mut joined = Vec::new();
        loop {
            if self.peek()? == BREAK {
                self.position += 1;
                return Ok(joined);
            }
            let head = self.head()?;
            let (true, Some(len)) = (head.major == major, head.argument) else {
                return Err(CodecError::new(
                    "an indefinite string holds a chunk of another type",
                ));
            };
            // Bounds-checked against the input before any memory is reserved.
            let chunk = self.take(len)?;
            buffer::reserve(&mut joined, chunk.len());
            joined.extend_from_slice(chunk);
        }
    }

    /// Reads a byte string into a buffer allocated once at its final size.
    fn byte_buf(&mut self, argument: Option<u64>) -> Result<Vec<u8>, CodecError> {
        match argument {
            Some(len) => {
                let bytes = self.take(len)?;
                let mut owned = buffer::with_capacity(bytes.len());
                owned.extend_from_slice(bytes);
                Ok(owned)
            }
            None => self.chunks(MAJOR_BYTES),
        }
    }

    fn text(&mut self, argument: Option<u64>) -> Result<TextValue<'de>, CodecError> {
        match argument {
            Some(len) => std::str::from_utf8(self.take(len)?)
                .map(TextValue::Borrowed)
                .map_err(|_| CodecError::new("a text string is not valid UTF-8")),
            None => String::from_utf8(self.chunks(MAJOR_TEXT)?)
                .map(TextValue::Owned)
                .map_err(|_| CodecError::new("a text string is not valid UTF-8")),
        }
    }

    fn bignum(&mut self) -> Result<u128, CodecError> {
        let head = self.head()?;
        let (MAJOR_BYTES, Some(len)) = (head.major, head.argument) else {
            return Err(CodecError::new(
                "a bignum tag must hold a definite byte string",
            ));
        };
        let bytes = self.take(len)?;
        let significant = &bytes[bytes
            .iter()
            .position(|&byte| byte != 0)
            .unwrap_or(bytes.len())..];
        if significant.len() > 16 {
            return Err(CodecError::new("a bignum does not fit in 128 bits"));
        }
        Ok(significant
            .iter()
            .fold(0u128, |value, &byte| (value << 8) | u128::from(byte)))
    }

    fn any<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, CodecError> {
        let head = self.head()?;
        match (head.major, head.argument) {
            (MAJOR_UNSIGNED, Some(value)) => visitor.visit_u64(value),
            (MAJOR_NEGATIVE, Some(value)) => match i64::try_from(value) {
                Ok(value) => visitor.visit_i64(-1 - value),
                Err(_) => visitor.visit_i128(-1 - i128::from(value)),
            },
            (MAJOR_BYTES, Some(len)) => visitor.visit_borrowed_bytes(self.take(len)?),
            (MAJOR_BYTES, None) => visitor.visit_byte_buf(self.chunks(MAJOR_BYTES)?),
            (MAJOR_TEXT, argument) => match self.text(argument)? {
                TextValue::Borrowed(text) => visitor.visit_borrowed_str(text),
                TextValue::Owned(text) => visitor.visit_string(text),
            },
            (MAJOR_ARRAY, left) => self.nested(|decoder| {
                let mut elements = Sequence { decoder, left };
                let value = visitor.visit_seq(&mut elements)?;
                elements.check_consumed("array")?;
                Ok(value)
            }),
            (MAJOR_MAP, left) => self.nested(|decoder| {
                let mut entries = Map { decoder, left };
                let value = visitor.visit_map(&mut entries)?;
                Sequence {
                    decoder: entries.decoder,
                    left: entries.left,
                }
                .check_consumed("map")?;
                Ok(value)
            }),
            (MAJOR_TAG, Some(TAG_POSITIVE_BIGNUM)) => {
                let value = self.bignum()?;
                visitor.visit_u128(value)
            }
            (MAJOR_TAG, Some(TAG_NEGATIVE_BIGNUM)) => {
                let magnitude = self.bignum()?;
                let value = i128::try_from(magnitude)
                    .map(|magnitude| -1 - magnitude)
                    .map_err(|_| CodecError::new("a negative bignum does not fit in 128 bits"))?;
                visitor.visit_i128(value)
            }
            // Other tags carry no meaning for serde: decode what they wrap.
            (MAJOR_TAG, Some(_)) => self.nested(|decoder| decoder.any(visitor)),
            (MAJOR_SIMPLE, _) => match head.info {
                20 => visitor.visit_bool(false),
                21 => visitor.visit_bool(true),
                22 | 23 => visitor.visit_unit(),
                25 => visitor.visit_f32(half_to_f32(head.argument.unwrap_or(0) as u16)),
                26 => visitor.visit_f32(f32::from_bits(head.argument.unwrap_or(0) as u32)),
                27 => visitor.visit_f64(f64::from_bits(head.argument.unwrap_or(0))),
                _ => Err(CodecError::new(format_args!(
                    "unexpected simple value {}",
                    head.info
                ))),
            },
            _ => Err(CodecError::new("malformed value")),
        }
    }

    fn nested<T>(
        &mut self,
        inner: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Result<T, CodecError> {
        self.enter()?;
        let result = inner(self);
        self.leave();
        result
    }
}

enum TextValue<'de> {
    Borrowed(&'de str),
    Owned(String),
}

/// IEEE 754 half precision to single precision.
fn half_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let fraction = u32::from(bits & 0x3ff);
    let magnitude = match (exponent, fraction) {
        (0, 0) => 0,
        (0, _) => {
            let value = fraction as f32 * 2f32.powi(-24);
            return if sign != 0 { -value } else { value };
        }
        (0x1f, 0) => 0x7f80_0000,
        (0x1f, _) => 0x7fc0_0000 | (fraction << 13),
        _ => ((exponent + 127 - 15) << 23) | (fraction << 13),
    };
    f32::from_bits(sign | magnitude)
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = CodecError;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if matches!(self.peek()?, NULL | UNDEFINED) {
            self.position += 1;
            return visitor.visit_none();
        }
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        match self.take(1)?[0] {
            NULL | UNDEFINED => visitor.visit_unit(),
            other => Err(CodecError::new(format_args!(
                "expected null, found initial byte {other:#04x}"
            ))),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.any(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if self.peek()? >> 5 != MAJOR_BYTES {
            return self.any(visitor);
        }
        let head = self.head()?;
        let owned = self.byte_buf(head.argument)?;
        visitor.visit_byte_buf(owned)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if self.peek()? >> 5 != MAJOR_BYTES {
            return self.any(visitor);
        }
        // A byte string stands for a sequence of u8.
        let head = self.head()?;
        if is_serde_vec_u8_visitor::<V>() {
            // serde's own visitor for `Vec<u8>` would push the bytes one by one
            // into a growing vector; build its exact result in one copy instead.
            let owned = self.byte_buf(head.argument)?;
            let owned = std::mem::ManuallyDrop::new(owned);
            // SAFETY: `is_serde_vec_u8_visitor` checked that V::Value is Vec<u8>
            // (a type without lifetimes); ownership moves into the copy.
            return Ok(unsafe { std::mem::transmute_copy::<Vec<u8>, V::Value>(&owned) });
        }
        match head.argument {
            Some(len) => {
                let bytes = self.take(len)?;
                visit_byte_sequence(bytes.iter().copied(), visitor)
            }
            None => {
                let bytes = self.chunks(MAJOR_BYTES)?;
                visit_byte_sequence(bytes.into_iter(), visitor)
            }
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        match self.peek()? >> 5 {
            MAJOR_TEXT => {
                let head = self.head()?;
                match self.text(head.argument)? {
                    TextValue::Borrowed(name) => visitor.visit_enum(name.into_deserializer()),
                    TextValue::Owned(name) => visitor.visit_enum(name.into_deserializer()),
                }
            }
            MAJOR_MAP => {
                let head = self.head()?;
                if head.argument != Some(1) {
                    return Err(CodecError::new(
                        "an enum must be a map with exactly one entry",
                    ));
                }
                self.nested(|decoder| visitor.visit_enum(Variant { decoder }))
            }
            _ => Err(CodecError::new(
                "expected an enum (a variant name or a one-entry map)",
            )),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.any(de::IgnoredAny)?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        map struct identifier
    }
}

/// Hands a byte string to a visitor that expects a sequence; bytes it leaves unread are an error.
fn visit_byte_sequence<'de, I, V>(bytes: I, visitor: V) -> Result<V::Value, CodecError>
where
    I: Iterator<Item = u8>,
    V: Visitor<'de>,
{
    let mut sequence = de::value::SeqDeserializer::<_, CodecError>::new(bytes);
    let value = visitor.visit_seq(&mut sequence)?;
    sequence.end()?;
    Ok(value)
}

/// The type names serde gives the visitor of `impl Deserialize for Vec<T>` with `T = u8`.
const SERDE_VEC_U8_VISITORS: [&str; 2] = [
    "serde_core::de::impls::<impl serde_core::de::Deserialize<'_> for alloc::vec::Vec<_>>::deserialize::VecVisitor<u8>",
    "serde::de::impls::<impl serde::de::Deserialize<'_> for alloc::vec::Vec<_>>::deserialize::VecVisitor<u8>",
];

/// Whether `V` is serde's visitor for `Vec<u8>`, whose result the decoder may build directly.
/// Both the value type and the visitor's full path must match; any other
/// visitor, including a custom one producing `Vec<u8>`, takes the general path.
fn is_serde_vec_u8_visitor<'de, V: Visitor<'de>>() -> bool {
    typeid::of::<V::Value>() == typeid::of::<Vec<u8>>()
        && SERDE_VEC_U8_VISITORS.contains(&std::any::type_name::<V>())
}

/// The elements of an array.
struct Sequence<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    left: Option<u64>,
}

impl Sequence<'_, '_> {
    fn at_end(&mut self) -> Result<bool, CodecError> {
        match &mut self.left {
            Some(0) => Ok(true),
            Some(left) => {
                *left -= 1;
                Ok(false)
            }
            None if self.decoder.peek()? == BREAK => {
                self.decoder.position += 1;
                self.left = Some(0);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Fails if the visitor stopped before the end of the container.
    fn check_consumed(&mut self, what: &str) -> Result<(), CodecError> {
        if self.left == Some(0) || (self.left.is_none() && self.at_end()?) {
            return Ok(());
        }
        Err(CodecError::new(format_args!(
            "the {what} holds more entries than the value has fields"
        )))
    }

    fn size_hint(&self) -> Option<usize> {
        // Each element takes at least one byte: never promise more than the input holds.
        let remaining = self.decoder.input.len() - self.decoder.position;
        self.left.map(|left| (left as usize).min(remaining))
    }
}

impl<'de> de::SeqAccess<'de> for Sequence<'_, 'de> {
    type Error = CodecError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        if self.at_end()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Sequence::size_hint(self)
    }
}

/// The entries of a map.
struct Map<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    left: Option<u64>,
}

impl<'de> de::MapAccess<'de> for Map<'_, 'de> {
    type Error = CodecError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, CodecError> {
        let mut entries = Sequence {
            decoder: &mut *self.decoder,
            left: self.left,
        };
        let done = entries.at_end()?;
        self.left = entries.left;
        if done {
            return Ok(None);
        }
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, CodecError> {
        seed.deserialize(&mut *self.decoder)
    }

    fn size_hint(&self) -> Option<usize> {
        let remaining = (self.decoder.input.len() - self.decoder.position) / 2;
        self.left.map(|left| (left as usize).min(remaining))
    }
}

/// A `{variant: value}` enum.
struct Variant<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
}

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = CodecError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self), CodecError> {
        let variant = seed.deserialize(&mut *self.decoder)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = CodecError;

    fn unit_variant(self) -> Result<(), CodecError> {
        de::Deserialize::deserialize(&mut *self.decoder)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, CodecError> {
        seed.deserialize(&mut *self.decoder)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        de::Deserializer::deserialize_seq(&mut *self.decoder, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        de::Deserializer::deserialize_map(&mut *self.decoder, visitor)
    }
}
