//! Device-type configuration templates (`<templates_dir>/<device_type>.toml`), rendered into
//! the JSON document published retained on `devices/D/config`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde_json::{json, Map, Value};

/// Templates shipped with the gateway, used when the templates directory does not exist.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "thermostat",
        include_str!("../config/templates/thermostat.toml"),
    ),
    ("sensor", include_str!("../config/templates/sensor.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("no templates: {0} holds no <device_type>.toml file")]
    Empty(PathBuf),
}

type ByType = HashMap<String, Map<String, Value>>;

/// The loaded templates, by device type. Clones share one set: [`Templates::reload`] through
/// any of them changes what all of them render.
#[derive(Debug, Clone)]
pub struct Templates {
    by_type: Arc<RwLock<Arc<ByType>>>,
}

/// Keys the gateway owns; a template may not set them.
const RESERVED: &[&str] = &["device_id", "version", "topics"];

fn parse(name: &Path, text: &str) -> Result<Map<String, Value>, TemplateError> {
    let bad = |message: String| TemplateError::Bad {
        path: name.to_path_buf(),
        message,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    let value = serde_json::to_value(table).map_err(|e| bad(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(bad("not a table".into()));
    };
    if let Some(key) = RESERVED.iter().find(|k| map.contains_key(**k)) {
        return Err(bad(format!(
            "`{key}` is set by the gateway and may not appear in a template"
        )));
    }
    Ok(map)
}

impl Templates {
    /// Load every `*.toml` in `dir`; the embedded templates if `dir` does not exist.
    pub fn load(dir: &Path) -> Result<Templates, TemplateError> {
        Ok(Templates {
            by_type: Arc::new(RwLock::new(Arc::new(Self::read(dir)?))),
        })
    }

    /// Render from `newer` (freshly loaded) from now on, in this and every clone of it.
    pub fn adopt(&self, newer: &Templates) {
        *self.by_type.write().unwrap_or_else(|e| e.into_inner()) = newer.current();
    }

    fn current(&self) -> Arc<ByType> {
        self.by_type
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn read(dir: &Path) -> Result<ByType, TemplateError> {
        let mut by_type = HashMap::new();
        if !dir.exists() {
            tracing::warn!(dir = %dir.display(), "templates directory not found; using the built-in thermostat and sensor templates");
            for (name, text) in EMBEDDED {
                by_type.insert((*name).to_owned(), parse(Path::new(name), text)?);
            }
            return Ok(by_type);
        }
        let entries = std::fs::read_dir(dir).map_err(|e| TemplateError::Bad {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|e| TemplateError::Bad {
                path: path.clone(),
                message: e.to_string(),
            })?;
            by_type.insert(name.to_owned(), parse(&path, &text)?);
        }
        if by_type.is_empty() {
            return Err(TemplateError::Empty(dir.to_path_buf()));
        }
        Ok(by_type)
    }

    pub fn contains(&self, device_type: &str) -> bool {
        self.current().contains_key(device_type)
    }

    pub fn device_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.current().keys().cloned().collect();
        types.sort_unstable();
        types
    }

    /// The configuration document of `device_id` at `version`.
    pub fn render(&self, device_type: &str, device_id: &str, version: i64) -> Option<Value> {
        let current = self.current();
        let template = current.get(device_type)?;
        Some(with_identity(template.clone(), device_id, version))
    }
}

/// Add (or replace) the gateway-owned keys of a configuration document.
pub fn with_identity(mut body: Map<String, Value>, device_id: &str, version: i64) -> Value {
    let prefix = format!("devices/{device_id}");
    let mut doc = Map::new();
    doc.insert("device_id".into(), json!(device_id));
    doc.insert("version".into(), json!(version));
    doc.insert(
        "topics".into(),
        json!({
            "telemetry": format!("{prefix}/telemetry"),
            "events": format!("{prefix}/events"),
            "commands": format!("{prefix}/commands"),
            "config": format!("{prefix}/config"),
        }),
    );
    for key in RESERVED {
        body.remove(*key);
    }
    doc.extend(body);
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_render_what_was_adopted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "[settings]\nx = 1\n").unwrap();
        let templates = Templates::load(dir.path()).unwrap();
        let clone = templates.clone();
        std::fs::write(dir.path().join("b.toml"), "[settings]\nx = 2\n").unwrap();
        templates.adopt(&Templates::load(dir.path()).unwrap());
        assert_eq!(clone.device_types(), ["a", "b"]);
    }

    #[test]
    fn shipped_templates_render_the_contract_shape() {
        let t = Templates::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/templates"
        )))
        .unwrap();
        assert_eq!(t.device_types(), ["sensor", "thermostat"]);
        let doc = t.render("thermostat", "t-1", 1).unwrap();
        assert_eq!(doc["device_id"], "t-1");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["topics"]["telemetry"], "devices/t-1/telemetry");
        assert_eq!(doc["topics"]["config"], "devices/t-1/config");
        assert_eq!(doc["qos"]["events"], 1);
        assert_eq!(doc["retain"]["state"], true);
        assert_eq!(doc["settings"]["target_temperature_c"], 21.5);
        assert_eq!(doc["automation_rules"][0]["name"], "night-setback");
        assert!(t.render("toaster", "x", 1).is_none());
    }

    #[test]
    fn missing_dir_falls_back_to_embedded_and_reserved_keys_are_refused() {
        let t = Templates::load(Path::new("no/such/dir")).unwrap();
        assert!(t.contains("sensor"));
        let err = parse(Path::new("x.toml"), "version = 3\n").unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }
}
