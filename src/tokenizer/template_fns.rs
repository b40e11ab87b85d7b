//! What Hugging Face's template environment adds to Jinja, for minijinja: the
//! `tojson` filter as Python's `json.dumps` writes JSON, and `strftime_now`.
//! (`raise_exception` is in [`super::chat`]; Python's string, list and dict methods
//! come from minijinja-contrib's pycompat.)
//!
//! Published templates print tool schemas and tool-call arguments with `tojson`, so
//! the prompt a model was trained on has Python's spelling of JSON: `", "` and `": "`
//! between items (`","` with an indent), keys in their given order, non-ASCII text
//! as it is, floats as Python's `repr`. minijinja's own `tojson` writes compact,
//! HTML-escaped JSON, which would give the model a prompt it never saw.
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// `value|tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`,
/// as transformers defines it: `json.dumps` with these arguments.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a count",
                )
            })?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        // json.dumps: ", " without an indent, "," with one (lines end the items).
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let w = JsonWriter {
        indent,
        item,
        key,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    w.value(value, 0, &mut out)?;
    Ok(out)
}

struct JsonWriter {
    indent: Option<String>,
    item: String,
    key: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Containers nested deeper than this are refused (Python's limit is its recursion
/// limit, about 1000; a template cannot build a cycle, but a hostile one can nest).
const MAX_DEPTH: usize = 512;

impl JsonWriter {
    fn value(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: nested too deep",
            ));
        }
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => match f64::try_from(v.clone()) {
                Ok(f) => out.push_str(&python_float(f)),
                Err(_) => out.push_str(&v.to_string()),
            },
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, out, |i, out| {
                    self.value(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container('{', '}', keys.len(), depth, out, |i, out| {
                    let k = &keys[i];
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key);
                    self.value(&v.get_item(k)?, depth + 1, out)
                })?;
            }
            ValueKind::Undefined => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: an undefined value is not JSON serializable",
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// `[` items `]` with json.dumps's separators and indentation.
    fn container(
        &self,
        open: char,
        close: char,
        n: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if n == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..n {
            if i > 0 {
                out.push_str(&self.item);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(depth + 1));
            }
            item(i, out)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    /// A JSON string as json.dumps escapes it.
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (and so `json.dumps`): the shortest digits
/// that read back the same, positional from 1e-4 up to 1e16, else `1.5e+16`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// How `{{ value }}` prints, as Python's `str`: `True`, `None`, floats as `repr`, and
/// lists and dicts as their `repr` (`{'type': 'function', ...}`: Apriel's template
/// prints tool schemas this way). Strings and the rest print as minijinja prints them.
pub fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    match python_str(value)? {
        Some(s) => out.write_str(&s).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    }
}

/// The `string` filter, as Python's `str` (see [`python_formatter`]).
pub fn string(value: &Value) -> Result<String, Error> {
    Ok(python_str(value)?.unwrap_or_else(|| value.to_string()))
}

/// Python's `str` of `value` where it differs from minijinja's display.
fn python_str(value: &Value) -> Result<Option<String>, Error> {
    let mut s = String::new();
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            python_repr(value, 0, &mut s)?
        }
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) => s = python_float(f),
            Err(_) => return Ok(None),
        },
        _ => return Ok(None),
    }
    Ok(Some(s))
}

/// Python's `repr` of a value.
fn python_repr(v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "nested too deep to print",
        ));
    }
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) => out.push_str(
                &python_float(f)
                    .replace("Infinity", "inf")
                    .replace("NaN", "nan"),
            ),
            Err(_) => out.push_str(&v.to_string()),
        },
        ValueKind::String => python_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, depth + 1, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, k) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&k, depth + 1, out)?;
                out.push_str(": ");
                python_repr(&v.get_item(&k)?, depth + 1, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

/// Python's `repr` of a string: single quotes unless it holds one and no double quote.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// The `iterable` test as Python's: `iter(value)` works. minijinja's says yes to
/// none, and templates guard `tools|length` with `tools is iterable` when no tools
/// are given (Qwen3-Coder, Nemotron).
pub fn is_iterable(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Iterable
            | ValueKind::String
            | ValueKind::Bytes
            | ValueKind::Undefined
    )
}

