//! Bulk provisioning: pre-register devices (state `pending`) from a CSV file with the header
//! `id,type,model,location,firmware`.
//!
//! Every row is validated before anything is written ([`parse_csv`]); rows are then imported in
//! chunks of [`CHUNK`] rows, one store transaction each ([`import`]), so that a large file shows
//! progress. Importing the same file again changes nothing (the store reports the rows as
//! unchanged).

use std::collections::HashMap;
use std::fmt;

use regex::Regex;

use crate::store::{ImportOutcome, NewDevice, Store, StoreError};

/// Columns of the file, in order.
pub const HEADER: [&str; 5] = ["id", "type", "model", "location", "firmware"];
/// Longest accepted field.
pub const MAX_FIELD: usize = 128;
/// Rows per store transaction.
pub const CHUNK: usize = 5_000;

/// A row that cannot be imported, with its 1-based line number in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RowError {
    pub line: usize,
    pub message: String,
}

impl RowError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        RowError {
            line,
            message: message.into(),
        }
    }
}

/// What a valid row must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct RowRules<'a> {
    /// The configured device-id pattern (`[pki] device_id_pattern`).
    pub device_id_pattern: &'a Regex,
    /// Known device types (the templates); `None` accepts any non-empty type.
    pub device_types: Option<&'a [String]>,
}

/// The records of a CSV text (RFC 4180: quoted fields may hold commas, doubled quotes and line
/// breaks), each with the line it starts on. Blank lines are skipped.
fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, RowError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err(RowError::new(start, "unterminated quoted field"));
                }
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if field.trim().is_empty() && !was_quoted => {
                    field.clear();
                    quoted = true;
                    was_quoted = true;
                }
                '"' => return Err(RowError::new(line, "stray quote in an unquoted field")),
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                _ if was_quoted && !c.is_whitespace() => {
                    return Err(RowError::new(line, "text after a closing quote"))
                }
                _ => field.push(c),
            }
        }
        fields.push(field);
        let blank = fields.len() == 1 && fields[0].trim().is_empty();
        if !blank {
            out.push((start, fields));
        }
    }
    Ok(out)
}

/// Parse and validate every row; the valid devices and the errors of the others.
pub fn parse_rows(text: &str, rules: &RowRules<'_>) -> (Vec<NewDevice>, Vec<RowError>) {
    let records = match records(text) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let mut rows = records.into_iter();
    let Some((header_line, header)) = rows.next() else {
        return (
            Vec::new(),
            vec![RowError::new(
                1,
                format!("empty file; expected the header {}", HEADER.join(",")),
            )],
        );
    };
    let names: Vec<String> = header
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    if names != HEADER {
        return (
            Vec::new(),
            vec![RowError::new(
                header_line,
                format!(
                    "header must be {}, not {}",
                    HEADER.join(","),
                    header.join(",")
                ),
            )],
        );
    }
    let mut devices = Vec::new();
    let mut errors = Vec::new();
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (line, fields) in rows {
        match validate_row(line, &fields, rules, &first_seen) {
            Ok(device) => {
                first_seen.insert(device.id.clone(), line);
                devices.push(device);
            }
            Err(e) => {
                if let Some(id) = fields.first().map(|s| s.trim()) {
                    first_seen.entry(id.to_owned()).or_insert(line);
                }
                errors.push(e);
            }
        }
    }
    (devices, errors)
}

fn validate_row(
    line: usize,
    fields: &[String],
    rules: &RowRules<'_>,
    first_seen: &HashMap<String, usize>,
) -> Result<NewDevice, RowError> {
    if fields.len() != HEADER.len() {
        return Err(RowError::new(
            line,
            format!(
                "{} fields; expected {} ({})",
                fields.len(),
                HEADER.len(),
                HEADER.join(",")
            ),
        ));
    }
    for (name, value) in HEADER.iter().zip(fields) {
        if value.trim().chars().count() > MAX_FIELD {
            return Err(RowError::new(
                line,
                format!("{name} is longer than {MAX_FIELD} characters"),
            ));
        }
    }
    let field = |i: usize| fields[i].trim();
    let optional = |i: usize| Some(field(i)).filter(|s| !s.is_empty()).map(str::to_owned);
    let id = field(0);
    if id.is_empty() {
        return Err(RowError::new(line, "id is empty"));
    }
    if !rules.device_id_pattern.is_match(id) {
        return Err(RowError::new(
            line,
            format!(
                "id {id:?} does not match the device id pattern {}",
                rules.device_id_pattern.as_str()
            ),
        ));
    }
    if let Some(first) = first_seen.get(id) {
        return Err(RowError::new(
            line,
            format!("duplicate id {id:?} (first on line {first})"),
        ));
    }
    let device_type = field(1);
    if device_type.is_empty() {
        return Err(RowError::new(line, "type is empty"));
    }
    if let Some(known) = rules.device_types {
        if !known.iter().any(|t| t == device_type) {
            return Err(RowError::new(
                line,
                format!("unknown type {device_type:?}; known: {}", known.join(", ")),
            ));
        }
    }
    Ok(NewDevice {
        id: id.to_owned(),
        device_type: device_type.to_owned(),
        model: optional(2),
        location: optional(3),
        firmware_version: optional(4),
    })
}

