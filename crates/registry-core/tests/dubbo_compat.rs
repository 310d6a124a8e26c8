//! Dubbo compatibility: Apache Dubbo's own unit tests for its URL type and its matching
//! helpers, restated against `registry_core`.
//!
//! Sources (apache/dubbo, `dubbo-common/src/test/java/org/apache/dubbo/common/`):
//! - `utils/UrlUtilsTest.java` (plus the `UrlUtils.isMatch` source for the group-list,
//!   classifier and `enabled` branches, which Dubbo's tests do not cover)
//! - `URLTest.java`
//!
//! Each test names the Dubbo test method it restates. Where the CONTRACT
//! (`docs/CONTRACT.md` §1 and §2) deliberately differs from Dubbo, the test asserts the
//! CONTRACT and says so in a comment.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};

use registry_core::matching::{
    empty_url, is_item_match, is_match, is_match_category, is_match_glob_pattern,
    is_service_key_match,
};
use registry_core::{Error, Url, decode, encode};

fn url(s: &str) -> Url {
    match Url::parse(s) {
        Ok(u) => u,
        Err(e) => panic!("{s:?} should parse: {e}"),
    }
}

fn hash_of(u: &Url) -> u64 {
    let mut h = DefaultHasher::new();
    u.hash(&mut h);
    h.finish()
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Asserts that `input` is refused with an `InvalidUrl` error that quotes it.
fn assert_invalid(input: &str) -> String {
    match Url::parse(input) {
        Ok(u) => panic!("{input:?} should be refused, parsed as {u:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                matches!(&e, Error::InvalidUrl { input: quoted, .. } if quoted == input),
                "{input:?}: expected InvalidUrl quoting the input, got {e:?}"
            );
            assert!(
                msg.contains(input),
                "message {msg:?} does not quote {input:?}"
            );
            msg
        }
    }
}

// ---------------------------------------------------------------------------------------------
// UrlUtilsTest
// ---------------------------------------------------------------------------------------------
mod url_utils_test {
    use super::*;

    const CONSUMER: &str = "dubbo://127.0.0.1:20880/com.xxx.XxxService";
    const PROVIDER: &str = "http://127.0.0.1:8080/com.xxx.XxxService";

    fn consumer(query: &str) -> Url {
        url(&format!("{CONSUMER}?{query}"))
    }
    fn provider(query: &str) -> Url {
        url(&format!("{PROVIDER}?{query}"))
    }

    // UrlUtilsTest.testParseUrl
    #[test]
    fn parse_url() {
        let u = url("remote://root:alibaba@127.0.0.1:9090/dubbo.test.api");
        assert_eq!(u.address(), "127.0.0.1:9090");
        assert_eq!(u.username(), Some("root"));
        assert_eq!(u.password(), Some("alibaba"));
        assert_eq!(u.path(), "dubbo.test.api");
        assert_eq!(u.port(), 9090);
        assert_eq!(u.protocol(), "remote");
    }

    // UrlUtilsTest.testParseURLWithSpecial. Dubbo's `parseURL` supplies the default protocol
    // `dubbo`; CONTRACT §1 makes the protocol required, so the bare form is an error and the
    // explicit form round-trips.
    #[test]
    fn parse_url_with_special() {
        let address = "127.0.0.1:2181?backup=127.0.0.1:2182,127.0.0.1:2183";
        assert_invalid(address);
        let full = format!("dubbo://{address}");
        let u = url(&full);
        assert_eq!(u.to_full_string(), full);
        assert_eq!(
            u.addresses(),
            vec!["127.0.0.1:2181", "127.0.0.1:2182", "127.0.0.1:2183"]
        );
    }

