//! `compose.yaml` held to what the services need, read as data (no Docker engine needed): no
//! secret has a default, every server a service connects to is reached inside the compose
//! network, and each service has its own credential on each server.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

fn compose() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../compose.yaml");
    let mut file: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file.apply_merge().unwrap();
    file
}

/// Every string in `value`, with where it is.
fn strings<'a>(value: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((at, s)),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map {
                strings(item, format!("{at}.{}", key.as_str().unwrap_or("?")), out);
            }
        }
        Value::Tagged(tagged) => strings(&tagged.value, at, out),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The `${NAME…}` interpolations of `text`: (name, what follows the name inside the braces).
fn interpolations(text: &str) -> Vec<(&str, &str)> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(inside, _)| {
            let end = inside
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inside.len());
            inside.split_at(end)
        })
        .collect()
}

fn is_secret(name: &str) -> bool {
    ["PASSWORD", "SECRET", "SIGNING_KEY", "TOKEN"]
        .iter()
        .any(|word| name.contains(word))
}

/// Each service's environment, `${…}` left as written.
fn environments(file: &Value) -> BTreeMap<String, BTreeMap<String, String>> {
    let services = file["services"].as_mapping().unwrap();
    services
        .iter()
        .map(|(name, service)| {
            let env = service["environment"]
                .as_mapping()
                .map(|env| {
                    env.iter()
                        .map(|(k, v)| {
                            let v = match v {
                                Value::String(s) => s.clone(),
                                other => serde_yaml_ng::to_string(other).unwrap(),
                            };
                            (k.as_str().unwrap().to_owned(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            (name.as_str().unwrap().to_owned(), env)
        })
        .collect()
}

/// The host of a URL (`scheme://[user:password@]host[:port][/…]`).
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.split(':').next().unwrap_or_default()
}

#[test]
fn no_secret_has_a_default() {
    let file = compose();
    let mut all = Vec::new();
    strings(&file, String::new(), &mut all);
    let mut secrets = 0;
    for (at, text) in all {
        for (name, rest) in interpolations(text) {
            if !is_secret(name) {
                continue;
            }
            secrets += 1;
            assert!(
                rest.is_empty() || rest.starts_with(":?") || rest.starts_with('?'),
                "{at}: ${{{name}{rest}}} gives the secret {name} a default"
            );
        }
    }
    assert!(secrets >= 10, "the file's secrets were found ({secrets})");
}

#[test]
fn every_server_a_service_connects_to_is_inside_the_network() {
    let file = compose();
    let services = environments(&file);
    // What services connect to (not the addresses they hand to clients: FOLLOW_GATEWAY_URL,
    // FOLLOW_S3_PUBLIC_ENDPOINT).
    let connects = [
        "FOLLOW_S3_ENDPOINT",
        "FOLLOW_VALKEY_URL",
        "FOLLOW_DATABASE_URL",
        "FOLLOW_DATABASE_OWNER_URL",
    ];
    let mut checked = 0;
    for (service, env) in &services {
        for name in connects {
            let Some(url) = env.get(name) else { continue };
            let host = host(url);
            assert!(
                services.contains_key(host),
                "{service}: {name}={url} reaches {host:?}, not a service of compose.yaml"
            );
            checked += 1;
        }
    }
    for service in ["api", "gateway"] {
        assert!(
            services[service].contains_key("FOLLOW_S3_ENDPOINT"),
            "{service} is told where S3 is"
        );
    }
    assert!(checked >= 6, "{checked}");
}

#[test]
fn each_service_has_its_own_least_privilege_credentials() {
    let services = environments(&compose());
    let (api, gateway) = (&services["api"], &services["gateway"]);
    let user_of = |url: &str| {
        let rest = url.split_once("://").unwrap().1;
        rest.split_once(':').unwrap().0.to_owned()
    };
    assert_eq!(user_of(&api["FOLLOW_VALKEY_URL"]), "follow-api");
    assert_eq!(
        user_of(&gateway["FOLLOW_VALKEY_URL"]),
        "follow-image-gateway"
    );
    // The API runs as the database's service role; only the migration step is the owner.
    assert_eq!(user_of(&api["FOLLOW_DATABASE_URL"]), "follow_api");
    let owner = &services["migrate"]["FOLLOW_DATABASE_OWNER_URL"];
    assert_eq!(user_of(owner), "follow");
    assert!(!api.contains_key("FOLLOW_DATABASE_OWNER_URL"));
    // One S3 user per service, never the server's root.
    let (api_key, gateway_key) = (
        &api["FOLLOW_S3_ACCESS_KEY_ID"],
        &gateway["FOLLOW_S3_ACCESS_KEY_ID"],
    );
    assert_ne!(api_key, gateway_key);
    for key in [api_key, gateway_key] {
        assert!(!key.contains("MINIO_ROOT"), "{key}");
    }
    let setup = serde_yaml_ng::to_string(&compose()["services"]["minio-setup"]).unwrap();
    for user in [api_key, gateway_key] {
        assert!(
            setup.contains(&format!("mc admin user add local {user} ")),
            "minio-setup makes the S3 user {user}"
        );
    }
}
