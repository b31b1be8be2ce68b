//! FreeRADIUS-format dictionaries: attribute names, numbers and types, vendors and
//! named integer values, built in or loaded from an operator's vendor files.

use std::collections::HashMap;
use std::path::Path;

/// The built-in dictionary, shipped in the repository so operators can read it.
const BUILTIN_DICTIONARY: &str = include_str!("../../../dictionaries/dictionary.nasd");

/// How an attribute's value is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrType {
    String,
    Octets,
    Integer,
    /// Seconds since the epoch, encoded like `Integer`.
    Date,
    IpAddr,
    /// A type or flag this codec cannot encode (tags, encryption, ipv6addr, ...). Kept
    /// so a full vendor file loads; using such an attribute in a request is an error.
    Unsupported(String),
}

/// One `ATTRIBUTE` line. `vendor` is 0 for standard attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrDef {
    pub name: String,
    pub vendor: u32,
    pub number: u8,
    pub kind: AttrType,
}

/// A FreeRADIUS-format dictionary: attributes, vendors and named integer values.
/// Names are looked up case-insensitively, as FreeRADIUS does.
#[derive(Debug, Clone, Default)]
pub struct Dictionary {
    by_name: HashMap<String, AttrDef>,
    by_code: HashMap<(u32, u8), AttrDef>,
    vendors: HashMap<String, Vendor>,
    /// attribute name (lowercase) -> (value name, number), in file order.
    values: HashMap<String, Vec<(String, u32)>>,
}

#[derive(Debug, Clone)]
struct Vendor {
    id: u32,
    /// Only the usual 1-byte type, 1-byte length layout is encodable.
    standard_format: bool,
}

/// Nested `$INCLUDE`s deeper than this are taken for a loop.
const MAX_INCLUDE_DEPTH: usize = 8;

impl Dictionary {
    /// The dictionary shipped in `dictionaries/dictionary.nasd`.
    pub fn builtin() -> Dictionary {
        let mut dict = Dictionary::default();
        // The text is compiled in and a unit test parses it, so this cannot fail at
        // run time.
        dict.parse(BUILTIN_DICTIONARY, "dictionary.nasd", None, 0)
            .expect("built-in dictionary parses");
        dict
    }

    /// Adds the definitions of a FreeRADIUS-format file (e.g. a vendor's
    /// `dictionary.huawei`), so schemes can use its attributes without a code change.
    /// `$INCLUDE` is resolved relative to the file. Later definitions win.
    pub fn load_extra(&mut self, path: &Path) -> Result<(), String> {
        self.load_file(path, 0)
    }

