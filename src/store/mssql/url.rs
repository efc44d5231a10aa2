//! Connection strings: `mssql://` / `sqlserver://` URLs and ADO.NET strings, parsed into a
//! tiberius [`Config`] plus a [`Target`] that names the server in logs and errors without ever
//! showing the password.
//!
//! Both forms may name the schema the store keeps its tables in (`?schema=NAME` in a URL, a
//! `schema=NAME` key in an ADO.NET string; default `dbo`). That setting is the store's own:
//! it is taken out of an ADO.NET string before tiberius sees the rest.

use std::fmt;
use std::ops::Range;

use tiberius::{AuthMethod, Config, EncryptionLevel};

use super::schema::SchemaName;
use crate::store::{StoreError, StoreResult};

/// Default SQL Server port.
pub const DEFAULT_PORT: u16 = 1433;

/// Whether `url` names a SQL Server: an `mssql://` or `sqlserver://` URL, or an ADO.NET
/// connection string (it holds a `server=` or `data source=` key, in any case).
pub fn looks_like_mssql(url: &str) -> bool {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("mssql://") || lower.starts_with("sqlserver://") {
        return true;
    }
    if lower.contains("://") {
        return false;
    }
    ado_pairs(url).iter().any(|(key, _)| {
        let key = normalize_key(key);
        key == "server" || key == "datasource"
    })
}

/// Where the store connects, for logs and error messages. It never holds the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as tiberius dials it.
    pub addr: String,
    pub database: Option<String>,
    pub user: Option<String>,
    /// Whether a password was given (shown as `***`).
    pub has_password: bool,
    pub encrypt: bool,
    pub trust_server_certificate: bool,
    /// Whether a CA file was given to check the server's certificate with (besides the
    /// system's roots).
    pub server_ca: bool,
    /// The schema holding the store's tables.
    pub schema: SchemaName,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mssql://")?;
        match (&self.user, self.has_password) {
            (Some(user), true) => write!(f, "{user}:***@")?,
            (Some(user), false) => write!(f, "{user}@")?,
            (None, true) => f.write_str(":***@")?,
            (None, false) => {}
        }
        f.write_str(&self.addr)?;
        if let Some(db) = &self.database {
            write!(f, "/{db}")?;
        }
        write!(f, "?schema={}", self.schema)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Target({self}, encrypt={}, trust_server_certificate={}, server_ca={})",
            self.encrypt, self.trust_server_certificate, self.server_ca
        )
    }
}

/// A parsed connection string: what tiberius needs, and how to name it.
#[derive(Clone)]
pub struct Parsed {
    pub config: Config,
    pub target: Target,
}

impl fmt::Debug for Parsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.target, f)
    }
}

/// Parse either connection-string form. Errors never quote the input (it may hold a password).
pub fn parse(url: &str) -> StoreResult<Parsed> {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("mssql://") || lower.starts_with("sqlserver://") {
        parse_url(url)
    } else if looks_like_mssql(url) {
        parse_ado(url)
    } else {
        Err(StoreError::InvalidUrl(
            "not a SQL Server connection string (mssql://, sqlserver:// or ADO.NET)".into(),
        ))
    }
}

