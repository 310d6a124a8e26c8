//! The launcher starts, stops and restarts both servers on the same port.

use registry_test_servers::{Server, required};

fn check(mut s: Server) {
    let addr = s.address();
    assert!(s.is_running());
    s.stop();
    assert!(!s.is_running());
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still answers after stop"
    );
    s.start().unwrap();
    assert!(s.is_running());
    assert_eq!(s.address(), addr);
}

#[test]
fn zookeeper_starts_stops_and_restarts() {
    match Server::zookeeper() {
        Ok(s) => check(s),
        Err(e) if !required() => eprintln!("skipped: {e}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn etcd_starts_stops_and_restarts() {
    match Server::etcd() {
        Ok(s) => check(s),
        Err(e) if !required() => eprintln!("skipped: {e}"),
        Err(e) => panic!("{e}"),
    }
}