    // UrlUtilsTest.testParseUrl2: several comma-separated hosts become host + `backup`.
    #[test]
    fn parse_url_several_hosts() {
        let u = url("dubbo://root:alibaba@192.168.0.1:10000,192.168.0.2,192.168.0.3");
        assert_eq!(u.address(), "192.168.0.1:10000");
        assert_eq!(u.username(), Some("root"));
        assert_eq!(u.password(), Some("alibaba"));
        assert_eq!(u.port(), 10000);
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.parameter("backup"), Some("192.168.0.2,192.168.0.3"));
    }

    // UrlUtilsTest.testIsMatch
    #[test]
    fn is_match_same_group_and_version() {
        assert!(is_match(
            &consumer("version=1.0.0&group=test"),
            &provider("version=1.0.0&group=test")
        ));
    }

    // UrlUtilsTest.testIsMatch2
    #[test]
    fn is_match_other_version() {
        assert!(!is_match(
            &consumer("version=2.0.0&group=test"),
            &provider("version=1.0.0&group=test")
        ));
    }

    // UrlUtilsTest.testIsMatch3
    #[test]
    fn is_match_other_group() {
        assert!(!is_match(
            &consumer("version=1.0.0&group=aa"),
            &provider("version=1.0.0&group=test")
        ));
    }

    // UrlUtilsTest.testIsMatch4
    #[test]
    fn is_match_any_group() {
        assert!(is_match(
            &consumer("version=1.0.0&group=*"),
            &provider("version=1.0.0&group=test")
        ));
    }

    // UrlUtilsTest.testIsMatch5
    #[test]
    fn is_match_any_version() {
        assert!(is_match(
            &consumer("version=*&group=test"),
            &provider("version=1.0.0&group=test")
        ));
    }

    // UrlUtils.isMatch, group branch (`StringUtils.isContains(consumerGroup, providerGroup)`),
    // CONTRACT §2.4: the consumer's comma list contains the provider's group.
    #[test]
    fn is_match_group_list() {
        let p = provider("version=1.0.0&group=test");
        assert!(is_match(&consumer("version=1.0.0&group=aa,test"), &p));
        assert!(is_match(&consumer("version=1.0.0&group=test,aa"), &p));
        assert!(!is_match(&consumer("version=1.0.0&group=aa,bb"), &p));
        // A list element must equal the group, not merely contain it.
        assert!(!is_match(&consumer("version=1.0.0&group=aa,tes"), &p));
        assert!(!is_match(&consumer("version=1.0.0&group=aa,testing"), &p));
    }

    // UrlUtils.isMatch, group branch: both absent is equal; one absent is not.
    #[test]
    fn is_match_group_absent() {
        assert!(is_match(
            &consumer("version=1.0.0"),
            &provider("version=1.0.0")
        ));
        assert!(!is_match(
            &consumer("version=1.0.0"),
            &provider("version=1.0.0&group=test")
        ));
        assert!(!is_match(
            &consumer("version=1.0.0&group=test"),
            &provider("version=1.0.0")
        ));
    }

    // UrlUtils.isMatch, version branch (`StringUtils.isEquals`): absent matches only absent.
    #[test]
    fn is_match_version_absent() {
        assert!(is_match(&consumer("group=g"), &provider("group=g")));
        assert!(!is_match(
            &consumer("group=g"),
            &provider("group=g&version=1.0.0")
        ));
        assert!(!is_match(
            &consumer("group=g&version=1.0.0"),
            &provider("group=g")
        ));
        assert!(is_match(
            &consumer("group=g&version=*"),
            &provider("group=g")
        ));
    }

    // UrlUtils.isMatch, classifier branch, CONTRACT §2.6: the consumer classifier (default `*`)
    // is `*` or equals the provider's (default `*`).
    #[test]
    fn is_match_classifier() {
        let p = provider("classifier=c1");
        assert!(is_match(&consumer(""), &p));
        assert!(is_match(&consumer("classifier=*"), &p));
        assert!(is_match(&consumer("classifier=c1"), &p));
        assert!(!is_match(&consumer("classifier=c2"), &p));
        // The provider's default is `*`, which a concrete consumer classifier does not equal.
        assert!(!is_match(&consumer("classifier=c1"), &provider("")));
        assert!(is_match(&consumer(""), &provider("")));
    }

    // UrlUtils.isMatch, enabled branch, CONTRACT §2.3: a provider with `enabled=false` matches
    // only a consumer with `enabled=*`.
    #[test]
    fn is_match_enabled() {
        let disabled = provider("enabled=false");
        assert!(!is_match(&consumer(""), &disabled));
        assert!(!is_match(&consumer("enabled=false"), &disabled));
        assert!(!is_match(&consumer("enabled=true"), &disabled));
        assert!(is_match(&consumer("enabled=*"), &disabled));
        // `enabled=*` does not stop the consumer from seeing enabled providers.
        assert!(is_match(&consumer("enabled=*"), &provider("")));
        assert!(is_match(&consumer("enabled=*"), &provider("enabled=true")));
    }

    // UrlUtils.isMatch, interface branch, CONTRACT §2.1: consumer `*`, provider `*`, or equal.
    // The interface is the `interface` parameter, else the path.
    #[test]
    fn is_match_interface() {
        let p = provider("");
        assert!(is_match(&url("consumer://h/*"), &p));
        assert!(is_match(&url("consumer://h/x?interface=*"), &p));
        assert!(is_match(&url("consumer://h/com.xxx.XxxService"), &p));
        assert!(is_match(
            &url("consumer://h/x?interface=com.xxx.XxxService"),
            &p
        ));
        assert!(!is_match(&url("consumer://h/com.xxx.Other"), &p));
        assert!(is_match(
            &url("consumer://h/com.xxx.Other"),
            &url("dubbo://h:1/x?interface=*")
        ));
    }

    // UrlUtils.isMatch, category branch (`isMatchCategory`), CONTRACT §2.2.
    #[test]
    fn is_match_category_rules() {
        let c = |cat: &str| consumer(&format!("category={cat}"));
        let p = |cat: &str| provider(&format!("category={cat}"));
        // Defaults: both `providers`.
        assert!(is_match(&consumer(""), &provider("")));
        assert!(!is_match(&consumer(""), &p("routers")));
        assert!(is_match(&c("providers"), &provider("")));
        assert!(!is_match(&c("routers"), &provider("")));
        // Lists, `*`, exclusions.
        assert!(is_match(&c("providers,routers"), &p("routers")));
        assert!(is_match(&c("*"), &p("configurators")));
        assert!(is_match(&c("-routers"), &p("configurators")));
        assert!(!is_match(&c("-routers"), &p("routers")));

        assert!(is_match_category("providers", None));
        assert!(!is_match_category("consumers", None));
        assert!(is_match_category("consumers", Some("providers,consumers")));
        assert!(is_match_category("routers", Some("*")));
        assert!(!is_match_category(
            "routers",
            Some("-routers,-configurators")
        ));
        assert!(is_match_category(
            "providers",
            Some("-routers,-configurators")
        ));
    }

    // UrlUtils.isMatchCategory uses `String.contains`; CONTRACT §2.2 deliberately compares
    // comma-separated tokens instead, so `router` is not `routers` and `-routers` does not
    // exclude `router`. Dubbo answers the opposite for every assertion below.
    #[test]
    fn is_match_category_by_tokens_not_substrings() {
        assert!(!is_match_category("router", Some("routers")));
        assert!(!is_match_category("provider", Some("providers,routers")));
        assert!(is_match_category("router", Some("-routers")));
        assert!(!is_match(
            &consumer("category=routers"),
            &provider("category=router")
        ));
    }

    // UrlUtilsTest.testIsMatchUrlWithDefaultPrefix: `default.X` answers `X` on both sides.
    #[test]
    fn is_match_url_with_default_prefix() {
        let u = url(
            "dubbo://127.0.0.1:20880/com.xxx.XxxService?default.version=1.0.0&default.group=test",
        );
        assert_eq!(u.version(), Some("1.0.0"));
        assert_eq!(u.group(), Some("test"));
        assert_eq!(u.parameter("default.version"), Some("1.0.0"));

        let consumer = url("consumer://127.0.0.1/com.xxx.XxxService?version=1.0.0&group=test");
        assert!(is_match(&consumer, &u));

        // Dubbo's test passes `consumerUrl` here by mistake; the intent is `consumerUrl1`.
        let consumer1 =
            url("consumer://127.0.0.1/com.xxx.XxxService?default.version=1.0.0&default.group=test");
        assert!(is_match(&consumer1, &u));
        let other = url("consumer://127.0.0.1/com.xxx.XxxService?default.version=2.0.0");
        assert!(!is_match(&other, &u));
    }

    // UrlUtilsTest.testIsItemMatch
    #[test]
    fn item_match() {
        assert!(is_item_match(None, None));
        assert!(!is_item_match(Some("1"), None));
        assert!(!is_item_match(None, Some("1")));
        assert!(is_item_match(Some("1"), Some("1")));
        assert!(is_item_match(Some("*"), None));
        assert!(is_item_match(Some("*"), Some("*")));
        assert!(is_item_match(Some("*"), Some("1234")));
        assert!(!is_item_match(None, Some("*")));
        assert!(!is_item_match(Some("1"), Some("2")));
    }

    // UrlUtilsTest.testIsServiceKeyMatch
    #[test]
    fn service_key_match() {
        let base = url("test://127.0.0.1");
        let pattern = base
            .clone()
            .with_parameter("group", "test")
            .with_parameter("interface", "test")
            .with_parameter("version", "test");
        let value = pattern.clone();
        assert!(is_service_key_match(&pattern, &value));

        let pattern = pattern.with_parameter("group", "*");
        assert!(is_service_key_match(&pattern, &value));

        let pattern = pattern.with_parameter("version", "*");
        assert!(is_service_key_match(&pattern, &value));

        // Not in Dubbo's test: each of the three parts can make it fail.
        let exact = value.clone();
        assert!(!is_service_key_match(
            &exact.clone().with_parameter("group", "other"),
            &value
        ));
        assert!(!is_service_key_match(
            &exact.clone().with_parameter("version", "other"),
            &value
        ));
        assert!(!is_service_key_match(
            &exact.clone().with_parameter("interface", "other"),
            &value
        ));
        assert!(!is_service_key_match(
            &exact,
            &value.clone().without_parameter("version")
        ));
    }

    // UrlUtilsTest.testGetEmptyUrl
    #[test]
    fn get_empty_url() {
        let u = empty_url("dubbo/a.b.c.Foo:1.0.0", "test");
        assert_eq!(
            u.to_full_string(),
            "empty://0.0.0.0/a.b.c.Foo?category=test&group=dubbo&version=1.0.0"
        );
        assert!(u.is_empty_marker());
        assert_eq!(u.service_key(), "dubbo/a.b.c.Foo:1.0.0");

        // Not in Dubbo's test: no group, no version.
        assert_eq!(
            empty_url("a.b.c.Foo", "providers").to_full_string(),
            "empty://0.0.0.0/a.b.c.Foo?category=providers"
        );
    }

    // UrlUtilsTest.testIsMatchGlobPattern
    #[test]
    fn match_glob_pattern() {
        assert!(is_match_glob_pattern("*", Some("value"), None));
        assert!(is_match_glob_pattern("", None, None));
        assert!(!is_match_glob_pattern("", Some("value"), None));
        assert!(is_match_glob_pattern("value", Some("value"), None));
        assert!(is_match_glob_pattern("v*", Some("value"), None));
        assert!(is_match_glob_pattern("*e", Some("value"), None));
        assert!(is_match_glob_pattern("v*e", Some("value"), None));
        let param = url("dubbo://localhost:8080/Foo?key=v*e");
        assert!(is_match_glob_pattern("$key", Some("value"), Some(&param)));

        // Not in Dubbo's test: the negative side of each form.
        assert!(!is_match_glob_pattern("value", Some("values"), None));
        assert!(!is_match_glob_pattern("x*", Some("value"), None));
        assert!(!is_match_glob_pattern("*x", Some("value"), None));
        assert!(!is_match_glob_pattern("v*x", Some("value"), None));
        assert!(!is_match_glob_pattern("v*", None, None));
        assert!(!is_match_glob_pattern("$key", Some("other"), Some(&param)));
    }

    // UrlUtils.isMatchGlobPattern tests `StringUtils.isEmpty(pattern) && isEmpty(value)`,
    // so an empty pattern matches an empty value as well as a missing one. CONTRACT is silent
    // on glob patterns; the Rust function documents itself as Dubbo's.
    #[test]

    fn match_glob_pattern_empty_value_is_like_missing() {
        assert!(is_match_glob_pattern("", Some(""), None));
    }
}