    fn load_file(&mut self, path: &Path, depth: usize) -> Result<(), String> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(format!(
                "{}: $INCLUDE nested too deep (a loop?)",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read dictionary {}: {e}", path.display()))?;
        // Parse into a copy so a broken file leaves the dictionary as it was.
        let mut next = self.clone();
        next.parse(&text, &path.display().to_string(), path.parent(), depth)?;
        *self = next;
        Ok(())
    }

    /// Adds the definitions in `text`; `origin` names it in errors. `$INCLUDE` is
    /// refused, having no directory to resolve it against. On error nothing is added.
    pub fn parse_text(&mut self, text: &str, origin: &str) -> Result<(), String> {
        let mut next = self.clone();
        next.parse(text, origin, None, 0)?;
        *self = next;
        Ok(())
    }

    fn parse(
        &mut self,
        text: &str,
        origin: &str,
        dir: Option<&Path>,
        depth: usize,
    ) -> Result<(), String> {
        let mut current_vendor: Option<(String, Vendor)> = None;
        for (index, raw_line) in text.lines().enumerate() {
            let at = || format!("{origin}:{}", index + 1);
            let line = raw_line.split('#').next().unwrap_or("");
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(keyword) = words.first() else {
                continue;
            };
            match *keyword {
                "ATTRIBUTE" => {
                    if words.len() < 4 {
                        return Err(format!("{}: ATTRIBUTE needs name, number, type", at()));
                    }
                    let name = words[1];
                    let number = parse_number(words[2])
                        .filter(|n| (1..=255).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "{}: attribute {name}: number {} is not 1-255",
                                at(),
                                words[2]
                            )
                        })? as u8;
                    let mut kind = match words[3].to_ascii_lowercase().as_str() {
                        "string" => AttrType::String,
                        "octets" => AttrType::Octets,
                        "integer" => AttrType::Integer,
                        "date" => AttrType::Date,
                        "ipaddr" => AttrType::IpAddr,
                        other => AttrType::Unsupported(other.to_string()),
                    };
                    let mut vendor = current_vendor.clone();
                    if let Some(extra) = words.get(4) {
                        // Old-style files name the vendor in the fifth column; newer
                        // ones put flags there.
                        if let Some(v) = self.vendors.get(&extra.to_ascii_lowercase()) {
                            vendor = Some((extra.to_string(), v.clone()));
                        } else if extra
                            .split(',')
                            .any(|f| f == "has_tag" || f.starts_with("encrypt="))
                        {
                            // Tagged and encrypted values need encodings this codec
                            // does not have; sending them plain would be wrong.
                            kind = AttrType::Unsupported(format!("{} {extra}", words[3]));
                        }
                    }
                    let vendor_id = match &vendor {
                        Some((vname, v)) => {
                            if !v.standard_format {
                                kind = AttrType::Unsupported(format!(
                                    "{} (vendor {vname} has a non-standard format)",
                                    words[3]
                                ));
                            }
                            v.id
                        }
                        None => 0,
                    };
                    let def = AttrDef {
                        name: name.to_string(),
                        vendor: vendor_id,
                        number,
                        kind,
                    };
                    self.by_code.insert((vendor_id, number), def.clone());
                    self.by_name.insert(name.to_ascii_lowercase(), def);
                }
                "VALUE" => {
                    if words.len() < 4 {
                        return Err(format!("{}: VALUE needs attribute, name, number", at()));
                    }
                    let number = parse_number(words[3]).ok_or_else(|| {
                        format!(
                            "{}: VALUE {} {}: bad number {}",
                            at(),
                            words[1],
                            words[2],
                            words[3]
                        )
                    })?;
                    let list = self
                        .values
                        .entry(words[1].to_ascii_lowercase())
                        .or_default();
                    list.retain(|(n, _)| !n.eq_ignore_ascii_case(words[2]));
                    list.push((words[2].to_string(), number));
                }
                "VENDOR" => {
                    if words.len() < 3 {
                        return Err(format!("{}: VENDOR needs name and number", at()));
                    }
                    let id = parse_number(words[2])
                        .ok_or_else(|| format!("{}: VENDOR {}: bad number", at(), words[1]))?;
                    let standard_format = match words.get(3) {
                        None => true,
                        Some(f) => f.eq_ignore_ascii_case("format=1,1"),
                    };
                    self.vendors.insert(
                        words[1].to_ascii_lowercase(),
                        Vendor {
                            id,
                            standard_format,
                        },
                    );
                }
                "BEGIN-VENDOR" => {
                    let name = words
                        .get(1)
                        .ok_or_else(|| format!("{}: BEGIN-VENDOR needs a name", at()))?;
                    let vendor = self
                        .vendors
                        .get(&name.to_ascii_lowercase())
                        .ok_or_else(|| format!("{}: unknown vendor {name}", at()))?;
                    current_vendor = Some((name.to_string(), vendor.clone()));
                }
                "END-VENDOR" => {
                    current_vendor = None;
                }
                "$INCLUDE" | "$INCLUDE-" => {
                    let file = words
                        .get(1)
                        .ok_or_else(|| format!("{}: $INCLUDE needs a file", at()))?;
                    let Some(dir) = dir else {
                        return Err(format!("{}: $INCLUDE is not allowed here", at()));
                    };
                    let path = dir.join(file);
                    // `$INCLUDE-` means "if it exists" in FreeRADIUS.
                    if *keyword == "$INCLUDE-" && !path.exists() {
                        continue;
                    }
                    self.load_file(&path, depth + 1)?;
                }
                other => {
                    return Err(format!(
                        "{}: unsupported dictionary keyword {other} (nasd reads ATTRIBUTE, \
                         VALUE, VENDOR, BEGIN-VENDOR, END-VENDOR, $INCLUDE)",
                        at()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The attribute called `name` (any case).
    pub fn attribute(&self, name: &str) -> Option<&AttrDef> {
        self.by_name.get(&name.to_ascii_lowercase())
    }

    /// The attribute with this vendor (0: standard) and number.
    pub fn attribute_by_code(&self, vendor: u32, number: u8) -> Option<&AttrDef> {
        self.by_code.get(&(vendor, number))
    }

    /// The number of the named value of an integer attribute (`Error-Cause`,
    /// `Session-Context-Not-Found` -> 503).
    pub fn value_number(&self, attribute: &str, value: &str) -> Option<u32> {
        self.values
            .get(&attribute.to_ascii_lowercase())?
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(value))
            .map(|(_, v)| *v)
    }

    /// The name of an integer attribute's value, if the dictionary has one.
    pub fn value_name(&self, attribute: &str, number: u32) -> Option<&str> {
        self.values
            .get(&attribute.to_ascii_lowercase())?
            .iter()
            .find(|(_, v)| *v == number)
            .map(|(n, _)| n.as_str())
    }
}

/// Decimal or `0x` hexadecimal.
pub(super) fn parse_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // Fixtures from the layers above: a loaded file must be usable in a request, and
    // the dictionary's Error-Cause names must agree with the ones verdicts print.
    use crate::transport::radius::packet::error_cause_name;
    use crate::transport::radius::request::parse_request;

    fn dict() -> Dictionary {
        Dictionary::builtin()
    }

    #[test]
    fn builtin_dictionary_has_the_attributes() {
        let d = dict();
        for (name, vendor, number, kind) in [
            ("User-Name", 0, 1, AttrType::String),
            ("NAS-IP-Address", 0, 4, AttrType::IpAddr),
            ("Framed-IP-Address", 0, 8, AttrType::IpAddr),
            ("Filter-Id", 0, 11, AttrType::String),
            ("Reply-Message", 0, 18, AttrType::String),
            ("State", 0, 24, AttrType::Octets),
            ("Class", 0, 25, AttrType::Octets),
            ("Session-Timeout", 0, 27, AttrType::Integer),
            ("Idle-Timeout", 0, 28, AttrType::Integer),
            ("Calling-Station-Id", 0, 31, AttrType::String),
            ("NAS-Identifier", 0, 32, AttrType::String),
            ("Acct-Session-Id", 0, 44, AttrType::String),
            ("Event-Timestamp", 0, 55, AttrType::Date),
            ("Message-Authenticator", 0, 80, AttrType::Octets),
            ("Error-Cause", 0, 101, AttrType::Integer),
            ("Cisco-AVPair", 9, 1, AttrType::String),
            ("Mikrotik-Rate-Limit", 14988, 8, AttrType::String),
            ("Mikrotik-Address-List", 14988, 19, AttrType::String),
        ] {
            let def = d
                .attribute(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(
                (def.vendor, def.number, &def.kind),
                (vendor, number, &kind),
                "{name}"
            );
            assert_eq!(
                d.attribute_by_code(vendor, number).map(|a| a.name.as_str()),
                Some(name)
            );
        }
        for (n, name) in [
            (201, "Residual-Session-Context-Removed"),
            (401, "Unsupported-Attribute"),
            (402, "Missing-Attribute"),
            (403, "NAS-Identification-Mismatch"),
            (404, "Invalid-Request"),
            (405, "Unsupported-Service"),
            (406, "Unsupported-Extension"),
            (407, "Invalid-Attribute-Value"),
            (501, "Administratively-Prohibited"),
            (502, "Request-Not-Routable"),
            (503, "Session-Context-Not-Found"),
            (504, "Session-Context-Not-Removable"),
            (505, "Other-Proxy-Processing-Error"),
            (506, "Resources-Unavailable"),
            (507, "Request-Initiated"),
            (508, "Multiple-Session-Selection-Unsupported"),
        ] {
            assert_eq!(d.value_name("Error-Cause", n), Some(name));
            assert_eq!(d.value_number("error-cause", name), Some(n));
            assert_eq!(error_cause_name(n), Some(name));
        }
    }

    #[test]
    fn dictionary_parsing() {
        let mut d = Dictionary::default();
        d.parse_text(
            "# comment\n\
             VENDOR Huawei 2011\n\
             BEGIN-VENDOR Huawei\n\
             ATTRIBUTE Huawei-Input-Average-Rate 2 integer # trailing comment\n\
             ATTRIBUTE Huawei-Tagged 3 string has_tag\n\
             ATTRIBUTE Huawei-V6 4 ipv6addr\n\
             END-VENDOR Huawei\n\
             ATTRIBUTE Old-Style 5 string Huawei\n\
             ATTRIBUTE Plain 0x10 octets\n\
             VALUE Plain-Int On 1\n\
             VENDOR Usr 429 format=4,0\n\
             BEGIN-VENDOR Usr\n\
             ATTRIBUTE Usr-Thing 1 integer\n\
             END-VENDOR Usr\n",
            "test",
        )
        .expect("parses");
        let a = d.attribute("huawei-input-average-rate").expect("found");
        assert_eq!((a.vendor, a.number, &a.kind), (2011, 2, &AttrType::Integer));
        assert!(matches!(
            d.attribute("Huawei-Tagged").map(|a| &a.kind),
            Some(AttrType::Unsupported(_))
        ));
        assert!(matches!(
            d.attribute("Huawei-V6").map(|a| &a.kind),
            Some(AttrType::Unsupported(_))
        ));
        assert_eq!(d.attribute("Old-Style").map(|a| a.vendor), Some(2011));
        assert_eq!(
            d.attribute("Plain").map(|a| (a.vendor, a.number)),
            Some((0, 16))
        );
        assert!(matches!(
            d.attribute("Usr-Thing").map(|a| &a.kind),
            Some(AttrType::Unsupported(_))
        ));
        assert_eq!(d.value_number("Plain-Int", "on"), Some(1));

        for (text, wanted) in [
            (
                "ATTRIBUTE X 300 string",
                "test:1: attribute X: number 300 is not 1-255",
            ),
            (
                "ATTRIBUTE X 1",
                "test:1: ATTRIBUTE needs name, number, type",
            ),
            ("BEGIN-VENDOR Nope", "test:1: unknown vendor Nope"),
            (
                "\nBEGIN-TLV Foo",
                "test:2: unsupported dictionary keyword BEGIN-TLV",
            ),
            ("VALUE A B c", "test:1: VALUE A B: bad number c"),
            ("$INCLUDE other", "test:1: $INCLUDE is not allowed here"),
        ] {
            let mut d = Dictionary::default();
            let err = d.parse_text(text, "test").expect_err(text);
            assert!(err.starts_with(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn load_extra_reads_files_and_includes_and_keeps_state_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("dictionary.acme"),
            "VENDOR Acme 99999\nBEGIN-VENDOR Acme\nATTRIBUTE Acme-Speed 7 string\nEND-VENDOR Acme\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("dictionary"),
            "$INCLUDE dictionary.acme\n$INCLUDE- absent\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("broken"),
            "ATTRIBUTE Good 200 string\nNONSENSE\n",
        )
        .expect("write");
        let mut d = dict();
        d.load_extra(&dir.path().join("dictionary")).expect("loads");
        let request = parse_request("coa Acme-Speed = fast, User-Name = u", &d).expect("parses");
        assert_eq!(request.attributes[0].def.vendor, 99999);
        let err = d
            .load_extra(&dir.path().join("broken"))
            .expect_err("broken");
        assert!(err.contains("broken:2"), "{err}");
        assert!(d.attribute("Good").is_none(), "a failed file adds nothing");
        let err = d
            .load_extra(&dir.path().join("missing"))
            .expect_err("missing");
        assert!(err.starts_with("cannot read dictionary"), "{err}");
    }

    #[test]
    fn loads_freeradius_vendor_files() {
        // The files an operator is most likely to point nasd at.
        let mut d = dict();
        for file in ["dictionary.mikrotik", "dictionary.cisco"] {
            d.load_extra(Path::new("/usr/share/freeradius").join(file).as_path())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        assert_eq!(
            d.attribute("Mikrotik-Address-List").map(|a| a.number),
            Some(19)
        );
        assert_eq!(d.attribute("Cisco-AVPair").map(|a| a.vendor), Some(9));
    }
}
