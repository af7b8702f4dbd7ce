//! Plain numbers written and read without serde: the same bytes postcard writes for a
//! number (or a one-tuple of one, a `map`'s item), by a loop made for them.
//!
//! A `map` over numbers spends most of its time per item in postcard's generic machinery:
//! the pool encoding each argument, the worker decoding it and encoding its result, the
//! pool decoding that. For the types below, those four steps go through [`write`] and
//! [`read`] instead, which produce and accept exactly postcard's bytes (varints for the
//! integers wider than a byte, zigzag for the signed ones, raw bytes for `u8`, `i8`,
//! `bool` and the floats): the wire is unchanged, and a frame cut short or holding bytes
//! postcard would refuse is left to postcard ([`read`] answers `None`), whose error it is
//! as before.
//!
//! Which type a value has is known at compile time: each check below is a comparison of
//! type ids that the compiler settles per monomorphized function, so a non-plain type
//! pays nothing.

use std::any::Any;

/// The longest encoding of a plain value, in bytes (a `u64` varint).
pub(crate) const MAX_LEN: usize = 10;

/// Whether `T` is one of the plain types, or a one-tuple of one.
#[inline(always)]
pub(crate) fn is_plain<T: 'static>() -> bool {
    plain_len::<T>().is_some()
}

/// The longest encoding of `T` if it is plain.
#[inline(always)]
fn plain_len<T: 'static>() -> Option<usize> {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    macro_rules! widths {
        ($($ty:ty => $n:expr),*) => {
            $(
                if t == TypeId::of::<$ty>() || t == TypeId::of::<($ty,)>() {
                    return Some($n);
                }
            )*
        };
    }
    widths!(
        u8 => 1, i8 => 1, bool => 1,
        u16 => 3, i16 => 3,
        u32 => 5, i32 => 5,
        u64 => 10, i64 => 10, usize => 10, isize => 10,
        f32 => 4, f64 => 8
    );
    None
}

/// Writes `x` as a varint at the start of `out` (room for [`MAX_LEN`] bytes): how many
/// bytes it took.
#[inline(always)]
fn put_varint(mut x: u64, out: &mut [u8; MAX_LEN]) -> usize {
    let mut n = 0;
    while x >= 0x80 {
        out[n] = (x as u8) | 0x80;
        x >>= 7;
        n += 1;
    }
    out[n] = x as u8;
    n + 1
}

/// A varint of at most `max` bytes from the front of `b` whose last byte is at most
/// `last_max` when it is the `max`th (postcard's limits for the type): the value and the
/// bytes it took; `None` if `b` ends first or the varint breaks a limit.
#[inline(always)]
fn take_varint(b: &[u8], max: usize, last_max: u8) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for i in 0..max {
        let byte = *b.get(i)?;
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == max - 1 && byte > last_max {
                return None;
            }
            return Some((x, i + 1));
        }
    }
    None
}

#[inline(always)]
fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

#[inline(always)]
fn unzigzag(x: u64) -> i64 {
    ((x >> 1) as i64) ^ -((x & 1) as i64)
}

/// Writes `v` as postcard does into `out`, if it is plain: how many bytes it took.
#[inline(always)]
pub(crate) fn write<T: 'static>(v: &T, out: &mut [u8; MAX_LEN]) -> Option<usize> {
    let a: &dyn Any = v;
    macro_rules! unsigned {
        ($($ty:ty),*) => {
            $(
                if let Some(&x) = a.downcast_ref::<$ty>().or(a.downcast_ref::<($ty,)>().map(|t| &t.0)) {
                    return Some(put_varint(x as u64, out));
                }
            )*
        };
    }
    macro_rules! signed {
        ($($ty:ty),*) => {
            $(
                if let Some(&x) = a.downcast_ref::<$ty>().or(a.downcast_ref::<($ty,)>().map(|t| &t.0)) {
                    return Some(put_varint(zigzag(x as i64), out));
                }
            )*
        };
    }
    macro_rules! raw {
        ($($ty:ty => $f:expr),*) => {
            $(
                if let Some(&x) = a.downcast_ref::<$ty>().or(a.downcast_ref::<($ty,)>().map(|t| &t.0)) {
                    let bytes = $f(x);
                    out[..bytes.len()].copy_from_slice(&bytes);
                    return Some(bytes.len());
                }
            )*
        };
    }
    unsigned!(u64, u32, u16, usize);
    signed!(i64, i32, i16, isize);
    raw!(
        u8 => |x: u8| [x],
        i8 => |x: i8| [x as u8],
        bool => |x: bool| [u8::from(x)],
        f64 => |x: f64| x.to_le_bytes(),
        f32 => |x: f32| x.to_le_bytes()
    );
    None
}

