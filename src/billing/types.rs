//! The billing database's column types as nasd reads them (pure, table-tested): which
//! types can be used and what value each becomes in an account's variables.
//!
//! Integers stay integers, strings stay strings, NULL leaves the variable out (a
//! template that needs it fails with "undefined variable"), decimals become integers
//! when they have no fraction (`10240.00` -> `10240`) and keep their exact text
//! otherwise (`12.50`), dates and times become `YYYY-MM-DD[ HH:MM:SS]` text. A column
//! of another type is named in the error, with the cast that fixes it.

use crate::config::billing::BillingKind;
use crate::model::Vars;

/// How a column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Int,
    UInt,
    Float,
    /// Exact decimal: text on MySQL, PostgreSQL's binary NUMERIC.
    Decimal,
    Text,
    /// Bytes that must be UTF-8 text (MySQL BINARY, VARBINARY, BLOB).
    Binary,
    Bool,
    Json,
    Date,
    DateTime,
    /// A point in time (MySQL TIMESTAMP, PostgreSQL TIMESTAMPTZ), shown in UTC.
    Timestamp,
    /// PostgreSQL INET and CIDR.
    Inet,
    /// A column that is always NULL (`SELECT NULL AS x` on MySQL).
    Null,
}

/// The kind of a column from the name of its type as sqlx gives it; None: nasd cannot
/// use it.
pub fn column_kind(kind: BillingKind, type_name: &str) -> Option<ColumnKind> {
    use ColumnKind::*;
    let t = type_name.to_ascii_uppercase();
    Some(match kind {
        BillingKind::MySql => match t.as_str() {
            "BOOLEAN" | "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" => Int,
            "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
            | "BIGINT UNSIGNED" | "YEAR" | "BIT" => UInt,
            "FLOAT" | "DOUBLE" => Float,
            "DECIMAL" => Decimal,
            "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM"
            | "SET" | "JSON" => Text,
            "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => Binary,
            "DATE" => Date,
            "DATETIME" => DateTime,
            "TIMESTAMP" => Timestamp,
            "NULL" => Null,
            _ => return None,
        },
        BillingKind::Postgres => match t.as_str() {
            "INT2" | "INT4" | "INT8" => Int,
            "OID" => UInt,
            "FLOAT4" | "FLOAT8" => Float,
            "NUMERIC" => Decimal,
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" | "UNKNOWN" => Text,
            "BOOL" => Bool,
            "JSON" | "JSONB" => Json,
            "DATE" => Date,
            "TIMESTAMP" => DateTime,
            "TIMESTAMPTZ" => Timestamp,
            "INET" | "CIDR" => Inet,
            "VOID" => Null,
            _ => return None,
        },
    })
}

/// The error for a column nasd cannot use: its name, its type and the cast that helps.
pub fn unusable(kind: BillingKind, column: &str, type_name: &str) -> String {
    let cast = match kind {
        BillingKind::MySql => format!("CAST({column} AS CHAR)"),
        BillingKind::Postgres => format!("{column}::text"),
    };
    format!(
        "column {column} has type {type_name} that nasd cannot use: cast it in the query ({cast} AS {column})"
    )
}

/// A decimal's value: an integer when it has no fraction, else its exact text.
pub fn decimal_value(text: &str) -> serde_json::Value {
    let text = text.trim();
    let whole = match text.split_once('.') {
        Some((whole, fraction)) if fraction.bytes().all(|b| b == b'0') => whole,
        Some(_) => return text.into(),
        None => text,
    };
    match whole.parse::<i64>() {
        Ok(n) => n.into(),
        Err(_) => text.into(),
    }
}

/// PostgreSQL's binary NUMERIC as decimal text (`-12.50`, `NaN`).
pub fn pg_numeric_text(bytes: &[u8]) -> Result<String, String> {
    let word = |i: usize| -> Result<u16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric: value too short".to_string())
    };
    let ndigits = usize::from(word(0)?);
    let weight = word(1)? as i16 as i32;
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        other => return Err(format!("numeric: unknown sign {other:#x}")),
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<_, _>>()?;
    // Digit i (base 10000) stands at 10000^(weight - i).
    let mut int_part = String::new();
    if weight >= 0 {
        for i in 0..=weight {
            let d = digits.get(i as usize).copied().unwrap_or(0);
            if int_part.is_empty() {
                if d != 0 {
                    int_part = d.to_string();
                }
            } else {
                int_part.push_str(&format!("{d:04}"));
            }
        }
    }
    if int_part.is_empty() {
        int_part.push('0');
    }
    let mut frac = String::new();
    let mut i = weight + 1;
    while frac.len() < dscale {
        let d = if i >= 0 {
            digits.get(i as usize).copied().unwrap_or(0)
        } else {
            0
        };
        frac.push_str(&format!("{d:04}"));
        i += 1;
    }
    frac.truncate(dscale);
    let negative = sign == 0x4000 && (int_part != "0" || frac.bytes().any(|b| b != b'0'));
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    out.push_str(&int_part);
    if dscale > 0 {
        out.push('.');
        out.push_str(&frac);
    }
    Ok(out)
}

/// PostgreSQL's binary INET / CIDR as text (`10.0.0.1`, `10.0.0.0/24`).
pub fn pg_inet_text(bytes: &[u8]) -> Result<String, String> {
    let [family, bits, _is_cidr, len, addr @ ..] = bytes else {
        return Err("inet: value too short".into());
    };
    let addr: std::net::IpAddr = match (*family, *len, addr.len()) {
        (2, 4, 4) => std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).into(),
        (3, 16, 16) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(addr);
            std::net::Ipv6Addr::from(octets).into()
        }
        _ => return Err(format!("inet: unknown family {family}")),
    };
    let full = if addr.is_ipv4() { 32 } else { 128 };
    Ok(if *bits == full {
        addr.to_string()
    } else {
        format!("{addr}/{bits}")
    })
}

