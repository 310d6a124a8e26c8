//! The node layout (CONTRACT §7), byte-identical to Dubbo Java and Go:
//!
//! ```text
//! root          = "/" + group                      (default /dubbo)
//! service path  = root + "/" + encode(interface)
//! category path = service path + "/" + category
//! entry path    = category path + "/" + encode(url.to_full_string())
//! ```

use registry_core::{Url, encode};

use crate::options::Config;

impl Config {
    /// `root/` (or `/` when the root is `/`), as Dubbo's `toRootDir`.
    fn root_dir(&self) -> String {
        if self.root == "/" {
            "/".to_owned()
        } else {
            format!("{}/", self.root)
        }
    }

    /// `root/encode(interface)`.
    pub fn service_path(&self, interface: &str) -> String {
        format!("{}{}", self.root_dir(), encode(interface))
    }

    /// `service path/category`.
    pub fn category_path(&self, interface: &str, category: &str) -> String {
        format!("{}/{}", self.service_path(interface), category)
    }

    /// `category path/encode(url.to_full_string())`.
    pub fn entry_path(&self, url: &Url) -> String {
        format!(
            "{}/{}",
            self.category_path(url.service_interface(), url.category()),
            encode(&url.to_full_string())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Config {
        Config::from_url(&s.parse().expect("url")).expect("config")
    }

    #[test]
    fn layout_matches_dubbo() {
        let c = cfg("zookeeper://127.0.0.1:2181");
        assert_eq!(c.root, "/dubbo");
        let u: Url = "dubbo://10.0.0.1:20880/org.apache.dubbo.demo.DemoService?anyhost=true&interface=org.apache.dubbo.demo.DemoService&methods=sayHello,sayHelloAsync&release="
            .parse()
            .expect("url");
        assert_eq!(
            c.entry_path(&u),
            "/dubbo/org.apache.dubbo.demo.DemoService/providers/dubbo%3A%2F%2F10.0.0.1%3A20880%2Forg.apache.dubbo.demo.DemoService%3Fanyhost%3Dtrue%26interface%3Dorg.apache.dubbo.demo.DemoService%26methods%3DsayHello%2CsayHelloAsync%26release%3D"
        );
        assert_eq!(cfg("zookeeper://h:1?group=g").root, "/g");
        assert_eq!(cfg("zookeeper://h:1?group=/g/").root, "/g");
        assert_eq!(cfg("zookeeper://h:1?group=/").service_path("a.B"), "/a.B");
        // Found by the `zookeeper_options` fuzz target: `//` gave the root "" (no path).
        assert_eq!(cfg("zookeeper://h:1?group=//").root, "/");
        assert_eq!(cfg("zookeeper://h:1?group=///").service_path("a.B"), "/a.B");
    }
}