/// Reads a plain `T` from the front of `b` as postcard would: the value and the bytes it
/// took; `None` if `T` is not plain, or `b` does not start with a value postcard would
/// accept (decode it with postcard then, for its error).
#[inline(always)]
pub(crate) fn read<T: 'static>(b: &[u8]) -> Option<(T, usize)> {
    let mut slot: Option<T> = None;
    let any: &mut dyn Any = &mut slot;
    macro_rules! unsigned {
        ($($ty:ty => $max:expr, $last:expr);*) => {
            $(
                if any.is::<Option<$ty>>() || any.is::<Option<($ty,)>>() {
                    let (x, n) = take_varint(b, $max, $last)?;
                    let x = <$ty>::try_from(x).ok()?;
                    put(any, x);
                    return slot.map(|v| (v, n));
                }
            )*
        };
    }
    macro_rules! signed {
        ($($ty:ty => $max:expr, $last:expr);*) => {
            $(
                if any.is::<Option<$ty>>() || any.is::<Option<($ty,)>>() {
                    let (x, n) = take_varint(b, $max, $last)?;
                    let x = <$ty>::try_from(unzigzag(x)).ok()?;
                    put(any, x);
                    return slot.map(|v| (v, n));
                }
            )*
        };
    }
    // postcard's limits: the number of bytes and the largest last byte of a full varint.
    unsigned!(u64 => 10, 0x01; u32 => 5, 0x0f; u16 => 3, 0x03; usize => 10, 0x01);
    signed!(i64 => 10, 0x01; i32 => 5, 0x0f; i16 => 3, 0x03; isize => 10, 0x01);
    if any.is::<Option<u8>>() || any.is::<Option<(u8,)>>() {
        put(any, *b.first()?);
        return slot.map(|v| (v, 1));
    }
    if any.is::<Option<i8>>() || any.is::<Option<(i8,)>>() {
        put(any, *b.first()? as i8);
        return slot.map(|v| (v, 1));
    }
    if any.is::<Option<bool>>() || any.is::<Option<(bool,)>>() {
        let x = match *b.first()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        put(any, x);
        return slot.map(|v| (v, 1));
    }
    if any.is::<Option<f64>>() || any.is::<Option<(f64,)>>() {
        let x = f64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        put(any, x);
        return slot.map(|v| (v, 8));
    }
    if any.is::<Option<f32>>() || any.is::<Option<(f32,)>>() {
        let x = f32::from_le_bytes(b.get(..4)?.try_into().ok()?);
        put(any, x);
        return slot.map(|v| (v, 4));
    }
    None
}

/// Stores `x` into `slot`, an `Option<X>` or an `Option<(X,)>`.
#[inline(always)]
fn put<X: 'static>(slot: &mut dyn Any, x: X) {
    if let Some(s) = slot.downcast_mut::<Option<X>>() {
        *s = Some(x);
    } else if let Some(s) = slot.downcast_mut::<Option<(X,)>>() {
        *s = Some((x,));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// `v` through [`write`] is postcard's bytes, and [`read`] of them is `v` again, with
    /// a byte after it left alone.
    fn round<T>(v: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
    {
        let expected = postcard::to_allocvec(&v).unwrap();
        let mut out = [0u8; MAX_LEN];
        let n = write(&v, &mut out).expect("plain");
        assert_eq!(&out[..n], &expected[..], "{v:?}");
        let mut bytes = expected.clone();
        bytes.push(0xee);
        let (back, took) = read::<T>(&bytes).expect("reads back");
        assert_eq!((back, took), (v, n));
        // Cut short: left to postcard.
        assert!(read::<T>(&expected[..n - 1]).is_none());
    }

    #[test]
    fn plain_values_are_postcards_bytes_both_ways() {
        for x in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            round(x);
            round((x,));
            round(x as usize);
            round(x as i64);
            round((x as i64).wrapping_neg());
            round(x as isize);
            round(x as u32);
            round(x as i32);
            round(x as u16);
            round(x as i16);
            round(x as u8);
            round((x as i8,));
            round(x as f64);
            round((x as f32,));
        }
        round(true);
        round((false,));
        round(f64::NAN.to_bits());
        assert!(!is_plain::<String>() && !is_plain::<(u64, u64)>() && !is_plain::<char>());
        assert!(is_plain::<(u64,)>() && is_plain::<i16>());
        assert_eq!(write(&"no".to_string(), &mut [0; MAX_LEN]), None);
        assert!(read::<String>(&[0]).is_none());
    }

    #[test]
    fn every_length_of_varint_both_ways() {
        for bits in 0..64 {
            for x in [
                1u64 << bits,
                (1u64 << bits) - 1,
                (1u64 << bits) | 0x55,
                u64::MAX >> bits,
            ] {
                round(x);
                round(x as i64);
                // With bytes after it, and at the very end of the input.
                let mut b = postcard::to_allocvec(&x).unwrap();
                let n = b.len();
                assert_eq!(read::<u64>(&b), Some((x, n)));
                b.extend_from_slice(&[0x80; 9]);
                assert_eq!(read::<u64>(&b), Some((x, n)));
            }
        }
    }

    #[test]
    fn bytes_postcard_refuses_are_left_to_it() {
        // Too long, or a last byte past the type's bits: postcard refuses them, and so
        // read leaves them.
        let cases: Vec<Vec<u8>> = vec![
            vec![0xff; 11],
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
        ];
        for b in &cases {
            assert!(postcard::from_bytes::<u64>(b).is_err());
            assert!(read::<u64>(b).is_none());
        }
        for b in [
            vec![0xff, 0xff, 0xff, 0xff, 0x10],
            vec![0x80, 0x80, 0x80, 0x80, 0x80],
        ] {
            assert!(postcard::take_from_bytes::<u32>(&b).is_err());
            assert!(read::<(u32,)>(&b).is_none());
        }
        assert!(postcard::from_bytes::<bool>(&[2]).is_err());
        assert!(read::<bool>(&[2]).is_none());
        assert!(read::<(f64,)>(&[0; 7]).is_none());
        // A varint postcard takes in more bytes than needed reads the same.
        assert_eq!(postcard::from_bytes::<u64>(&[0x81, 0x00]).unwrap(), 1);
        assert_eq!(read::<u64>(&[0x81, 0x00]), Some((1, 2)));
    }
}