/// `mssql://user:password@host:1433/database?encrypt=true&trust_server_certificate=false`.
fn parse_url(text: &str) -> StoreResult<Parsed> {
    let url = ::url::Url::parse(text)
        .map_err(|e| StoreError::InvalidUrl(format!("malformed SQL Server URL: {e}")))?;
    let host = match url.host() {
        Some(::url::Host::Domain(d)) => d.to_owned(),
        Some(::url::Host::Ipv4(ip)) => ip.to_string(),
        Some(::url::Host::Ipv6(ip)) => ip.to_string(),
        None => {
            return Err(StoreError::InvalidUrl(
                "SQL Server URL without a host".into(),
            ))
        }
    };
    let port = url.port().unwrap_or(DEFAULT_PORT);
    let user = match url.username() {
        "" => None,
        u => {
            Some(percent_decode(u).map_err(|e| StoreError::InvalidUrl(format!("user name: {e}")))?)
        }
    };
    let password = match url.password() {
        None => None,
        Some(p) => {
            Some(percent_decode(p).map_err(|e| StoreError::InvalidUrl(format!("password: {e}")))?)
        }
    };
    let database = {
        let path = url.path().trim_matches('/');
        if path.is_empty() {
            None
        } else if path.contains('/') {
            return Err(StoreError::InvalidUrl(
                "the URL path must be a single database name".into(),
            ));
        } else {
            Some(
                percent_decode(path)
                    .map_err(|e| StoreError::InvalidUrl(format!("database: {e}")))?,
            )
        }
    };

    let mut encrypt = true;
    let mut trust = false;
    let mut ca: Option<String> = None;
    let mut application_name: Option<String> = None;
    let mut schema = SchemaName::default();
    for (key, value) in url.query_pairs() {
        match normalize_key(&key).as_str() {
            // Given twice, the last one wins (as for every key of an ADO.NET string).
            "schema" => schema = SchemaName::parse(&value)?,
            "encrypt" => encrypt = parse_bool("encrypt", &value)?,
            "trustservercertificate" => trust = parse_bool("trust_server_certificate", &value)?,
            "trustservercertificateca" => ca = Some(value.into_owned()),
            "applicationname" => application_name = Some(value.into_owned()),
            _ => {
                return Err(StoreError::InvalidUrl(format!(
                    "unknown SQL Server URL option {key:?} (known: schema, encrypt, \
                     trust_server_certificate, trust_server_certificate_ca, application_name)"
                )))
            }
        }
    }
    if trust && ca.is_some() {
        return Err(StoreError::InvalidUrl(
            "trust_server_certificate and trust_server_certificate_ca are mutually exclusive"
                .into(),
        ));
    }

    let mut config = Config::new();
    config.host(&host);
    config.port(port);
    if let Some(db) = &database {
        config.database(db);
    }
    config.application_name(application_name.as_deref().unwrap_or("onboard"));
    config.encryption(if encrypt {
        EncryptionLevel::Required
    } else {
        EncryptionLevel::Off
    });
    let server_ca = ca.is_some();
    if trust {
        config.trust_cert();
    } else if let Some(ca) = ca {
        config.trust_cert_ca(ca);
    }
    let has_password = password.is_some();
    if let Some(user) = &user {
        config.authentication(AuthMethod::sql_server(
            user,
            password.as_deref().unwrap_or(""),
        ));
    }
    let target = Target {
        addr: config.get_addr(),
        database,
        user,
        has_password,
        encrypt,
        trust_server_certificate: trust,
        server_ca,
        schema,
    };
    Ok(Parsed { config, target })
}

/// An ADO.NET string, parsed by tiberius once the `schema` key is taken out; the display
/// fields are read separately.
fn parse_ado(text: &str) -> StoreResult<Parsed> {
    let (for_tiberius, schema) = split_schema(text)?;
    let config = Config::from_ado_string(&for_tiberius).map_err(|e| {
        // tiberius's parse errors name keys, not values; still, keep the message generic
        // enough that a value can never end up in a log line.
        let kind = match e {
            tiberius::error::Error::Conversion(_) => "invalid value",
            _ => "malformed",
        };
        StoreError::InvalidUrl(format!("ADO.NET connection string: {kind}"))
    })?;
    let mut target = Target {
        addr: config.get_addr(),
        database: None,
        user: None,
        has_password: false,
        encrypt: true,
        trust_server_certificate: false,
        server_ca: false,
        schema: schema.unwrap_or_default(),
    };
    for (key, value) in ado_pairs(&for_tiberius) {
        match normalize_key(&key).as_str() {
            "database" | "initialcatalog" => target.database = Some(value),
            "uid" | "username" | "user" | "userid" => target.user = Some(value),
            "password" | "pwd" => target.has_password = true,
            "encrypt" => {
                target.encrypt = !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "false" | "no" | "danger_plaintext"
                )
            }
            "trustservercertificate" => {
                target.trust_server_certificate =
                    matches!(value.to_ascii_lowercase().as_str(), "true" | "yes")
            }
            "trustservercertificateca" => target.server_ca = true,
            _ => {}
        }
    }
    Ok(Parsed { config, target })
}

