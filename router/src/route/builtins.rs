//! The builtin functions of the condition language (edgeHub `query/builtins`).
//!
//! Guarantees:
//! - Names are matched case-insensitively; the set is exactly edgeHub's:
//!   `abs exp power square ceiling floor sign sqrt as_number is_bool is_defined is_null
//!   is_number is_string concat length lower upper substring index_of starts_with ends_with
//!   contains twin_change_includes`.
//! - Argument counts and statically known argument types are checked at compile time.
//! - At run time a builtin never fails: an Undefined argument, or one of the wrong type, makes
//!   the result Undefined (the `is_*` functions instead answer `false`).
//! - String positions and lengths count UTF-16 code units, as .NET strings do, so
//!   `length`, `index_of` and `substring` agree with edgeHub on non-ASCII text.

use std::borrow::Cow;

use crate::route::condition::{Ty, Value};

/// A builtin function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Builtin {
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    AsNumber,
    IsBool,
    IsDefined,
    IsNull,
    IsNumber,
    IsString,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
    TwinChangeIncludes,
}

/// Argument counts and types of a builtin.
pub(crate) struct Signature {
    /// Types of the required arguments, then the optional ones.
    pub(crate) params: &'static [Ty],
    /// How many of `params` are required.
    pub(crate) required: usize,
    /// Whether further arguments of the last parameter's type are allowed.
    pub(crate) variadic: bool,
    /// Static type of the result.
    pub(crate) returns: Ty,
}

const ALL: [(&str, Builtin); 24] = [
    ("abs", Builtin::Abs),
    ("exp", Builtin::Exp),
    ("power", Builtin::Power),
    ("square", Builtin::Square),
    ("ceiling", Builtin::Ceiling),
    ("floor", Builtin::Floor),
    ("sign", Builtin::Sign),
    ("sqrt", Builtin::Sqrt),
    ("as_number", Builtin::AsNumber),
    ("is_bool", Builtin::IsBool),
    ("is_defined", Builtin::IsDefined),
    ("is_null", Builtin::IsNull),
    ("is_number", Builtin::IsNumber),
    ("is_string", Builtin::IsString),
    ("concat", Builtin::Concat),
    ("length", Builtin::Length),
    ("lower", Builtin::Lower),
    ("upper", Builtin::Upper),
    ("substring", Builtin::Substring),
    ("index_of", Builtin::IndexOf),
    ("starts_with", Builtin::StartsWith),
    ("ends_with", Builtin::EndsWith),
    ("contains", Builtin::Contains),
    ("twin_change_includes", Builtin::TwinChangeIncludes),
];

const fn sig(params: &'static [Ty], required: usize, returns: Ty) -> Signature {
    Signature {
        params,
        required,
        variadic: false,
        returns,
    }
}

impl Builtin {
    /// The builtin called `name` (any case).
    pub(crate) fn lookup(name: &str) -> Option<Builtin> {
        ALL.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, b)| *b)
    }

    /// The builtin's canonical (lower-case) name.
    pub(crate) fn name(self) -> &'static str {
        ALL.iter().find(|(_, b)| *b == self).map_or("?", |(n, _)| n)
    }

    pub(crate) fn signature(self) -> Signature {
        use Builtin::*;
        match self {
            Abs | Exp | Square | Ceiling | Floor | Sign | Sqrt => sig(&[Ty::Number], 1, Ty::Number),
            Power => sig(&[Ty::Number, Ty::Number], 2, Ty::Number),
            AsNumber => sig(&[Ty::Any], 1, Ty::Number),
            IsBool | IsDefined | IsNull | IsNumber | IsString => sig(&[Ty::Any], 1, Ty::Bool),
            Concat => Signature {
                params: &[Ty::String],
                required: 1,
                variadic: true,
                returns: Ty::String,
            },
            Length => sig(&[Ty::String], 1, Ty::Number),
            Lower | Upper => sig(&[Ty::String], 1, Ty::String),
            Substring => sig(&[Ty::String, Ty::Number, Ty::Number], 2, Ty::String),
            IndexOf => sig(&[Ty::String, Ty::String], 2, Ty::Number),
            StartsWith | EndsWith | Contains => sig(&[Ty::String, Ty::String], 2, Ty::Bool),
            TwinChangeIncludes => sig(&[], 0, Ty::Bool),
        }
    }

    /// Applies the builtin to evaluated arguments (never called for `twin_change_includes`).
    pub(crate) fn call<'a>(self, args: Vec<Value<'a>>) -> Value<'a> {
        use Builtin::*;
        match self {
            IsBool => Value::Bool(matches!(args.first(), Some(Value::Bool(_)))),
            IsDefined => Value::Bool(!matches!(args.first(), None | Some(Value::Undefined))),
            IsNull => Value::Bool(matches!(args.first(), Some(Value::Null))),
            IsNumber => Value::Bool(matches!(args.first(), Some(Value::Number(_)))),
            IsString => Value::Bool(matches!(args.first(), Some(Value::String(_)))),
            AsNumber => as_number(args.first()),
            Concat => concat(&args),
            Abs | Exp | Square | Ceiling | Floor | Sign | Sqrt | Power => math(self, &args),
            Length | Lower | Upper | Substring | IndexOf | StartsWith | EndsWith | Contains => {
                strings(self, &args)
            }
            TwinChangeIncludes => Value::Undefined,
        }
    }
}