/// Variables from a row's columns (in order, NULLs already left out). A JSON object in
/// a column named `extra` (JSON, or text holding JSON) is merged in without overriding
/// a column; names are lowercased when `lowercase` (the events source matches columns
/// by name whatever their case).
pub fn vars_from_columns(columns: Vec<(String, serde_json::Value)>, lowercase: bool) -> Vars {
    let mut vars = Vars::new();
    let mut extras = Vec::new();
    for (name, value) in columns {
        let name = if lowercase {
            name.to_ascii_lowercase()
        } else {
            name
        };
        if name == "extra" {
            match value {
                serde_json::Value::Object(map) => extras.push(map),
                serde_json::Value::String(text) => {
                    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) {
                        extras.push(map);
                    }
                }
                _ => {}
            }
            continue;
        }
        vars.insert(name, value);
    }
    for map in extras {
        for (k, v) in map {
            vars.entry(k).or_insert(v);
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use BillingKind::{MySql, Postgres};
    use ColumnKind::*;

    #[test]
    fn column_kinds() {
        for (db, name, want) in [
            (MySql, "BIGINT", Some(Int)),
            (MySql, "BOOLEAN", Some(Int)),
            (MySql, "INT UNSIGNED", Some(UInt)),
            (MySql, "DECIMAL", Some(Decimal)),
            (MySql, "VARCHAR", Some(Text)),
            (MySql, "ENUM", Some(Text)),
            (MySql, "LONGTEXT", Some(Text)),
            (MySql, "VARBINARY", Some(Binary)),
            (MySql, "DATETIME", Some(DateTime)),
            (MySql, "TIMESTAMP", Some(Timestamp)),
            (MySql, "NULL", Some(Null)),
            (MySql, "GEOMETRY", None),
            (MySql, "TIME", None),
            (Postgres, "INT4", Some(Int)),
            (Postgres, "NUMERIC", Some(Decimal)),
            (Postgres, "TEXT", Some(Text)),
            (Postgres, "JSONB", Some(Json)),
            (Postgres, "INET", Some(Inet)),
            (Postgres, "TIMESTAMPTZ", Some(Timestamp)),
            (Postgres, "BYTEA", None),
            (Postgres, "UUID", None),
            (Postgres, "INT4[]", None),
        ] {
            assert_eq!(column_kind(db, name), want, "{db:?} {name}");
        }
        assert_eq!(
            unusable(MySql, "geo", "GEOMETRY"),
            "column geo has type GEOMETRY that nasd cannot use: cast it in the query (CAST(geo AS CHAR) AS geo)"
        );
        assert!(unusable(Postgres, "u", "UUID").contains("(u::text AS u)"));
    }

    #[test]
    fn decimals() {
        for (text, want) in [
            ("10240", serde_json::json!(10240)),
            ("10240.00", serde_json::json!(10240)),
            ("-5.0", serde_json::json!(-5)),
            ("12.50", serde_json::json!("12.50")),
            ("0.001", serde_json::json!("0.001")),
            (
                "99999999999999999999",
                serde_json::json!("99999999999999999999"),
            ),
        ] {
            assert_eq!(decimal_value(text), want, "{text}");
        }
    }

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale] {
            out.extend(w.to_be_bytes());
        }
        for d in digits {
            out.extend(d.to_be_bytes());
        }
        out
    }

    #[test]
    fn pg_numerics() {
        for (bytes, want) in [
            (numeric(0, 0, 0, 0, &[]), "0"),
            (numeric(1, 0, 0, 0, &[10]), "10"),
            (numeric(2, 1, 0, 0, &[1, 240]), "10240"),
            (numeric(2, 0, 0, 2, &[12, 5000]), "12.50"),
            (numeric(2, 0, 0x4000, 2, &[12, 5000]), "-12.50"),
            (numeric(1, -1, 0, 3, &[10]), "0.001"),
            (numeric(1, 1, 0, 2, &[1]), "10000.00"),
            (numeric(0, 0, 0xC000, 0, &[]), "NaN"),
        ] {
            assert_eq!(pg_numeric_text(&bytes).unwrap(), want);
        }
        assert!(pg_numeric_text(&[0, 1]).is_err());
    }

    #[test]
    fn pg_inets() {
        assert_eq!(
            pg_inet_text(&[2, 32, 0, 4, 10, 0, 0, 1]).unwrap(),
            "10.0.0.1"
        );
        assert_eq!(
            pg_inet_text(&[2, 24, 1, 4, 10, 0, 0, 0]).unwrap(),
            "10.0.0.0/24"
        );
        let mut v6 = vec![3, 128, 0, 16];
        v6.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(pg_inet_text(&v6).unwrap(), "2001:db8::1");
        assert!(pg_inet_text(&[2, 32]).is_err());
    }

    #[test]
    fn extra_is_merged_without_overriding() {
        let vars = vars_from_columns(
            vec![
                ("ip".into(), "10.0.0.1".into()),
                ("extra".into(), r#"{"tariff":"gold","ip":"x"}"#.into()),
            ],
            false,
        );
        assert_eq!(vars["ip"], "10.0.0.1");
        assert_eq!(vars["tariff"], "gold");
        assert!(!vars.contains_key("extra"));
        let vars = vars_from_columns(vec![("USER_ID".into(), 5.into())], true);
        assert_eq!(vars["user_id"], 5);
    }
}
