//! Recovering the message of a `Serialize` implementation's own error.
//!
//! postcard turns `S::Error::custom(msg)` into a bare `SerdeSerCustom` and drops `msg`, so
//! a user whose type refuses to be encoded ("this handle cannot cross processes") would
//! read only "cannot encode message". When that happens, the value is walked once more
//! through [`Why`], a serializer that writes nothing and keeps the first custom message.

use std::fmt;

use serde::ser::{self, Serialize};

/// The message `v`'s `Serialize` gives through `Error::custom`, if it gives one.
pub(crate) fn custom_message<T: Serialize + ?Sized>(v: &T) -> Option<String> {
    match v.serialize(Why) {
        Ok(()) => None,
        Err(Custom(m)) => Some(m),
    }
}

/// The error of [`Why`]: the custom message.
#[derive(Debug)]
pub(crate) struct Custom(String);

impl fmt::Display for Custom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Custom {}

impl ser::Error for Custom {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Custom(msg.to_string())
    }
}

/// A serializer that accepts everything and writes nothing.
struct Why;

type R = Result<(), Custom>;

impl ser::Serializer for Why {
    type Ok = ();
    type Error = Custom;
    type SerializeSeq = Why;
    type SerializeTuple = Why;
    type SerializeTupleStruct = Why;
    type SerializeTupleVariant = Why;
    type SerializeMap = Why;
    type SerializeStruct = Why;
    type SerializeStructVariant = Why;

    fn serialize_bool(self, _: bool) -> R {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> R {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> R {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> R {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> R {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> R {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> R {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> R {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> R {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> R {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> R {
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> R {
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> R {
        Ok(())
    }
    fn serialize_char(self, _: char) -> R {
        Ok(())
    }
    fn serialize_str(self, _: &str) -> R {
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Ok(())
    }
    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
        v.serialize(Why)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(Why)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(Why)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_tuple(self, _: usize) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Why, Custom> {
        Ok(Why)
    }
    fn collect_str<T: fmt::Display + ?Sized>(self, _: &T) -> R {
        // Formatting could be costly and cannot fail with a custom message.
        Ok(())
    }
    fn is_human_readable(&self) -> bool {
        // As postcard answers, so the value takes the same path it took there.
        false
    }
}

impl ser::SerializeSeq for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTuple for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeMap for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
        k.serialize(Why)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStruct for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Why {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Why)
    }
    fn end(self) -> R {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Serialize, Serializer};

    use super::custom_message;

    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("a socket cannot cross processes"))
        }
    }

    #[test]
    fn finds_the_message_deep_inside_a_value() {
        let v = (1u8, vec![Some(("a", 2.5f32))], [None, Some(Refuses)]);
        assert_eq!(
            custom_message(&v).as_deref(),
            Some("a socket cannot cross processes")
        );
        assert_eq!(custom_message(&(1u8, "fine", vec![3u64])), None);
    }
}