/// Parse and validate every row: all the devices, or every row error (nothing is valid to
/// import when one row is not).
pub fn parse_csv(text: &str, rules: &RowRules<'_>) -> Result<Vec<NewDevice>, Vec<RowError>> {
    let (devices, errors) = parse_rows(text, rules);
    if errors.is_empty() {
        Ok(devices)
    } else {
        Err(errors)
    }
}

/// Import `devices` in chunks of [`CHUNK`] rows (one store transaction each), advancing
/// `progress` by the rows of each chunk. Stops at the first store error (the chunks before it
/// stay imported; running the import again completes it).
pub async fn import(
    store: &dyn Store,
    devices: &[NewDevice],
    progress: Option<&indicatif::ProgressBar>,
) -> Result<ImportOutcome, StoreError> {
    let mut total = ImportOutcome::default();
    for chunk in devices.chunks(CHUNK) {
        let outcome = store.import_devices(chunk).await?;
        total.inserted += outcome.inserted;
        total.unchanged += outcome.unchanged;
        total.updated += outcome.updated;
        total.skipped += outcome.skipped;
        if let Some(bar) = progress {
            bar.inc(chunk.len() as u64);
        }
    }
    Ok(total)
}

/// `inserted 3, updated 0, unchanged 1, skipped 0`.
pub struct OutcomeSummary<'a>(pub &'a ImportOutcome);

impl fmt::Display for OutcomeSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "inserted {}, updated {}, unchanged {}, skipped {} (already enrolled)",
            o.inserted, o.updated, o.unchanged, o.skipped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> Regex {
        Regex::new(&crate::config::PkiConfig::default().device_id_pattern).unwrap()
    }

    fn parse(text: &str) -> Result<Vec<NewDevice>, Vec<RowError>> {
        let p = pattern();
        let types = vec!["thermostat".to_owned(), "sensor".to_owned()];
        parse_csv(
            text,
            &RowRules {
                device_id_pattern: &p,
                device_types: Some(&types),
            },
        )
    }

    #[test]
    fn valid_file_parses_with_optional_fields() {
        let devices = parse(
            "id,type,model,location,firmware\n\
             t-1,thermostat,T-1000,\"bldg-7, floor 2\",1.4.2\r\n\
             \n\
             s-1,sensor,,,\n",
        )
        .unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].location.as_deref(), Some("bldg-7, floor 2"));
        assert_eq!(devices[0].firmware_version.as_deref(), Some("1.4.2"));
        assert_eq!(devices[1].model, None);
        assert_eq!(devices[1].device_type, "sensor");
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let errors = parse(
            "id,type,model,location,firmware\n\
             ok-1,thermostat,,,\n\
             bad id,thermostat,,,\n\
             ok-2,,,,\n\
             ok-3,toaster,,,\n\
             ok-1,sensor,,,\n\
             ok-4,sensor\n\
             ok-5,sensor,,,\n",
        )
        .unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7], "{errors:?}");
        assert!(errors[0].message.contains("pattern"), "{}", errors[0]);
        assert!(errors[1].message.contains("type is empty"));
        assert!(errors[2].message.contains("toaster"));
        assert!(
            errors[3].message.contains("first on line 2"),
            "{}",
            errors[3]
        );
        assert!(errors[4].message.contains("2 fields"));
        assert_eq!(errors[0].to_string().split(':').next(), Some("line 3"));
    }

    #[test]
    fn long_fields_header_and_quotes() {
        let long = "x".repeat(129);
        let errors = parse(&format!(
            "id,type,model,location,firmware\nd1,sensor,{long},,\n"
        ))
        .unwrap_err();
        assert_eq!(errors[0].line, 2);
        assert!(errors[0].message.contains("model is longer"));
        let errors = parse("id,kind\nd1,sensor\n").unwrap_err();
        assert_eq!(errors[0].line, 1);
        let errors = parse("").unwrap_err();
        assert_eq!(errors[0].line, 1);
        // A quoted line break moves the following rows' line numbers.
        let errors = parse(
            "id,type,model,location,firmware\nd1,sensor,\"two\nlines\",,\nbad id,sensor,,,\n",
        )
        .unwrap_err();
        assert_eq!(errors[0].line, 4);
        let errors = parse("id,type,model,location,firmware\nd1,sensor,\"open,,\n").unwrap_err();
        assert!(errors[0].message.contains("unterminated"));
        let ok =
            parse("id,type,model,location,firmware\nd1,sensor,\"say \"\"hi\"\"\",,\n").unwrap();
        assert_eq!(ok[0].model.as_deref(), Some("say \"hi\""));
    }

    #[test]
    fn lenient_parse_keeps_the_valid_rows() {
        let p = pattern();
        let (ok, bad) = parse_rows(
            "id,type,model,location,firmware\na1,x,,,\n-bad,x,,,\na2,x,,,\n",
            &RowRules {
                device_id_pattern: &p,
                device_types: None,
            },
        );
        assert_eq!(ok.len(), 2);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 3);
    }
}
