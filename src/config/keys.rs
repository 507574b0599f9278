//! Every key path the configuration parser accepts, read from the parser's own types.
//!
//! The shipped example (`config/veer.toml`) and the configuration reference promise to show
//! every key; a hand-kept list would drift from [`super::raw`] the first time someone adds a
//! field. Instead this module walks the raw types with a tracing [`Deserializer`]: serde's
//! derive hands each struct's field names to `deserialize_struct`, so feeding every field a
//! tracer (and every `Option` a `Some`, every list one element) visits the whole shape once.
//! `toml::Spanned<T>` is looked through, so a spanned value is listed under its key like any
//! other.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::de::value::{BorrowedStrDeserializer, Error, UsizeDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use super::raw::RawConfig;

/// What a key path names in the file, so a checker can tell `[x]` from `[[x]]` from `x = …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyKind {
    /// A table written `[path]`.
    Table,
    /// An array of tables written `[[path]]`.
    TableArray,
    /// A value written `key = …` inside its table.
    Value,
}

/// Every key path veer's parser knows, such as `server.idle_timeout` or
/// `routes.rollout.steps`, with what it names, sorted by path. Array indexes are left out: a
/// key of any `[[routes]]` entry is `routes.<key>`.
///
/// Panics only if the raw types grow a shape the tracer cannot follow (the unit test below
/// would fail first): the shape is fixed at compile time, so there is no error to hand back.
pub fn key_paths() -> Vec<(String, KeyKind)> {
    let found = RefCell::new(BTreeMap::new());
    let tracer = Tracer { path: "", in_seq: false, found: &found };
    // The tracer only ever produces placeholder values, which the raw types accept; a failure
    // here means raw.rs grew a shape the tracer cannot see through, and must be fixed here.
    <RawConfig as serde::Deserialize>::deserialize(tracer)
        .unwrap_or_else(|e| panic!("cannot trace the configuration types: {e}"));
    found.into_inner().into_iter().collect()
}

/// The name `toml::Spanned` gives `deserialize_struct`; its three fields are the span and the
/// value, of which only the value is a key of the file. It is serde_spanned's private name:
/// were it ever renamed, `$__serde_spanned_private_*` paths would show up and the unit test
/// below fails.
const SPANNED: &str = "$__serde_spanned_private_Spanned";

/// Deserializes one value at `path`, recording what was asked for there.
#[derive(Clone, Copy)]
struct Tracer<'a> {
    path: &'a str,
    /// The value is an element of a list: a struct here is an array of tables.
    in_seq: bool,
    found: &'a RefCell<BTreeMap<String, KeyKind>>,
}

impl Tracer<'_> {
    fn record(&self, kind: KeyKind) {
        if !self.path.is_empty() {
            self.found.borrow_mut().insert(self.path.to_string(), kind);
        }
    }

    fn value(&self) {
        self.record(KeyKind::Value);
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($placeholder:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.value();
            visitor.$visit($placeholder)
        })*
    };
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    leaf! {
        deserialize_bool => visit_bool(false);
        deserialize_i8 => visit_i8(0);
        deserialize_i16 => visit_i16(0);
        deserialize_i32 => visit_i32(0);
        deserialize_i64 => visit_i64(0);
        deserialize_u8 => visit_u8(0);
        deserialize_u16 => visit_u16(0);
        deserialize_u32 => visit_u32(0);
        deserialize_u64 => visit_u64(0);
        deserialize_f32 => visit_f32(0.0);
        deserialize_f64 => visit_f64(0.0);
        deserialize_char => visit_char('x');
        deserialize_str => visit_str("");
        deserialize_string => visit_string(String::new());
        deserialize_bytes => visit_bytes(&[]);
        deserialize_byte_buf => visit_byte_buf(Vec::new());
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.value();
        visitor.visit_unit()
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format_args!(
            "`{}` is read by a self-describing deserializer (untagged enum or custom impl) the tracer cannot follow",
            self.path
        )))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(OneElement { element: Some(Tracer { in_seq: true, ..self }) })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format_args!(
            "`{}` is a map with free-form keys, which the tracer cannot list",
            self.path
        )))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == SPANNED {
            return visitor.visit_map(SpannedFields { tracer: self, fields, next: 0 });
        }
        self.record(if self.in_seq { KeyKind::TableArray } else { KeyKind::Table });
        visitor.visit_map(StructFields { tracer: self, fields, next: 0, child: String::new() })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(format_args!("`{}` is an enum, which the tracer does not follow", self.path)))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// A list with one traced element, enough to see the element's shape.
struct OneElement<'a> {
    element: Option<Tracer<'a>>,
}

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.element.take().map(|t| seed.deserialize(t)).transpose()
    }
}

/// A struct's fields, each traced at `path.field`.
struct StructFields<'a> {
    tracer: Tracer<'a>,
    fields: &'static [&'static str],
    next: usize,
    /// The path of the field whose key was handed out last.
    child: String,
}

impl<'de> MapAccess<'de> for StructFields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else { return Ok(None) };
        self.next += 1;
        self.child =
            if self.tracer.path.is_empty() { field.to_string() } else { format!("{}.{field}", self.tracer.path) };
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(field)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(Tracer { path: &self.child, in_seq: false, found: self.tracer.found })
    }
}

/// `toml::Spanned`'s fields: a dummy span, and the value traced at the spanned key's own path.
struct SpannedFields<'a> {
    tracer: Tracer<'a>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> MapAccess<'de> for SpannedFields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else { return Ok(None) };
        self.next += 1;
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(field)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        // The last field is the value; the ones before it are the span's start and end.
        if self.next == self.fields.len() {
            seed.deserialize(self.tracer)
        } else {
            let span: UsizeDeserializer<Error> = 0usize.into_deserializer();
            seed.deserialize(span)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(path: &str) -> Option<KeyKind> {
        key_paths().into_iter().find(|(p, _)| p == path).map(|(_, k)| k)
    }

    #[test]
    fn lists_spanned_optional_and_renamed_keys() {
        assert_eq!(kind("server"), Some(KeyKind::Table));
        assert_eq!(kind("server.idle_timeout"), Some(KeyKind::Value));
        assert_eq!(kind("routes"), Some(KeyKind::TableArray));
        assert_eq!(kind("notify"), Some(KeyKind::TableArray));
        assert_eq!(kind("notify.events"), Some(KeyKind::Value));
        assert_eq!(kind("routes.rollout.steps"), Some(KeyKind::Value));
        assert_eq!(kind("routes.stable.endpoints"), Some(KeyKind::Value));
        assert_eq!(kind("routes.sticky"), Some(KeyKind::Table));
        assert_eq!(kind("routes.sticky.cookie"), Some(KeyKind::Value));
        assert_eq!(kind("routes.override.header"), Some(KeyKind::Value));
        assert_eq!(kind("routes.override_"), None);
        assert!(key_paths().iter().all(|(p, _)| !p.contains('$')), "{:?}", key_paths());
    }
}
