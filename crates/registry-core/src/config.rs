//! Configuration that yields the registry URL, from a TOML file or environment variables, so
//! a deployment swaps etcd for ZooKeeper by configuration alone.
//!
//! ```toml
//! [registry]
//! address = "zookeeper://10.0.0.1:2181,10.0.0.2:2181"   # or "10.0.0.1:2181" with protocol
//! # protocol = "zookeeper"
//! group = "dubbo"
//! timeout_ms = 5000
//! session_ms = 60000
//! check = true
//! [registry.parameters]
//! "retry.period" = "5000"
//! ```
//!
//! Environment variables (each overrides the file): `REGISTRY_URL` (a whole URL, or an
//! address with `REGISTRY_PROTOCOL`), `REGISTRY_PROTOCOL`, `REGISTRY_USERNAME`,
//! `REGISTRY_PASSWORD`, `REGISTRY_GROUP`, `REGISTRY_TIMEOUT_MS`, `REGISTRY_SESSION_MS`,
//! `REGISTRY_CHECK`, and `REGISTRY_PARAMETERS` (`k=v&k=v`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::url::{CHECK_KEY, GROUP_KEY, Url, redact_credentials};

/// The registry part of an application's configuration.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// A whole registry URL (`etcd://10.0.0.1:2379`), or an address (`10.0.0.1:2379`, several
    /// separated by commas) when `protocol` is set.
    pub address: Option<String>,
    /// The scheme when `address` has none: `memory`, `zookeeper`, `etcd`, ...
    pub protocol: Option<String>,
    /// User name for the backend's authentication.
    pub username: Option<String>,
    /// Password for the backend's authentication.
    pub password: Option<String>,
    /// The root group (`/dubbo` by default).
    pub group: Option<String>,
    /// Connect and request timeout, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Session timeout (ZooKeeper) or twice the lease TTL (etcd), in milliseconds.
    pub session_ms: Option<u64>,
    /// Fail fast (`true`, the default) or retry in the background.
    pub check: Option<bool>,
    /// Any other registry URL parameter.
    pub parameters: BTreeMap<String, String>,
}

/// `address` for an error message, with the password of `user:password@` replaced by `***`.
fn redacted(address: &str) -> String {
    if address.contains("://") {
        redact_credentials(address).unwrap_or_else(|| address.to_owned())
    } else {
        redact_credentials(&format!("x://{address}"))
            .map_or_else(|| address.to_owned(), |r| r["x://".len()..].to_owned())
    }
}

impl RegistryConfig {
    /// Parses TOML: either a `[registry]` table or the fields at the top level.
    pub fn from_toml_str(text: &str) -> Result<RegistryConfig> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(format!("invalid TOML: {e}")))?;
        let value = match table.get("registry") {
            Some(v @ toml::Value::Table(_)) => v.clone(),
            _ => toml::Value::Table(table),
        };
        value
            .try_into()
            .map_err(|e| Error::Config(format!("invalid registry configuration: {e}")))
    }

    /// Reads a TOML file; see [`RegistryConfig::from_toml_str`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<RegistryConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("cannot read the configuration file {}", path.display()),
            source,
        })?;
        RegistryConfig::from_toml_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Reads the `REGISTRY_*` environment variables.
    pub fn from_env() -> Result<RegistryConfig> {
        let mut c = RegistryConfig::default();
        c.apply_env(|k| std::env::var(k).ok())?;
        Ok(c)
    }

    /// The file (when given), then the environment on top of it.
    pub fn load(file: Option<&Path>) -> Result<RegistryConfig> {
        let mut c = match file {
            Some(f) => RegistryConfig::from_toml_file(f)?,
            None => RegistryConfig::default(),
        };
        c.apply_env(|k| std::env::var(k).ok())?;
        Ok(c)
    }

    /// Overrides fields from variables found by `lookup` (`REGISTRY_URL`, ...). Taking a
    /// lookup function lets tests and embedders supply their own environment.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("REGISTRY_URL") {
            self.address = Some(v);
        }
        if let Some(v) = get("REGISTRY_PROTOCOL") {
            self.protocol = Some(v);
        }
        if let Some(v) = get("REGISTRY_USERNAME") {
            self.username = Some(v);
        }
        if let Some(v) = get("REGISTRY_PASSWORD") {
            self.password = Some(v);
        }
        if let Some(v) = get("REGISTRY_GROUP") {
            self.group = Some(v);
        }
        let num = |k: &str| -> Result<Option<u64>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        Error::Config(format!("{k}={v:?} is not a number of milliseconds"))
                    })
                })
                .transpose()
        };
        if let Some(v) = num("REGISTRY_TIMEOUT_MS")? {
            self.timeout_ms = Some(v);
        }
        if let Some(v) = num("REGISTRY_SESSION_MS")? {
            self.session_ms = Some(v);
        }
        if let Some(v) = get("REGISTRY_CHECK") {
            self.check = Some(match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(Error::Config(format!(
                        "REGISTRY_CHECK={v:?} is not true or false"
                    )));
                }
            });
        }
        if let Some(v) = get("REGISTRY_PARAMETERS") {
            for part in v.split('&').filter(|p| !p.is_empty()) {
                let (k, val) = part.split_once('=').unwrap_or((part, part));
                self.parameters.insert(k.to_owned(), val.to_owned());
            }
        }
        Ok(())
    }

    /// The registry URL this configuration describes.
    pub fn to_url(&self) -> Result<Url> {
        let address = self
            .address
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Error::Config("no registry address: set `address` or REGISTRY_URL".to_owned())
            })?;
        let mut url = if address.contains("://") {
            let url = Url::parse(address)?;
            if let Some(p) = &self.protocol
                && !p.eq_ignore_ascii_case(url.protocol())
            {
                return Err(Error::Config(format!(
                    "protocol {p:?} contradicts the address {:?}",
                    redacted(address)
                )));
            }
            url
        } else {
            let protocol = self.protocol.as_deref().ok_or_else(|| {
                let shown = redacted(address);
                Error::Config(format!(
                    "the address {shown:?} has no scheme: write `etcd://{shown}` or set `protocol`"
                ))
            })?;
            Url::parse(&format!("{protocol}://{address}"))?
        };
        if self.username.is_some() || self.password.is_some() {
            url = url.with_credentials(self.username.as_deref(), self.password.as_deref());
        }
        if let Some(g) = &self.group {
            url = url.with_parameter(GROUP_KEY, g.as_str());
        }
        if let Some(t) = self.timeout_ms {
            url = url.with_parameter("timeout", t.to_string());
        }
        if let Some(s) = self.session_ms {
            url = url.with_parameter("session", s.to_string());
        }
        if let Some(c) = self.check {
            url = url.with_parameter(CHECK_KEY, c.to_string());
        }
        Ok(url.with_parameters(
            self.parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        ))
    }
}