/// Parse `url` and apply the `[store]` settings on how the server's certificate is checked:
/// `trust_server_certificate` (or the connection string's own option) accepts any
/// certificate, `ca_file` adds a CA to trust; the two exclude each other.
pub fn parse_with(url: &str, store: &crate::config::StoreConfig) -> StoreResult<Parsed> {
    let mut parsed = parse(url)?;
    let trust = parsed.target.trust_server_certificate || store.trust_server_certificate;
    let ca = store.ca_file.as_ref();
    if trust && (ca.is_some() || parsed.target.server_ca) {
        return Err(StoreError::InvalidUrl(
            "trust_server_certificate and a CA file to check the server with exclude each other"
                .into(),
        ));
    }
    if let Some(ca) = ca {
        if !ca.is_file() {
            return Err(StoreError::InvalidUrl(format!(
                "[store] ca_file {} is not a readable file",
                ca.display()
            )));
        }
        parsed.config.trust_cert_ca(ca.display());
        parsed.target.server_ca = true;
    }
    if store.trust_server_certificate && !parsed.target.trust_server_certificate {
        parsed.config.trust_cert();
        parsed.target.trust_server_certificate = true;
    }
    Ok(parsed)
}

/// Lower-case, without spaces, `_` and `-`: `Trust_Server-Certificate` -> `trustservercertificate`.
fn normalize_key(key: &str) -> String {
    key.chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn parse_bool(key: &str, value: &str) -> StoreResult<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(StoreError::InvalidUrl(format!(
            "{key} must be true or false"
        ))),
    }
}

/// Take the `schema` key (in any case) out of an ADO.NET string: the rest, byte for byte, for
/// tiberius, and the validated schema if one was given (the last one wins, as for any key).
pub(crate) fn split_schema(text: &str) -> StoreResult<(String, Option<SchemaName>)> {
    let mut rest = String::with_capacity(text.len());
    let mut schema = None;
    let mut copied = 0;
    for entry in ado_entries(text) {
        if normalize_key(&entry.key) == "schema" {
            schema = Some(SchemaName::parse(&entry.value)?);
            rest.push_str(&text[copied..entry.span.start]);
            copied = entry.span.end;
        }
    }
    rest.push_str(&text[copied..]);
    Ok((rest, schema))
}

/// Split an ADO.NET string into `(key, value)` pairs, honouring `'...'`, `"..."` (doubled
/// quote escapes) and `{...}` quoting, so that a quoted password holding `;` or `=` can never
/// be mistaken for another key. Used only for display fields and detection.
pub(crate) fn ado_pairs(text: &str) -> Vec<(String, String)> {
    ado_entries(text)
        .into_iter()
        .map(|entry| (entry.key, entry.value))
        .collect()
}

/// One `key=value` pair of an ADO.NET string.
#[derive(Debug)]
pub(crate) struct AdoEntry {
    pub key: String,
    pub value: String,
    /// Byte range of the pair in the string, from its key to its closing `;` included (or the
    /// end of the string).
    pub span: Range<usize>,
}

/// The pairs of an ADO.NET string with where each one stands (see [`ado_pairs`]).
pub(crate) fn ado_entries(text: &str) -> Vec<AdoEntry> {
    let mut entries = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        let start = chars.peek().map_or(text.len(), |(i, _)| *i);
        // key: up to the first '='
        let mut key = String::new();
        let mut saw_eq = false;
        for (_, c) in chars.by_ref() {
            match c {
                '=' => {
                    saw_eq = true;
                    break;
                }
                ';' => break,
                c => key.push(c),
            }
        }
        if !saw_eq {
            if chars.peek().is_none() {
                break;
            }
            continue;
        }
        // value
        while matches!(chars.peek(), Some((_, ' '))) {
            chars.next();
        }
        let mut value = String::new();
        match chars.peek().map(|(_, c)| *c) {
            Some(q @ ('\'' | '"')) => {
                chars.next();
                while let Some((_, c)) = chars.next() {
                    if c == q {
                        if matches!(chars.peek(), Some((_, c)) if *c == q) {
                            chars.next();
                            value.push(q);
                        } else {
                            break;
                        }
                    } else {
                        value.push(c);
                    }
                }
                // skip to the separator
                for (_, c) in chars.by_ref() {
                    if c == ';' {
                        break;
                    }
                }
            }
            Some('{') => {
                chars.next();
                for (_, c) in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    value.push(c);
                }
                for (_, c) in chars.by_ref() {
                    if c == ';' {
                        break;
                    }
                }
            }
            _ => {
                for (_, c) in chars.by_ref() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                }
                value = value.trim_end().to_owned();
            }
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        entries.push(AdoEntry {
            key: key.trim().to_owned(),
            value,
            span: start..end,
        });
        if chars.peek().is_none() {
            break;
        }
    }
    entries
}

