//! `is_match(consumer, provider)` and the other matching helpers on two arbitrary URLs, built
//! from the parameters matching reads (with wildcards, lists, exclusions, empty values and
//! `default.` keys) plus arbitrary ones.
//!
//! Asserts only what CONTRACT §2 says:
//! - nothing panics;
//! - rule 1 (interface) is symmetric: a match in one direction means the interfaces agree in
//!   the other;
//! - a URL matches itself when it is enabled (or says `enabled=*`) and names one category
//!   (each rule is then an equality between equal values);
//! - a consumer with `interface=*`, `category=*`, `enabled=*`, `group=*`, `version=*` and
//!   `classifier=*` matches every provider (each rule's wildcard);
//! - with no `*`, no `,` list and no `-` exclusion in the values the rules read, both URLs
//!   enabled and the classifiers both absent or both present, every rule is an equality, so
//!   `is_match(a, b) == is_match(b, a)`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_core::matching::{
    empty_url, is_item_match, is_match, is_match_category, is_match_glob_pattern,
    is_service_key_match,
};

#[derive(Arbitrary, Debug)]
enum Key {
    Interface,
    Group,
    Version,
    Classifier,
    Category,
    Enabled,
    DefaultGroup,
    DefaultVersion,
    DefaultClassifier,
    DefaultCategory,
    DefaultInterface,
    DefaultEnabled,
    Other(String),
}

impl Key {
    fn name(&self) -> &str {
        match self {
            Key::Interface => "interface",
            Key::Group => "group",
            Key::Version => "version",
            Key::Classifier => "classifier",
            Key::Category => "category",
            Key::Enabled => "enabled",
            Key::DefaultGroup => "default.group",
            Key::DefaultVersion => "default.version",
            Key::DefaultClassifier => "default.classifier",
            Key::DefaultCategory => "default.category",
            Key::DefaultInterface => "default.interface",
            Key::DefaultEnabled => "default.enabled",
            Key::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Value {
    Star,
    Empty,
    A,
    B,
    List,
    Providers,
    Consumers,
    Routers,
    NotRouters,
    True,
    False,
    Service,
    Other(String),
}

impl Value {
    fn text(&self) -> &str {
        match self {
            Value::Star => "*",
            Value::Empty => "",
            Value::A => "a",
            Value::B => "b",
            Value::List => "a, b",
            Value::Providers => "providers",
            Value::Consumers => "consumers",
            Value::Routers => "routers",
            Value::NotRouters => "-routers",
            Value::True => "true",
            Value::False => "false",
            Value::Service => "com.foo.Greeter",
            Value::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzUrl {
    path: Value,
    params: Vec<(Key, Value)>,
}

impl FuzzUrl {
    fn build(&self, protocol: &str) -> Url {
        Url::new(protocol, "10.0.0.1", 20880, self.path.text()).with_parameters(
            self.params
                .iter()
                .map(|(k, v)| (k.name().to_owned(), v.text().to_owned())),
        )
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    consumer: FuzzUrl,
    provider: FuzzUrl,
    pattern: String,
    value: Option<String>,
    service_key: String,
}

fn interface_rule(c: &Url, p: &Url) -> bool {
    let (ci, pi) = (c.service_interface(), p.service_interface());
    ci == "*" || pi == "*" || ci == pi
}

/// A value that makes a rule more than an equality: a wildcard, a list or an exclusion.
fn special(v: &str) -> bool {
    v.contains('*') || v.contains(',') || v.starts_with('-')
}

/// The values the rules of CONTRACT §2 read, as matching sees them (a `default.` key answers
/// for an absent key).
fn rule_values(u: &Url) -> [Option<&str>; 5] {
    [
        Some(u.service_interface()),
        u.parameter("category"),
        u.parameter("group"),
        u.parameter("version"),
        u.parameter("classifier"),
    ]
}

fn plain(u: &Url) -> bool {
    rule_values(u).iter().flatten().all(|v| !special(v)) && u.is_enabled()
}

fn classifier_present(u: &Url) -> bool {
    u.parameter("classifier").is_some_and(|c| !c.is_empty())
}

fuzz_target!(|input: Input| {
    let c = input.consumer.build("consumer");
    let p = input.provider.build("dubbo");

    let forward = is_match(&c, &p);
    let backward = is_match(&p, &c);
    if forward {
        assert!(interface_rule(&p, &c), "{c:?} {p:?}");
    }

    for u in [&c, &p] {
        let one_category = !u.parameter("category").is_some_and(|v| v.contains(','));
        let enabled = u.is_enabled() || u.parameter("enabled") == Some("*");
        if one_category && enabled {
            assert!(is_match(u, u), "{u:?} does not match itself");
            assert!(is_match(u, &u.clone().with_parameter("timestamp", "1")));
        }
    }

    let any = c.clone().with_parameters([
        ("interface", "*"),
        ("category", "*"),
        ("enabled", "*"),
        ("group", "*"),
        ("version", "*"),
        ("classifier", "*"),
    ]);
    assert!(is_match(&any, &p), "{any:?} does not match {p:?}");

    if plain(&c) && plain(&p) && classifier_present(&c) == classifier_present(&p) {
        assert_eq!(forward, backward, "{c:?} {p:?}");
    }

    // The helpers, for panics.
    let _ = is_match_category(p.category(), c.parameter("category"));
    let _ = is_item_match(c.parameter("group"), p.parameter("group"));
    let _ = is_service_key_match(&c, &p);
    let glob = is_match_glob_pattern(&input.pattern, input.value.as_deref(), Some(&p));
    if input.pattern == "*" {
        assert!(glob);
    }
    let _ = is_match_glob_pattern(&input.pattern, input.value.as_deref(), None);
    let e = empty_url(&input.service_key, p.category());
    assert!(e.is_empty_marker());
});
