//! Layered configuration shared by node and coordinator: a TOML file whose unknown keys are
//! errors, then environment overrides (`PREFIX__SECTION__KEY=value`), then the caller's own
//! `validate()` into a typed configuration.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::Error;

/// Reads `path` as TOML into `T` (which should use `deny_unknown_fields`), then applies every
/// environment variable named `{env_prefix}__a__b` as an override of key `a.b`. Values are read
/// as TOML literals (`10`, `true`, `"x"`), falling back to plain strings.
pub fn load_layered<T: DeserializeOwned>(path: &Path, env_prefix: &str) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let overrides = env_overrides(env_prefix, std::env::vars());
    parse_layered(&text, &path.display().to_string(), &overrides)
}

/// `path` as given when absolute, else relative to `base` (the configuration file's folder).
pub fn resolve_path(base: &Path, path: &Path) -> std::path::PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// The pure part of [`load_layered`]: parse `text`, apply `overrides` (dotted key, raw value).
pub fn parse_layered<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    overrides: &[(Vec<String>, String)],
) -> Result<T, Error> {
    let syntax = |message: String| Error::Syntax {
        what: format!("configuration file {origin}"),
        message,
    };
    // Parse once as the typed struct first, so file errors carry line and column.
    let from_file: T =
        toml::from_str(text).map_err(|err| syntax(err.to_string().trim_end().to_string()))?;
    if overrides.is_empty() {
        return Ok(from_file);
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|err| syntax(err.to_string()))?;
    for (path, raw) in overrides {
        set_path(&mut table, path, parse_env_value(raw))?;
    }
    let described: Vec<String> = overrides.iter().map(|(path, _)| path.join(".")).collect();
    toml::Value::Table(table)
        .try_into()
        .map_err(|err: toml::de::Error| {
            Error::Config(format!(
                "after environment overrides ({}): {}",
                described.join(", "),
                err.to_string().trim_end()
            ))
        })
}

/// Environment variables `{prefix}__a__b` as key paths `["a", "b"]`.
pub fn env_overrides(
    prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Vec<(Vec<String>, String)> {
    let lead = format!("{prefix}__");
    let mut overrides: Vec<(Vec<String>, String)> = vars
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(&lead)?;
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            path.iter()
                .all(|part| !part.is_empty())
                .then_some((path, value))
        })
        .collect();
    overrides.sort();
    overrides
}

fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("value = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut table) => table
            .remove("value")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), Error> {
    let (last, parents) = path
        .split_last()
        .ok_or_else(|| Error::Config("empty environment override".into()))?;
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| {
            Error::Config(format!(
                "environment override {} goes through '{part}', which is not a table",
                path.join(".")
            ))
        })?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        policy: Policy,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Policy {
        floor: u32,
    }

    const TEXT: &str = "name = \"a\"\n[policy]\nfloor = 10\n";

    #[test]
    fn environment_overrides_win_over_the_file() {
        let overrides = env_overrides(
            "FEDQ_TEST",
            [
                ("FEDQ_TEST__POLICY__FLOOR".to_string(), "12".to_string()),
                ("FEDQ_TEST__NAME".to_string(), "site-b".to_string()),
                ("OTHER__NAME".to_string(), "ignored".to_string()),
            ]
            .into_iter(),
        );
        let sample: Sample = parse_layered(TEXT, "t", &overrides).unwrap();
        assert_eq!(sample.policy.floor, 12);
        assert_eq!(sample.name, "site-b");
    }

    #[test]
    fn unknown_key_in_file_names_key_and_line() {
        let err = parse_layered::<Sample>(
            "name = \"a\"\n[policy]\nfloor = 10\nceiling = 3\n",
            "x.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ceiling") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn unknown_key_from_environment_is_rejected() {
        let overrides = vec![(
            vec!["policy".to_string(), "flor".to_string()],
            "3".to_string(),
        )];
        let err = parse_layered::<Sample>(TEXT, "t", &overrides)
            .unwrap_err()
            .to_string();
        assert!(err.contains("flor"), "{err}");
    }
}