/// Decode `%XX` escapes (RFC 3986) into UTF-8 text.
pub(crate) fn percent_decode(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated percent escape")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "invalid percent escape")?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| "invalid percent escape")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_urls_and_ado_strings() {
        assert!(looks_like_mssql("mssql://sa:x@db/onboard"));
        assert!(looks_like_mssql("sqlserver://db"));
        assert!(looks_like_mssql("  MSSQL://db"));
        assert!(looks_like_mssql(
            "server=tcp:db,1433;database=x;user id=sa;password=p"
        ));
        assert!(looks_like_mssql("Data Source=db;Initial Catalog=x"));
        assert!(looks_like_mssql("Database=x; SERVER = db"));
        assert!(!looks_like_mssql("sqlite://data/onboard.db"));
        assert!(!looks_like_mssql("postgres://server=db"));
        assert!(!looks_like_mssql("data/onboard.db"));
        assert!(!looks_like_mssql(""));
        // `server=` only inside a quoted password is not a server key
        assert!(!looks_like_mssql("password='a;server=b'"));
    }

    #[test]
    fn url_with_defaults() {
        let p = parse("mssql://sa:secret@db.example.com/onboard").expect("parses");
        assert_eq!(p.target.addr, "db.example.com:1433");
        assert_eq!(p.target.database.as_deref(), Some("onboard"));
        assert_eq!(p.target.user.as_deref(), Some("sa"));
        assert!(p.target.has_password);
        assert!(p.target.encrypt);
        assert!(!p.target.trust_server_certificate);
        assert_eq!(p.config.get_addr(), "db.example.com:1433");
    }

    #[test]
    fn url_with_port_options_and_sqlserver_scheme() {
        let p =
            parse("sqlserver://u@10.0.0.5:14330/inv?encrypt=false&trust_server_certificate=true")
                .expect("parses");
        assert_eq!(p.target.addr, "10.0.0.5:14330");
        assert!(!p.target.encrypt);
        assert!(p.target.trust_server_certificate);
        assert!(!p.target.has_password);
        assert_eq!(
            p.target.to_string(),
            "mssql://u@10.0.0.5:14330/inv?schema=dbo"
        );
        let p = parse("mssql://db?TrustServerCertificate=yes").expect("camel case option");
        assert!(p.target.trust_server_certificate);
        assert_eq!(p.target.to_string(), "mssql://db:1433?schema=dbo");
    }

    #[test]
    fn url_decodes_special_characters_and_never_displays_the_password() {
        let p = parse("mssql://app%40corp:p%40ss%3Aw%2Frd%23%25%20%C3%A9@db:1433/onboard")
            .expect("parses");
        assert_eq!(p.target.user.as_deref(), Some("app@corp"));
        let shown = p.target.to_string();
        assert_eq!(shown, "mssql://app@corp:***@db:1433/onboard?schema=dbo");
        let debug = format!("{p:?}");
        for text in [&shown, &debug] {
            assert!(!text.contains("p@ss"), "{text}");
            assert!(!text.contains("p%40ss"), "{text}");
        }
        assert_eq!(
            percent_decode("p%40ss%3Aw%2Frd%23%25%20%C3%A9"),
            Ok("p@ss:w/rd#% é".into())
        );
        // An unencoded '@' in the password: the last '@' ends the user info.
        let p = parse("mssql://sa:p@ss@db/x").expect("parses");
        assert_eq!(p.target.addr, "db:1433");
        assert!(!p.target.to_string().contains("p@ss"));
    }

    #[test]
    fn url_errors_do_not_quote_the_input() {
        for bad in [
            "mssql://sa:topsecret@/db",
            "mssql://sa:topsecret@db/x?encrypt=maybe",
            "mssql://sa:topsecret@db/x?unknown=1",
            "mssql://sa:top%ZZsecret@db/x",
            "mssql://sa:topsecret@db/a/b",
            "mssql://sa:topsecret@db/x?trust_server_certificate=true&trust_server_certificate_ca=/ca.pem",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{bad}: {err:?}");
            assert!(!err.to_string().contains("topsecret"), "{err}");
        }
    }

    #[test]
    fn ado_string_parsing_and_display() {
        let p = parse(
            "server=tcp:sql.example.com,1433;database=onboard;user id=gw;\
             password='p;w=d{}';encrypt=true;TrustServerCertificate=true",
        )
        .expect("parses");
        assert_eq!(p.target.addr, "sql.example.com:1433");
        assert_eq!(p.target.database.as_deref(), Some("onboard"));
        assert_eq!(p.target.user.as_deref(), Some("gw"));
        assert!(p.target.has_password);
        assert!(p.target.trust_server_certificate);
        assert_eq!(
            p.target.to_string(),
            "mssql://gw:***@sql.example.com:1433/onboard?schema=dbo"
        );
        assert!(!format!("{p:?}").contains("p;w=d"));
    }

    #[test]
    fn ado_defaults_and_errors() {
        let p = parse("Server=db;Database=x;Uid=u;Pwd=Zm9vYmFy==").expect("parses");
        assert_eq!(p.target.addr, "db:1433");
        assert!(p.target.encrypt);
        assert!(!p.target.trust_server_certificate);
        let err = parse("server=tcp:db,notaport;password=hunter2").expect_err("bad port");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn ado_pairs_honour_quotes() {
        let pairs = ado_pairs("a=1; b = 'x;y''z' ;c={p;q};d=\"u\"\"v\";e=");
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x;y'z".into()),
                ("c".into(), "p;q".into()),
                ("d".into(), "u\"v".into()),
                ("e".into(), String::new()),
            ]
        );
    }

    #[test]
    fn schema_defaults_to_dbo() {
        for url in [
            "mssql://sa:pw@db/onboard",
            "server=tcp:db,1433;database=onboard;user id=sa;password=pw",
        ] {
            let p = parse(url).expect(url);
            assert_eq!(p.target.schema.as_str(), "dbo", "{url}");
            assert!(
                p.target.to_string().ends_with("/onboard?schema=dbo"),
                "{url}"
            );
        }
    }

    #[test]
    fn schema_from_a_url() {
        let p = parse("mssql://sa:pw@db/onboard?encrypt=true&schema=tenant_a").expect("parses");
        assert_eq!(p.target.schema.as_str(), "tenant_a");
        assert_eq!(
            p.target.to_string(),
            "mssql://sa:***@db:1433/onboard?schema=tenant_a"
        );
        assert!(p.target.encrypt);
        let p = parse("sqlserver://db?Schema=Other").expect("key in any case");
        assert_eq!(p.target.schema.as_str(), "Other");
        let p = parse("mssql://db/x?schema=a&schema=b").expect("twice");
        assert_eq!(p.target.schema.as_str(), "b", "the last one wins");
    }

    #[test]
    fn schema_from_an_ado_string() {
        let p = parse(
            "server=tcp:db,1433;database=onboard;SCHEMA=tenant_b;user id=gw;\
             password='p;schema=x';encrypt=true;TrustServerCertificate=true",
        )
        .expect("parses");
        assert_eq!(p.target.schema.as_str(), "tenant_b");
        assert_eq!(p.target.addr, "db:1433");
        assert_eq!(p.target.database.as_deref(), Some("onboard"));
        assert_eq!(p.target.user.as_deref(), Some("gw"));
        assert!(p.target.has_password);
        assert!(p.target.trust_server_certificate);
        assert_eq!(
            p.target.to_string(),
            "mssql://gw:***@db:1433/onboard?schema=tenant_b"
        );
        let p = parse("Server=db; Schema = s1 ;Database=x;schema=s2").expect("twice");
        assert_eq!(p.target.schema.as_str(), "s2", "the last one wins");
    }

    #[test]
    fn the_ado_string_handed_to_tiberius_has_no_schema_key() {
        let cases = [
            (
                "server=tcp:db,1433;schema=tenant_b;database=x",
                "server=tcp:db,1433;database=x",
            ),
            ("Schema=s;server=db;database=x", "server=db;database=x"),
            ("server=db;database=x;SCHEMA = s", "server=db;database=x;"),
            ("server=db; schema='s' ;database=x", "server=db;database=x"),
            (
                "server=db;schema={s};password='a;schema=b';schema=s2",
                "server=db;password='a;schema=b';",
            ),
            // not a schema key: left alone
            (
                "server=db;schemas=x;myschema=y",
                "server=db;schemas=x;myschema=y",
            ),
        ];
        for (given, expected) in cases {
            let (rest, _) = split_schema(given).expect(given);
            assert_eq!(rest, expected, "{given}");
            for (key, _) in ado_pairs(&rest) {
                assert_ne!(normalize_key(&key), "schema", "{rest}");
            }
        }
        let (rest, schema) = split_schema("server=db;password='a;schema=b'").expect("parses");
        assert_eq!(rest, "server=db;password='a;schema=b'");
        assert_eq!(schema, None, "a quoted value is not a key");
        // What is left is an ADO.NET string tiberius accepts.
        let (rest, schema) =
            split_schema("server=tcp:db,1433;schema=tenant_b;database=x;user id=u;password=p")
                .expect("parses");
        assert_eq!(schema.map(|s| s.to_string()).as_deref(), Some("tenant_b"));
        let config = Config::from_ado_string(&rest).expect("tiberius parses the rest");
        assert_eq!(config.get_addr(), "db:1433");
    }

    #[test]
    fn bad_schema_names_are_refused() {
        for bad in [
            "mssql://sa:topsecret@db/x?schema=",
            "mssql://sa:topsecret@db/x?schema=1abc",
            "mssql://sa:topsecret@db/x?schema=a-b",
            "mssql://sa:topsecret@db/x?schema=a%5Db",
            "mssql://sa:topsecret@db/x?schema=dbo%3B%20DROP%20TABLE%20t",
            "server=db;password=topsecret;schema=a.b",
            "server=db;password=topsecret;schema=[dbo]",
            "server=db;password=topsecret;schema='x''y'",
            "server=db;password=topsecret;schema=",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains("schema"), "{err}");
            assert!(!err.to_string().contains("topsecret"), "{err}");
        }
        let long = format!("mssql://db/x?schema={}", "s".repeat(65));
        assert!(matches!(parse(&long), Err(StoreError::InvalidUrl(_))));
        let longest = format!("mssql://db/x?schema={}", "s".repeat(64));
        assert!(parse(&longest).is_ok());
    }

    #[test]
    fn store_settings_decide_how_the_server_certificate_is_checked() {
        use crate::config::StoreConfig;
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let ado = "server=tcp:db,1433;database=x;user id=u;password=p";
        let verify = StoreConfig::default();
        let p = parse_with(ado, &verify).expect("parses");
        assert!(!p.target.trust_server_certificate && !p.target.server_ca);

        let with_ca = StoreConfig {
            ca_file: Some(ca.clone()),
            ..StoreConfig::default()
        };
        let p = parse_with(ado, &with_ca).expect("parses");
        assert!(p.target.server_ca && !p.target.trust_server_certificate);
        let p = parse_with("mssql://u:p@db/x", &with_ca).expect("parses");
        assert!(p.target.server_ca);

        let trusting = StoreConfig {
            trust_server_certificate: true,
            ..StoreConfig::default()
        };
        let p = parse_with(ado, &trusting).expect("parses");
        assert!(p.target.trust_server_certificate);
        // The connection string's own option still works for a development server.
        let p = parse_with(&format!("{ado};TrustServerCertificate=true"), &verify).expect("ado");
        assert!(p.target.trust_server_certificate);
        let p = parse_with("mssql://db/x?trust_server_certificate=true", &trusting).expect("url");
        assert!(p.target.trust_server_certificate);

        for (url, config) in [
            (format!("{ado};TrustServerCertificate=true"), &with_ca),
            (
                ado.to_owned(),
                &StoreConfig {
                    ca_file: Some(ca.clone()),
                    ..trusting.clone()
                },
            ),
            (
                format!("mssql://db/x?trust_server_certificate_ca={}", ca.display()),
                &trusting,
            ),
        ] {
            let err = parse_with(&url, config).expect_err(&url);
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
        }
        let missing = StoreConfig {
            ca_file: Some(dir.path().join("absent.pem")),
            ..StoreConfig::default()
        };
        assert!(matches!(
            parse_with(ado, &missing),
            Err(StoreError::InvalidUrl(_))
        ));
    }

    #[test]
    fn percent_decoding_rejects_bad_escapes() {
        assert!(percent_decode("%").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%G0").is_err());
        assert!(percent_decode("%FF").is_err());
        assert_eq!(percent_decode("plain"), Ok("plain".into()));
    }
}