/// Never shows the password, not even one inside `address` (`u:p@host`).
impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let address = self.address.as_ref().map(|a| redacted(a));
        f.debug_struct("RegistryConfig")
            .field("address", &address)
            .field("protocol", &self.protocol)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("group", &self.group)
            .field("timeout_ms", &self.timeout_ms)
            .field("session_ms", &self.session_ms)
            .field("check", &self.check)
            .field("parameters", &self.parameters)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_a_registry_table() {
        let c = RegistryConfig::from_toml_str(
            r#"
            [registry]
            address = "10.0.0.1:2181,10.0.0.2:2181"
            protocol = "zookeeper"
            group = "prod"
            check = false
            [registry.parameters]
            "retry.period" = "1000"
            "#,
        )
        .unwrap();
        let u = c.to_url().unwrap();
        assert_eq!(u.protocol(), "zookeeper");
        assert_eq!(u.addresses(), vec!["10.0.0.1:2181", "10.0.0.2:2181"]);
        assert_eq!(u.parameter("group"), Some("prod"));
        assert_eq!(u.parameter("check"), Some("false"));
        assert_eq!(u.parameter("retry.period"), Some("1000"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = RegistryConfig::from_toml_str("address = \"zookeeper://h:2181\"").unwrap();
        let env: BTreeMap<&str, &str> = [
            ("REGISTRY_URL", "etcd://e:2379"),
            ("REGISTRY_SESSION_MS", "10000"),
            ("REGISTRY_PARAMETERS", "retry.times=3&file=false"),
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| (*v).to_owned()))
            .unwrap();
        let u = c.to_url().unwrap();
        assert_eq!(
            u.to_full_string(),
            "etcd://e:2379?file=false&retry.times=3&session=10000"
        );
    }

    #[test]
    fn bad_configuration_says_what_is_wrong() {
        let e = RegistryConfig::default().to_url().unwrap_err().to_string();
        assert!(e.contains("no registry address"), "{e}");
        let c = RegistryConfig {
            address: Some("h:1".into()),
            ..Default::default()
        };
        assert!(c.to_url().unwrap_err().to_string().contains("no scheme"));
        let e = RegistryConfig::from_toml_str("adress = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adress"), "{e}");
        let mut c = RegistryConfig::default();
        let e = c
            .apply_env(|k| (k == "REGISTRY_TIMEOUT_MS").then(|| "soon".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("REGISTRY_TIMEOUT_MS"), "{e}");
    }

    /// Found by the `registry_config` fuzz target: these errors quoted the address with its
    /// password.
    #[test]
    fn address_errors_hide_the_password() {
        for (address, protocol) in [
            ("alice:s3cret-pw@h:1", None),
            ("etcd://alice:s3cret-pw@h:1", Some("zookeeper")),
        ] {
            let c = RegistryConfig {
                address: Some(address.into()),
                protocol: protocol.map(str::to_owned),
                ..Default::default()
            };
            let e = c.to_url().unwrap_err().to_string();
            assert!(!e.contains("s3cret-pw"), "{e}");
            assert!(e.contains("alice:***@h:1"), "{e}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let c = RegistryConfig {
            address: Some("admin:s3cr3t@10.0.0.1:2181".to_owned()),
            password: Some("hunter2".to_owned()),
            ..RegistryConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("***"), "{shown}");
    }
}
