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

/// Methods for values with nothing inside to walk: they write nothing.
macro_rules! ignore {
    ($($method:ident($t:ty);)*) => {$(
        fn $method(self, _: $t) -> R {
            Ok(())
        }
    )*};
}

/// Methods that begin a compound value: its elements are walked by the same serializer.
macro_rules! open {
    ($($method:ident($($t:ty),*);)*) => {$(
        fn $method(self, $(_: $t),*) -> Result<Why, Custom> {
            Ok(Why)
        }
    )*};
}

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

    ignore! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
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
    open! {
        serialize_seq(Option<usize>);
        serialize_tuple(usize);
        serialize_tuple_struct(&'static str, usize);
        serialize_tuple_variant(&'static str, u32, &'static str, usize);
        serialize_map(Option<usize>);
        serialize_struct(&'static str, usize);
        serialize_struct_variant(&'static str, u32, &'static str, usize);
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

/// The compound serializers: each element is walked, nothing is written.
macro_rules! walk_elements {
    ($($trait:ident :: $method:ident $(($key:ty))?;)*) => {$(
        impl ser::$trait for Why {
            type Ok = ();
            type Error = Custom;
            fn $method<T: Serialize + ?Sized>(&mut self, $(_: $key,)? v: &T) -> R {
                v.serialize(Why)
            }
            fn end(self) -> R {
                Ok(())
            }
        }
    )*};
}

walk_elements! {
    SerializeSeq::serialize_element;
    SerializeTuple::serialize_element;
    SerializeTupleStruct::serialize_field;
    SerializeTupleVariant::serialize_field;
    SerializeStruct::serialize_field(&'static str);
    SerializeStructVariant::serialize_field(&'static str);
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