fn number(v: Option<&Value<'_>>) -> Option<f64> {
    match v {
        Some(Value::Number(n)) => Some(*n),
        _ => None,
    }
}

fn string<'v>(v: Option<&'v Value<'_>>) -> Option<&'v str> {
    match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

fn math<'a>(builtin: Builtin, args: &[Value<'_>]) -> Value<'a> {
    let Some(x) = number(args.first()) else {
        return Value::Undefined;
    };
    let result = match builtin {
        Builtin::Abs => x.abs(),
        Builtin::Exp => x.exp(),
        Builtin::Square => x * x,
        Builtin::Ceiling => x.ceil(),
        Builtin::Floor => x.floor(),
        Builtin::Sqrt => x.sqrt(),
        Builtin::Sign if x.is_nan() => return Value::Undefined,
        Builtin::Sign if x == 0.0 => 0.0,
        Builtin::Sign => x.signum(),
        Builtin::Power => match number(args.get(1)) {
            Some(y) => x.powf(y),
            None => return Value::Undefined,
        },
        _ => return Value::Undefined,
    };
    Value::Number(result)
}

/// .NET `double.TryParse` with invariant culture, approximately: surrounding whitespace is
/// allowed, as are a sign, a decimal point and an exponent.
fn as_number<'a>(arg: Option<&Value<'_>>) -> Value<'a> {
    match arg {
        Some(Value::Number(n)) => Value::Number(*n),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map_or(Value::Undefined, Value::Number),
        _ => Value::Undefined,
    }
}

fn concat<'a>(args: &[Value<'_>]) -> Value<'a> {
    let mut out = String::new();
    for arg in args {
        match arg {
            Value::String(s) => out.push_str(s),
            _ => return Value::Undefined,
        }
    }
    Value::String(Cow::Owned(out))
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

fn strings<'a>(builtin: Builtin, args: &[Value<'_>]) -> Value<'a> {
    let Some(s) = string(args.first()) else {
        return Value::Undefined;
    };
    match builtin {
        Builtin::Length => Value::Number(utf16_len(s) as f64),
        Builtin::Lower => Value::String(Cow::Owned(s.to_lowercase())),
        Builtin::Upper => Value::String(Cow::Owned(s.to_uppercase())),
        Builtin::Substring => substring(s, args),
        _ => search(builtin, s, string(args.get(1))),
    }
}

fn search<'a>(builtin: Builtin, s: &str, needle: Option<&str>) -> Value<'a> {
    let Some(needle) = needle else {
        return Value::Undefined;
    };
    match builtin {
        Builtin::IndexOf => {
            Value::Number(s.find(needle).map_or(-1.0, |i| utf16_len(&s[..i]) as f64))
        }
        Builtin::StartsWith => Value::Bool(s.starts_with(needle)),
        Builtin::EndsWith => Value::Bool(s.ends_with(needle)),
        Builtin::Contains => Value::Bool(s.contains(needle)),
        _ => Value::Undefined,
    }
}

/// `substring(s, start[, length])` in UTF-16 units; out of range is Undefined (edgeHub throws,
/// which its evaluator turns into Undefined).
fn substring<'a>(s: &str, args: &[Value<'_>]) -> Value<'a> {
    let units: Vec<u16> = s.encode_utf16().collect();
    let Some(start) = index(args.get(1)) else {
        return Value::Undefined;
    };
    let end = match args.get(2) {
        None => Some(units.len()),
        Some(len) => index(Some(len)).and_then(|n| start.checked_add(n)),
    };
    match end {
        Some(end) if start <= end && end <= units.len() => {
            Value::String(Cow::Owned(String::from_utf16_lossy(&units[start..end])))
        }
        _ => Value::Undefined,
    }
}

/// A non-negative integer argument, truncated toward zero as a .NET `(int)` cast does.
fn index(v: Option<&Value<'_>>) -> Option<usize> {
    let n = number(v)?.trunc();
    (n.is_finite() && n >= 0.0 && n <= f64::from(u32::MAX)).then_some(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_round_trip() {
        for (name, builtin) in ALL {
            assert_eq!(Builtin::lookup(&name.to_uppercase()), Some(builtin));
            assert_eq!(builtin.name(), name);
        }
        assert_eq!(Builtin::lookup("nope"), None);
    }

    #[test]
    fn undefined_arguments_make_undefined_results() {
        let undefined = || vec![Value::Undefined, Value::Undefined];
        for builtin in [
            Builtin::Abs,
            Builtin::Concat,
            Builtin::Length,
            Builtin::Contains,
        ] {
            assert_eq!(builtin.call(undefined()), Value::Undefined, "{builtin:?}");
        }
        assert_eq!(Builtin::IsDefined.call(undefined()), Value::Bool(false));
    }
}
