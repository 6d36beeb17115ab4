//! Reading only the parts of a JSON document that a decision looks at.
//!
//! An AdmissionReview is mostly its object, and most objects a webhook configuration sends are
//! not ours. [`read`] walks the body once and builds a [`Value`] holding only the listed keys;
//! what it is told to keep raw ([`Keep::Raw`]), such as the object, is copied out as text
//! without being parsed, and everything else is skipped without being built. The result has
//! exactly the values a full parse would have at the kept paths (a duplicate key keeps its
//! last value, as in a full parse), so the code reading it is the code that read the full
//! document; syntax errors are the parser's own, at the same positions.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

/// What to keep of a JSON value.
#[derive(Debug, Clone, Copy)]
pub enum Keep {
    /// The whole value, parsed.
    Value,
    /// Of an object, only these keys (each kept as said); a value that is not an object is
    /// kept whole.
    Keys(&'static [(&'static str, Keep)]),
    /// The value's text, unparsed, into slot `n` of the raw slots (not in the result).
    Raw(usize),
}

/// Raw texts kept by [`Keep::Raw`], by slot.
pub type RawSlots = [Option<Box<RawValue>>];

/// Reads `text` keeping what `keep` says; raw values go into `raws`.
pub fn read(text: &[u8], keep: Keep, raws: &mut RawSlots) -> serde_json::Result<Value> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let value = Pruned { keep, raws }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

struct Pruned<'r> {
    keep: Keep,
    raws: &'r mut RawSlots,
}

impl<'de> DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.keep {
            Keep::Value => de::Deserialize::deserialize(deserializer),
            Keep::Raw(slot) => {
                let raw: Box<RawValue> = de::Deserialize::deserialize(deserializer)?;
                if let Some(place) = self.raws.get_mut(slot) {
                    *place = Some(raw);
                }
                Ok(Value::Null)
            }
            Keep::Keys(keys) => deserializer.deserialize_any(KeysVisitor {
                keys,
                raws: self.raws,
            }),
        }
    }
}

struct KeysVisitor<'r> {
    keys: &'static [(&'static str, Keep)],
    raws: &'r mut RawSlots,
}

impl<'de> Visitor<'de> for KeysVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(found) = map.next_key_seed(KeyIndex(self.keys))? {
            match found.and_then(|i| self.keys.get(i)) {
                Some((name, keep)) => {
                    let value = map.next_value_seed(Pruned {
                        keep: *keep,
                        raws: self.raws,
                    })?;
                    if !matches!(keep, Keep::Raw(_)) {
                        kept.insert((*name).to_owned(), value);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }

    // Not an object: kept whole, as a full parse would have it.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// Which of the listed keys a key is, without building it.
struct KeyIndex(&'static [(&'static str, Keep)]);

impl<'de> DeserializeSeed<'de> for KeyIndex {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIndex {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|(name, _)| *name == key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    const KEEP: Keep = Keep::Keys(&[
        ("kind", Keep::Value),
        (
            "request",
            Keep::Keys(&[("uid", Keep::Value), ("object", Keep::Raw(0))]),
        ),
    ]);

    #[rstest]
    #[case::only_listed_keys(
        r#"{"kind":"K","other":{"big":[1,2,3]},"request":{"uid":"u","x":1,"object":{"a":[1, 2]}}}"#,
        json!({"kind": "K", "request": {"uid": "u"}}),
        Some(r#"{"a":[1, 2]}"#)
    )]
    #[case::duplicate_keys_keep_the_last(
        r#"{"kind":"A","kind":"B","request":{"object":1,"object":{"b":2}}}"#,
        json!({"kind": "B", "request": {}}),
        Some(r#"{"b":2}"#)
    )]
    #[case::not_an_object_is_kept_whole(r#"[1,{"kind":"K"}]"#, json!([1, {"kind": "K"}]), None)]
    #[case::a_request_of_another_type(
        r#"{"request":"text"}"#,
        json!({"request": "text"}),
        None
    )]
    #[case::escaped_keys(
        r#"{"ki\u006ed":"K","request":{"uid":"\u0075"}}"#,
        json!({"kind": "K", "request": {"uid": "u"}}),
        None
    )]
    fn keeps_what_a_full_parse_has_at_the_kept_paths(
        #[case] text: &str,
        #[case] expected: Value,
        #[case] raw: Option<&str>,
    ) {
        let mut raws = [None];
        let kept = read(text.as_bytes(), KEEP, &mut raws).expect("reads");
        assert_eq!(kept, expected);
        assert_eq!(raws[0].as_ref().map(|r| r.get()), raw);
        let full: Value = serde_json::from_str(text).expect("json");
        for pointer in ["/kind", "/request/uid"] {
            assert_eq!(kept.pointer(pointer), full.pointer(pointer), "{pointer}");
        }
    }

    #[rstest]
    #[case::empty("")]
    #[case::not_json("not json")]
    #[case::truncated(r#"{"kind":"AdmissionReview","request":{"object":{"a":"#)]
    #[case::trailing(r#"{"kind":"K"} x"#)]
    #[case::bad_skipped_value(r#"{"other":[1,,2],"kind":"K"}"#)]
    fn syntax_errors_are_the_parsers_own(#[case] text: &str) {
        let error = read(text.as_bytes(), KEEP, &mut [None]).expect_err("invalid");
        let full = serde_json::from_str::<Value>(text).expect_err("invalid");
        assert_eq!(error.to_string(), full.to_string());
    }
}