// ---------------------------------------------------------------------------------------------
// URLTest
// ---------------------------------------------------------------------------------------------
mod url_test {
    use super::*;

    const FULL: &str =
        "dubbo://admin:hello1234@10.20.130.230:20880/context/path?version=1.0.0&application=morgan";

    // URLTest.test_valueOf_noProtocolAndHost and test_valueOf_noProtocol. Dubbo parses these
    // with a null protocol; CONTRACT §1 makes the protocol required, so each is an error that
    // quotes the input.
    #[test]
    fn value_of_without_protocol_is_an_error() {
        for input in [
            "/context/path?version=1.0.0&application=morgan",
            "context/path?version=1.0.0&application=morgan",
            "10.20.130.230",
            "10.20.130.230:20880",
            "10.20.130.230/context/path",
            "10.20.130.230:20880/context/path",
        ] {
            assert_invalid(input);
        }
        // With credentials the error quotes the input with the password redacted.
        let e = Url::parse(
            "admin:hello1234@10.20.130.230:20880/context/path?version=1.0.0&application=morgan",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{e:?}");
        assert!(!msg.contains("hello1234"), "{msg}");
        assert!(
            msg.contains("admin:***@10.20.130.230:20880/context/path"),
            "{msg}"
        );
    }

    // URLTest.test_valueOf_noHost
    #[test]
    fn value_of_no_host() {
        let u = url("file:///home/user1/router.js");
        assert_eq!(u.protocol(), "file");
        assert_eq!(u.username(), None);
        assert_eq!(u.password(), None);
        assert_eq!(u.host(), "");
        assert_eq!(u.port(), 0);
        assert_eq!(u.path(), "home/user1/router.js");
        assert!(u.parameters().is_empty());

        // Only two slashes: `home` is the host.
        let u = url("file://home/user1/router.js");
        assert_eq!(u.protocol(), "file");
        assert_eq!(u.host(), "home");
        assert_eq!(u.port(), 0);
        assert_eq!(u.path(), "user1/router.js");
        assert!(u.parameters().is_empty());

        let u = url("file:///d:/home/user1/router.js");
        assert_eq!(u.host(), "");
        assert_eq!(u.port(), 0);
        assert_eq!(u.path(), "d:/home/user1/router.js");
        assert!(u.parameters().is_empty());

        let u = url("file:///home/user1/router.js?p1=v1&p2=v2");
        assert_eq!(u.host(), "");
        assert_eq!(u.path(), "home/user1/router.js");
        assert_eq!(u.parameters(), &params(&[("p1", "v1"), ("p2", "v2")]));

        // Dubbo also accepts `file:/home/...` (one slash). CONTRACT §1's form is
        // `protocol://...`, so that is refused here.
        assert_invalid("file:/home/user1/router.js");
        assert_invalid("file:/home/user1/router.js?p1=v1&p2=v2");
    }

    // URLTest.test_valueOf_WithProtocolHost
    #[test]
    fn value_of_with_protocol_host() {
        let u = url("dubbo://10.20.130.230");
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.username(), None);
        assert_eq!(u.password(), None);
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.address(), "10.20.130.230");
        assert_eq!(u.port(), 0);
        assert_eq!(u.path(), "");
        assert!(u.parameters().is_empty());