/// `strftime_now(format)`: the local time now, formatted as C's `strftime` (which
/// Python's `datetime.strftime` follows on Linux). Llama 3.x templates print today's
/// date with it.
pub fn strftime_now(format: String) -> Result<String, Error> {
    let bad = || Error::new(ErrorKind::InvalidOperation, "strftime_now: bad format");
    let c_format = std::ffi::CString::new(format).map_err(|_| bad())?;
    // SAFETY: time(NULL) only returns the clock.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: no local time",
        ));
    }
    let mut buf = vec![0u8; 256];
    // SAFETY: buf has buf.len() writable bytes; the format is NUL-terminated; tm was
    // filled by localtime_r.
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm) };
    buf.truncate(n);
    String::from_utf8(buf).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::{context, Environment};

    fn render(source: &str, ctx: Value) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(source, ctx).unwrap()
    }

    #[test]
    fn floats_as_python_writes_them() {
        for (f, py) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (123.456, "123.456"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float(f), py, "{f}");
        }
    }

    #[test]
    fn tojson_matches_json_dumps() {
        // json.dumps({"b": [1, 2.0, None, True], "a": "é\"\n\u0001"}, ensure_ascii=False)
        let list = Value::from(vec![
            Value::from(1),
            Value::from(2.0),
            Value::from(()),
            Value::from(true),
        ]);
        let x = Value::from_iter([("b", list), ("a", Value::from("é\"\n\u{1}"))]);
        let ctx = context! { x };
        assert_eq!(
            render("{{ x|tojson }}", ctx.clone()),
            r#"{"b": [1, 2.0, null, true], "a": "é\"\n\u0001"}"#
        );
        assert_eq!(
            render("{{ x|tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    2.0,\n    null,\n    true\n  ],\n  \"a\": \"é\\\"\\n\\u0001\"\n}"
        );
        assert_eq!(
            render(
                "{{ x|tojson(sort_keys=true, ensure_ascii=true) }}",
                ctx.clone()
            ),
            r#"{"a": "\u00e9\"\n\u0001", "b": [1, 2.0, null, true]}"#
        );
        assert_eq!(
            render("{{ x|tojson(separators=[',', ':']) }}", ctx),
            r#"{"b":[1,2.0,null,true],"a":"é\"\n\u0001"}"#
        );
        assert_eq!(render("{{ []|tojson(indent=4) }}", context! {}), "[]");
        assert_eq!(
            render("{{ '🦀'|tojson(ensure_ascii=true) }}", context! {}),
            r#""\ud83e\udd80""#
        );
    }

    #[test]
    fn values_print_as_python_prints_them() {
        let mut env = Environment::new();
        env.set_formatter(python_formatter);
        let x = Value::from_iter([
            ("s", Value::from("it's \"q\"\n")),
            ("n", Value::from(())),
            ("b", Value::from(true)),
            (
                "l",
                Value::from(vec![Value::from(1), Value::from(2.5), Value::from("x")]),
            ),
        ]);
        let out = env
            .render_str(
                "{{ x }}|{{ true }}|{{ none }}|{{ 1.0 }}|{{ 'plain' }}|{{ \"it's\" }}",
                context! { x => x.clone() },
            )
            .unwrap();
        assert_eq!(
            out,
            r#"{'s': 'it\'s "q"\n', 'n': None, 'b': True, 'l': [1, 2.5, 'x']}|True|None|1.0|plain|it's"#
        );
        assert_eq!(string(&x).unwrap(), out.split('|').next().unwrap());
        assert_eq!(string(&Value::from("text")).unwrap(), "text");
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let year = strftime_now("%Y".into()).unwrap();
        assert_eq!(year.len(), 4);
        assert!(year.parse::<u32>().unwrap() >= 2024);
        assert!(strftime_now("a\0b".into()).is_err());
    }
}