        let u = url("dubbo://10.20.130.230:20880/context/path");
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.username(), None);
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.address(), "10.20.130.230:20880");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "context/path");
        assert!(u.parameters().is_empty());

        let u = url("dubbo://admin:hello1234@10.20.130.230:20880");
        assert_eq!(u.username(), Some("admin"));
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "");
        assert!(u.parameters().is_empty());

        let u = url("dubbo://admin:hello1234@10.20.130.230:20880?version=1.0.0");
        assert_eq!(u.username(), Some("admin"));
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "");
        assert_eq!(u.parameters().len(), 1);
        assert_eq!(u.version(), Some("1.0.0"));

        let u = url(FULL);
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.username(), Some("admin"));
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.address(), "10.20.130.230:20880");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "context/path");
        assert_eq!(u.parameters().len(), 2);
        assert_eq!(u.version(), Some("1.0.0"));
        assert_eq!(u.parameter("application"), Some("morgan"));

        // `noValue=`: an empty value is kept (CONTRACT §1), and Dubbo 3 answers "" too.
        let u = url(&format!("{FULL}&noValue="));
        assert_eq!(u.parameters().len(), 3);
        assert_eq!(u.parameter("noValue"), Some(""));
        assert_eq!(
            u.to_full_string(),
            "dubbo://admin:hello1234@10.20.130.230:20880/context/path\
             ?application=morgan&noValue=&version=1.0.0"
        );
    }

    // URLTest.test_valueOf_spaceSafe: spaces inside a value are kept as they are.
    #[test]
    fn value_of_space_safe() {
        let u = url("http://1.2.3.4:8080/path?key=value1 value2");
        assert_eq!(
            u.to_full_string(),
            "http://1.2.3.4:8080/path?key=value1 value2"
        );
        assert_eq!(u.parameter("key"), Some("value1 value2"));
    }

    // URL.valueOf trims the input and each `&`-separated part (Dubbo 2.x `valueOf`,
    // `part = part.trim()`), and skips empty parts.
    #[test]
    fn value_of_trims_spaces() {
        let u = url("  dubbo://h:1/p?k1=v1 & k2=v2 &&  ");
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.host(), "h");
        assert_eq!(u.port(), 1);
        assert_eq!(u.path(), "p");
        assert_eq!(u.parameters(), &params(&[("k1", "v1"), ("k2", "v2")]));
        assert_eq!(u.to_full_string(), "dubbo://h:1/p?k1=v1&k2=v2");
    }

    // URLTest.test_noValueKey (Dubbo 2.x) / test_valueOfHasNameWithoutValue (Dubbo 3).
    // Dubbo 2.x reads `k0` as `k0=k0`; Dubbo 3 changed it to `k0=""`. CONTRACT §1 keeps the
    // 2.x rule: `key` without `=` means `key=key`.
    #[test]
    fn no_value_key() {
        let u = url("http://1.2.3.4:8080/path?k0&k1=v1");
        assert!(u.parameters().contains_key("k0"));
        assert_eq!(u.parameter("k0"), Some("k0"));
        assert_eq!(u.parameter("k1"), Some("v1"));

        let u = url(&format!("{FULL}&noValue"));
        assert_eq!(u.parameter("noValue"), Some("noValue"));
    }

    // CONTRACT §1: an empty key is dropped (whether or not it has a value).
    #[test]
    fn empty_key_is_dropped() {
        let u = url("dubbo://h:1/p?=v&=&k=v");
        assert_eq!(u.parameters(), &params(&[("k", "v")]));
        assert_eq!(u.to_full_string(), "dubbo://h:1/p?k=v");
        let u = url("dubbo://h:1/p").with_parameter("", "v");
        assert!(u.parameters().is_empty());
    }

    // URLTest.test_valueOf_Exception_noProtocol. Dubbo: `IllegalStateException("url missing
    // protocol: \"://1.2.3.4:8080/path\"")`; here an `InvalidUrl` error quoting the input.
    #[test]
    fn value_of_exception_no_protocol() {
        let msg = assert_invalid("://1.2.3.4:8080/path");
        assert!(msg.contains("missing protocol"), "{msg}");
        // Also through `FromStr` and `TryFrom`.
        assert!("://1.2.3.4:8080/path".parse::<Url>().is_err());
        assert!(Url::try_from("://1.2.3.4:8080/path").is_err());
    }

    // CONTRACT §1: parsing never panics; a port must be 0..=65535 (Dubbo accepts any int).
    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_invalid("");
        assert_invalid("   ");
        assert_invalid("dubbo://h:65536/x");
        assert_invalid("dubbo://h:-1/x");
        assert_invalid("dubbo://h:port/x");
        assert_invalid("dubbo://[::1/x");
        assert_invalid("dubbo://h1:2181,h2:99999");
        assert_eq!(url("dubbo://h:65535/x").port(), 65535);
        assert_eq!(url("dubbo://h:0/x").port(), 0);
    }

    // URLTest.test_getAddress
    #[test]
    fn get_address() {
        assert_eq!(url(FULL).address(), "10.20.130.230:20880");
        assert_eq!(url("dubbo://10.20.130.230/x").address(), "10.20.130.230");
    }

    // URLTest.test_equals: a parsed URL equals the one built from its parts.
    #[test]
    fn equals_built_url() {
        let built = Url::new("dubbo", "10.20.130.230", 20880, "context/path")
            .with_credentials(Some("admin"), Some("hello1234"))
            .with_parameters([("version", "1.0.0"), ("application", "morgan")]);
        let parsed = url(FULL);
        assert_eq!(parsed, built);
        assert_eq!(hash_of(&parsed), hash_of(&built));
    }

    // Equality and hash do not depend on the order the parameters were written in.
    #[test]
    fn equals_and_hash_ignore_parameter_order() {
        let a = url("dubbo://h:1/p?a=1&b=2&c=3");
        let b = url("dubbo://h:1/p?c=3&a=1&b=2");
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_eq!(a.to_full_string(), b.to_full_string());
    }

    // URLTest.test_toFullString. Dubbo accepts either parameter order; CONTRACT §1 fixes key
    // order.
    #[test]
    fn to_full_string() {
        assert_eq!(
            url(FULL).to_full_string(),
            "dubbo://admin:hello1234@10.20.130.230:20880/context/path?application=morgan&version=1.0.0"
        );
        assert_eq!(
            url("dubbo://admin@h/p?z=1&a=2&m=3").to_full_string(),
            "dubbo://admin@h/p?a=2&m=3&z=1"
        );
        assert_eq!(
            url(FULL).to_identity_string(),
            "dubbo://admin:hello1234@10.20.130.230:20880/context/path"
        );
    }

    // URLTest.test_toString: Dubbo's `toString` leaves the credentials out. Here `Debug` is the
    // one that must not show the password.
    #[test]
    fn debug_hides_password() {
        let shown = format!("{:?}", url(FULL));
        assert!(!shown.contains("hello1234"), "{shown}");
        assert!(
            shown.contains("10.20.130.230:20880/context/path"),
            "{shown}"
        );
    }

    // URLTest.test_set_methods
    #[test]
    fn set_methods() {
        let check_params = |u: &Url| {
            assert_eq!(u.parameters().len(), 2);
            assert_eq!(u.version(), Some("1.0.0"));
            assert_eq!(u.parameter("application"), Some("morgan"));
        };
        let u = url(FULL).with_host("host");
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.username(), Some("admin"));
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.host(), "host");
        assert_eq!(u.address(), "host:20880");
        assert_eq!(u.path(), "context/path");
        check_params(&u);

        let u = u.with_port(1);
        assert_eq!(u.address(), "host:1");
        assert_eq!(u.port(), 1);
        check_params(&u);

        let u = u.with_path("path");
        assert_eq!(u.path(), "path");
        assert_eq!(u.address(), "host:1");
        check_params(&u);

        let u = u.with_protocol("protocol");
        assert_eq!(u.protocol(), "protocol");
        assert_eq!(u.path(), "path");
        check_params(&u);

        let password = u.password().map(str::to_owned);
        let u = u.with_credentials(Some("username"), password.as_deref());
        assert_eq!(u.username(), Some("username"));
        assert_eq!(u.password(), Some("hello1234"));
        check_params(&u);

        let u = u.with_credentials(Some("username"), Some("password"));
        assert_eq!(u.username(), Some("username"));
        assert_eq!(u.password(), Some("password"));
        assert_eq!(
            u.to_full_string(),
            "protocol://username:password@host:1/path?application=morgan&version=1.0.0"
        );
        check_params(&u);
    }

    // URLTest.test_removeParameters
    #[test]
    fn remove_parameters() {
        let full = format!("{FULL}&k1=v1&k2=v2");
        let u = url(&full).without_parameter("version");
        assert_eq!(u.address(), "10.20.130.230:20880");
        assert_eq!(u.parameters().len(), 3);
        assert_eq!(u.parameter("application"), Some("morgan"));
        assert_eq!(u.parameter("k1"), Some("v1"));
        assert_eq!(u.parameter("k2"), Some("v2"));
        assert_eq!(u.version(), None);

        let u = url(&full).without_parameters(["version", "application", "NotExistedKey"]);
        assert_eq!(u.parameters(), &params(&[("k1", "v1"), ("k2", "v2")]));
        assert_eq!(u.version(), None);
        assert_eq!(u.parameter("application"), None);
    }

    // URLTest.test_addParameter, test_addParameters, test_addParameterIfAbsent,
    // test_addParameter_sameKv (identity becomes equality).
    #[test]
    fn add_parameters() {
        let base =
            url("dubbo://admin:hello1234@10.20.130.230:20880/context/path?application=morgan");

        let u = base.clone().with_parameter("k1", "v1");
        assert_eq!(
            u.parameters(),
            &params(&[("application", "morgan"), ("k1", "v1")])
        );
        assert_eq!(u.address(), "10.20.130.230:20880");

        let u = base.clone().with_parameters([("k1", "v1"), ("k2", "v2")]);
        assert_eq!(u.parameters().len(), 3);
        assert_eq!(u.parameter("application"), Some("morgan"));

        let u = base
            .clone()
            .with_parameters([("k1", "v1"), ("k2", "v2"), ("application", "xxx")]);
        assert_eq!(
            u.parameters(),
            &params(&[("application", "xxx"), ("k1", "v1"), ("k2", "v2")])
        );

        let u = base
            .clone()
            .with_parameter_if_absent("k1", "v1")
            .with_parameter_if_absent("k2", "v2")
            .with_parameter_if_absent("application", "xxx");
        assert_eq!(
            u.parameters(),
            &params(&[("application", "morgan"), ("k1", "v1"), ("k2", "v2")])
        );

        let u = base.clone().with_parameter("application", "xxx");
        assert_eq!(u.parameters(), &params(&[("application", "xxx")]));

        let u = base.clone().with_parameter_if_absent("application", "xxx");
        assert_eq!(u.parameters(), &params(&[("application", "morgan")]));

        let same = url(&format!("{}&k1=v1", base.to_full_string()));
        assert_eq!(same.clone().with_parameter("k1", "v1"), same);
        assert_eq!(same.clone().with_parameters([("k1", "v1")]), same);
    }

    // URLTest.test_Anyhost
    #[test]
    fn anyhost() {
        let u = url("dubbo://0.0.0.0:20880");
        assert_eq!(u.host(), "0.0.0.0");
        assert!(u.is_anyhost());
        assert!(url("dubbo://10.0.0.1:20880?anyhost=true").is_anyhost());
        assert!(!url("dubbo://10.0.0.1:20880").is_anyhost());
    }

    // URLTest.test_Path: leading slashes are not part of the path.
    #[test]
    fn path_leading_slashes() {
        assert_eq!(
            Url::new("dubbo", "localhost", 20880, "////path").path(),
            "path"
        );
        assert_eq!(
            url("dubbo://localhost:20880").with_path("/path").path(),
            "path"
        );
    }

    // URLTest.testUserNamePasswordContainsAt: the last `@` ends the credentials.
    #[test]
    fn user_name_password_contains_at() {
        let u = url(
            "dubbo://ad@min:hello@1234@10.20.130.230:20880/context/path?version=1.0.0&application=morgan",
        );
        assert_eq!(u.username(), Some("ad@min"));
        assert_eq!(u.password(), Some("hello@1234"));
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.address(), "10.20.130.230:20880");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "context/path");
        assert_eq!(u.parameters().len(), 2);
        assert_eq!(u.version(), Some("1.0.0"));
    }

    // URLTest.testIPV6: a bracketed IPv6 host keeps its brackets; the port follows `]:`.
    #[test]
    fn ipv6_bracketed() {
        let u = url("dubbo://[2408:4004:194:8896:3e8a:82ae:814a:398]:20881?name=apache");
        assert_eq!(u.host(), "[2408:4004:194:8896:3e8a:82ae:814a:398]");
        assert_eq!(u.port(), 20881);
        assert_eq!(u.address(), "[2408:4004:194:8896:3e8a:82ae:814a:398]:20881");
        assert_eq!(u.parameter("name"), Some("apache"));
        assert_eq!(Url::parse(&u.to_full_string()).ok(), Some(u));

        let u = url("dubbo://[::1]/x");
        assert_eq!((u.host(), u.port()), ("[::1]", 0));
    }

    // URLTest.testIpV6AddressWithScopeId: a bare IPv6 address without a port.
    #[test]
    fn ipv6_with_scope_id() {
        let u = url(
            "dubbo://2001:0db8:85a3:08d3:1319:8a2e:0370:7344%5/context/path?version=1.0.0&application=morgan",
        );
        assert_eq!(u.host(), "2001:0db8:85a3:08d3:1319:8a2e:0370:7344%5");
        assert_eq!(u.address(), "2001:0db8:85a3:08d3:1319:8a2e:0370:7344%5");
        assert_eq!(u.port(), 0);
        assert_eq!(u.path(), "context/path");
        assert_eq!(u.parameters().len(), 2);
    }

    // URLTest.testIpV6Address: Dubbo reads the last `:group` of a bare (unbracketed) IPv6
    // address as the port. CONTRACT is silent on bare IPv6.
    #[test]

    fn ipv6_bare_with_port() {
        let u = url(
            "dubbo://ad@min111:haha@1234@2001:0db8:85a3:08d3:1319:8a2e:0370:7344:20880/context/path?version=1.0.0&application=morgan",
        );
        assert_eq!(u.username(), Some("ad@min111"));
        assert_eq!(u.password(), Some("haha@1234"));
        assert_eq!(u.host(), "2001:0db8:85a3:08d3:1319:8a2e:0370:7344");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "context/path");
    }

    // URLTest.test_ignore_pond: Dubbo drops a `#fragment` that comes before the `?`.
    #[test]

    fn ignore_pound_in_path() {
        let u = url(
            "dubbo://admin:hello1234@10.20.130.230:20880/context/path#index?version=1.0.0&id=org.apache.dubbo.config.RegistryConfig#0",
        );
        assert_eq!(u.path(), "context/path");
        assert_eq!(u.parameters().len(), 2);
        assert_eq!(
            u.parameter("id"),
            Some("org.apache.dubbo.config.RegistryConfig#0")
        );
    }

    // URLTest.testParameterContainPound: a `#` inside a value is part of the value.
    #[test]
    fn parameter_contains_pound() {
        let u = url(
            "dubbo://ad@min:hello@1234@10.20.130.230:20880/context/path?version=1.0.0&application=morgan&pound=abcd#efg&protocol=registry",
        );
        assert_eq!(u.parameter("pound"), Some("abcd#efg"));
        assert_eq!(u.parameter("protocol"), Some("registry"));
    }

    // URLTest.testGetAuthority: `:password@host` (no user name) and `user:@host`.
    #[test]
    fn authority_with_partial_credentials() {
        let u = url("dubbo://admin1:@10.20.130.230:20880/context/path?version=1.0.0");
        assert_eq!(u.username(), Some("admin1"));
        assert_eq!(u.password(), None);
        assert_eq!(
            u.to_full_string(),
            "dubbo://admin1@10.20.130.230:20880/context/path?version=1.0.0"
        );

        let u = url("dubbo://:hello1234@10.20.130.230:20880/context/path");
        assert_eq!(u.username(), None);
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.address(), "10.20.130.230:20880");
    }

    // CONTRACT §1: to_full_string writes the credentials, and the URL must round-trip through
    // it (node names and registry keys are built from it). Dubbo's own `toFullString` also
    // drops a password that has no user name, so this is stricter than Dubbo.
    #[test]

    fn password_without_user_round_trips() {
        let u = url("dubbo://:hello1234@10.20.130.230:20880/context/path");
        assert_eq!(Url::parse(&u.to_full_string()).ok(), Some(u));
    }

    // URLTest.testDefault: `default.X` answers `X` when `X` is absent, never the other way.
    #[test]
    fn default_prefix() {
        let u1 = url("dubbo://127.0.0.1:12345?timeout=1234&default.timeout=5678");
        assert_eq!(u1.parameter_num::<i64>("timeout", 0).ok(), Some(1234));
        assert_eq!(
            u1.parameter_num::<i64>("default.timeout", 0).ok(),
            Some(5678)
        );

        let u2 = url("dubbo://127.0.0.1:12345?default.timeout=5678");
        assert_eq!(u2.parameter("timeout"), Some("5678"));
        assert_eq!(u2.parameter_num::<i64>("timeout", 0).ok(), Some(5678));
        assert_eq!(u2.parameter("default.timeout"), Some("5678"));
        assert_eq!(u2.parameter_or("timeout", "1"), "5678");
        assert_eq!(u2.parameter("default.default.timeout"), None);

        // default.version, the case the registry relies on.
        let u3 = url("dubbo://127.0.0.1:20880/a.B?default.version=1.0.0&default.group=g");
        assert_eq!(u3.version(), Some("1.0.0"));
        assert_eq!(u3.group(), Some("g"));
        assert_eq!(u3.service_key(), "g/a.B:1.0.0");
        let u4 = url("dubbo://127.0.0.1:20880/a.B?version=2.0.0&default.version=1.0.0");
        assert_eq!(u4.version(), Some("2.0.0"));
    }

    // URLTest.testGetParameter
    #[test]
    fn get_parameter_typed() {
        let u = url("http://127.0.0.1:8080/path?i=1&b=false");
        assert_eq!(u.parameter_num::<i32>("i", 0).ok(), Some(1));
        assert!(!u.parameter_bool("b", true));
        assert!(u.parameter_bool("absent", true));
        assert!(u.parameter_num::<i32>("b", 0).is_err());
    }

    // URLTest.testGetServiceKey
    #[test]
    fn get_service_key() {
        let u1 = url(
            "dubbo://10.20.130.230:20880/context/path?interface=org.apache.dubbo.test.interfaceName",
        );
        assert_eq!(u1.service_key(), "org.apache.dubbo.test.interfaceName");

        let u2 = url(
            "dubbo://10.20.130.230:20880/org.apache.dubbo.test.interfaceName?interface=org.apache.dubbo.test.interfaceName",
        );
        assert_eq!(u2.service_key(), "org.apache.dubbo.test.interfaceName");

        let u3 = url(
            "dubbo://10.20.130.230:20880/org.apache.dubbo.test.interfaceName?interface=org.apache.dubbo.test.interfaceName&group=group1&version=1.0.0",
        );
        assert_eq!(
            u3.service_key(),
            "group1/org.apache.dubbo.test.interfaceName:1.0.0"
        );

        // Not in Dubbo's test: without `interface` the path is the interface.
        let u4 = url("dubbo://10.20.130.230:20880/a.B?version=1.0.0");
        assert_eq!(u4.service_interface(), "a.B");
        assert_eq!(u4.service_key(), "a.B:1.0.0");
        assert_eq!(url("dubbo://h/a.B?group=g").service_key(), "g/a.B");
    }

    // URLTest.testEquals
    #[test]
    fn equals() {
        let base = "dubbo://10.20.130.230:20880/context/path?interface=org.apache.dubbo.test.interfaceName";
        let u1 = url(&format!("{base}&group=group&version=1.0.0"));
        let u2 = url(&format!("{base}&group=group&version=1.0.0"));
        assert_eq!(u1, u2);

        let u3 = url(&format!(
            "{}&group=group&version=1.0.0",
            base.replace("20880", "20881")
        ));
        assert_ne!(u1, u3);

        let u4 = url(&format!("{base}&weight=10&group=group&version=1.0.0"));
        assert_ne!(u1, u4);
        let u5 = url(&format!("{base}&weight=10&group=group&version=1.0.0"));
        assert_eq!(u4, u5);

        let [u6, u7, u8, u9] = generic_consumers();
        assert_eq!(u6, u7, "only the timestamp differs");
        assert_ne!(u7, u8);
        assert_ne!(u8, u9);
    }

    /// The four URLs of URLTest.testEquals / testHashcode: 6 and 7 differ only in
    /// `timestamp`, 8 drops `generic`, 9 also changes `check`.
    fn generic_consumers() -> [Url; 4] {
        let head = "consumer://30.225.20.150/org.apache.dubbo.rpc.service.GenericService?application=\
                    dubbo-demo-api-consumer&category=consumers";
        let tail = "dubbo=2.0.2&{generic}interface=org.apache.dubbo.demo.DemoService&pid=7375\
                    &side=consumer&sticky=false&timestamp=";
        let make = |check: &str, generic: bool, ts: &str| {
            let tail = tail.replace("{generic}", if generic { "generic=true&" } else { "" });
            url(&format!("{head}&check={check}&{tail}{ts}"))
        };
        [
            make("false", true, "1599556506417"),
            make("false", true, "2299556506417"),
            make("false", false, "2299556506417"),
            make("true", false, "2299556506417"),
        ]
    }

    // URLTest.testHashcode: equal URLs (timestamp aside) hash alike; they also collapse in a
    // set, which is what the registry's set semantics rely on.
    #[test]
    fn hashcode_ignores_timestamp() {
        let [u1, u2, u3, u4] = generic_consumers();
        assert_ne!(u1.parameter("timestamp"), u2.parameter("timestamp"));
        assert_eq!(hash_of(&u1), hash_of(&u2));
        assert_ne!(hash_of(&u2), hash_of(&u3));
        assert_ne!(hash_of(&u3), hash_of(&u4));

        let set: HashSet<Url> = [u1, u2, u3, u4].into_iter().collect();
        assert_eq!(set.len(), 3);

        // The timestamp is still kept and written; only equality ignores it.
        let t = url("dubbo://h:1/p?a=1&timestamp=5");
        assert_eq!(t.to_full_string(), "dubbo://h:1/p?a=1&timestamp=5");
        assert_eq!(t, url("dubbo://h:1/p?a=1"));
        assert_eq!(hash_of(&t), hash_of(&url("dubbo://h:1/p?a=1")));
    }

    // URLTest.testEqualsWithPassword, testEqualsWithPath, testEqualsWithPort,
    // testEqualsWithProtocol, testEqualsWithUser: every part takes part in equality.
    #[test]
    fn equals_with_each_part() {
        let make = |proto: &str, user: &str, pass: &str, port: u16, path: &str| {
            url(&format!(
                "{proto}://{user}:{pass}@10.20.130.230:{port}/{path}?version=1.0.0&application=morgan"
            ))
        };
        let base = make("dubbo", "ad@min", "hello@1234", 20880, "context/path");
        assert_eq!(
            base,
            make("dubbo", "ad@min", "hello@1234", 20880, "context/path")
        );
        assert_ne!(
            base,
            make("dubbo", "ad@min", "hello@4321", 20880, "context/path")
        );
        assert_ne!(
            base,
            make("dubbo", "ad@min", "hello@1234", 20880, "context/path2")
        );
        assert_ne!(
            base,
            make("dubbo", "ad@min", "hello@1234", 20881, "context/path")
        );
        assert_ne!(
            base,
            make("file", "ad@min", "hello@1234", 20880, "context/path")
        );
        assert_ne!(
            base,
            make("dubbo", "ad@min2", "hello@1234", 20880, "context/path")
        );
        assert_ne!(base, base.clone().with_host("10.20.130.231"));
        assert_ne!(base, base.clone().with_parameter("application", "other"));
    }

    // Backup addresses (Dubbo's `backup` parameter, CONTRACT §1 "Several addresses").
    #[test]
    fn backup_addresses() {
        let u = url("zookeeper://127.0.0.1:2181?backup=127.0.0.1:2182,127.0.0.1:2183");
        assert_eq!(u.address(), "127.0.0.1:2181");
        assert_eq!(
            u.addresses(),
            vec!["127.0.0.1:2181", "127.0.0.1:2182", "127.0.0.1:2183"]
        );
        assert_eq!(
            url("zookeeper://127.0.0.1:2181").addresses(),
            vec!["127.0.0.1:2181"]
        );
    }

    // CONTRACT §1: the multi-host authority `zookeeper://h1:2181,h2:2181` is accepted and
    // becomes Dubbo's form (first host + `backup`).
    #[test]
    fn multi_host_authority() {
        let u = url("zookeeper://h1:2181,h2:2181");
        assert_eq!(u.host(), "h1");
        assert_eq!(u.port(), 2181);
        assert_eq!(u.parameter("backup"), Some("h2:2181"));
        assert_eq!(u.addresses(), vec!["h1:2181", "h2:2181"]);
        assert_eq!(u.to_full_string(), "zookeeper://h1:2181?backup=h2:2181");
        assert_eq!(u, url("zookeeper://h1:2181?backup=h2:2181"));

        let u = url(
            "zookeeper://user:pw@h1:2181,h2:2182,h3:2183/org.apache.dubbo.registry.RegistryService?timeout=3000",
        );
        assert_eq!(u.username(), Some("user"));
        assert_eq!(u.password(), Some("pw"));
        assert_eq!(u.address(), "h1:2181");
        assert_eq!(u.path(), "org.apache.dubbo.registry.RegistryService");
        assert_eq!(u.parameter("timeout"), Some("3000"));
        assert_eq!(u.addresses(), vec!["h1:2181", "h2:2182", "h3:2183"]);
        assert_eq!(Url::parse(&u.to_full_string()).ok(), Some(u));

        let u = url("zookeeper://[::1]:2181,[::2]:2182");
        assert_eq!(u.addresses(), vec!["[::1]:2181", "[::2]:2182"]);
    }

    // CONTRACT §7 / §1: node names are `encode(to_full_string())`, byte-identical to Java's
    // URLEncoder, and decode back to the same URL.
    #[test]
    fn encoded_node_name_round_trips() {
        let u = url(
            "dubbo://10.0.0.1:20880/org.apache.dubbo.demo.DemoService?anyhost=true&methods=a,b",
        );
        let node = encode(&u.to_full_string());
        assert_eq!(
            node,
            "dubbo%3A%2F%2F10.0.0.1%3A20880%2Forg.apache.dubbo.demo.DemoService\
             %3Fanyhost%3Dtrue%26methods%3Da%2Cb"
        );
        assert_eq!(
            decode(&node).ok().as_deref(),
            Some(u.to_full_string().as_str())
        );
        assert_eq!(Url::from_encoded(&node).ok(), Some(u));
        assert_eq!(encode("a b*~"), "a+b*%7E");
    }

    // The empty marker a registry notifies (CONTRACT §4.4): the subscription with protocol
    // `empty` and `category=<c>`.
    #[test]
    fn empty_marker() {
        let sub = url("consumer://10.0.0.9/a.B?category=providers,routers&version=1");
        let m = sub.to_empty_marker("routers");
        assert!(m.is_empty_marker());
        assert!(!sub.is_empty_marker());
        assert_eq!(m.protocol(), "empty");
        assert_eq!(m.category(), "routers");
        assert_eq!(m.version(), Some("1"));
        assert_eq!(m.address(), sub.address());
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------
mod properties {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;

    /// A character class of none of the delimiters `&=?#/@:,` and no whitespace.
    macro_rules! safe {
        ($n:literal) => {
            concat!("[A-Za-z0-9._*~!$'()+;%-]", $n)
        };
    }

    fn protocol() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9+.-]{0,7}"
    }
    fn credentials() -> impl Strategy<Value = Option<(String, Option<String>)>> {
        option::of((safe!("{1,8}"), option::of(safe!("{1,8}"))))
    }
    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9][a-z0-9.-]{0,15}",
            "(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
            "\\[[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,7}\\]",
        ]
    }
    fn path() -> impl Strategy<Value = String> {
        vec(safe!("{1,10}"), 0..4).prop_map(|segs| segs.join("/"))
    }
    fn parameters() -> impl Strategy<Value = BTreeMap<String, String>> {
        btree_map(safe!("{1,10}"), safe!("{0,10}"), 0..8)
    }

    fn build(
        protocol: String,
        creds: Option<(String, Option<String>)>,
        host: String,
        port: u16,
        path: String,
        params: BTreeMap<String, String>,
    ) -> Url {
        let (user, pass) = match &creds {
            Some((u, p)) => (Some(u.as_str()), p.as_deref()),
            None => (None, None),
        };
        Url::new(protocol, host, port, path)
            .with_credentials(user, pass)
            .with_parameters(params)
    }

    proptest! {
        // CONTRACT §1: to_full_string writes every part, and parsing it gives the URL back.
        #[test]
        fn parse_inverts_to_full_string(
            protocol in protocol(),
            creds in credentials(),
            host in host(),
            port in any::<u16>(),
            path in path(),
            params in parameters(),
        ) {
            let u = build(protocol, creds, host, port, path, params);
            let s = u.to_full_string();
            let back = match Url::parse(&s) {
                Ok(back) => back,
                Err(e) => return Err(TestCaseError::fail(format!("{s:?} does not parse: {e}"))),
            };
            prop_assert_eq!(back.to_full_string(), s.clone());
            prop_assert_eq!(back.parameters(), u.parameters());
            prop_assert_eq!(hash_of(&back), hash_of(&u));
            prop_assert_eq!(back, u);
        }

        // The same through the node-name form: decode(encode(full string)).
        #[test]
        fn from_encoded_inverts_encode(
            protocol in protocol(),
            creds in credentials(),
            host in host(),
            port in any::<u16>(),
            path in path(),
            params in parameters(),
        ) {
            let u = build(protocol, creds, host, port, path, params);
            let node = encode(&u.to_full_string());
            prop_assert_eq!(Url::from_encoded(&node).ok(), Some(u));
        }

        // CONTRACT §1: decode is the inverse of encode, for any text.
        #[test]
        fn decode_inverts_encode(s in any::<String>()) {
            prop_assert_eq!(decode(&encode(&s)).ok(), Some(s));
        }

        // Parsing never panics (CONTRACT §1), whatever the input.
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Url::parse(&s);
        }
    }
}
