//! A throwaway `redis-server` for tests of the Redis-backed features: started on a free
//! loopback port with persistence off, killed when dropped. It never touches a server it did
//! not start.
//!
//! When the binary is missing, [`RedisServer::start`] returns `None` after printing why, so
//! the test can skip; with `CI=true` in the environment it panics instead, so a CI job that
//! forgot to install Redis fails loudly rather than skipping silently.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on `127.0.0.1:{port}`.
#[derive(Debug)]
pub struct RedisServer {
    binary: String,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` (the `REDIS_SERVER` environment variable, else `redis-server`
    /// on the `PATH`) on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When the binary is missing and `CI=true`, or when the server does not come up
    /// within 10 seconds.
    pub fn start() -> Option<Self> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let available = Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "CI=true but `{binary}` cannot be run: install redis-server for the Redis tests"
            );
            eprintln!("skipping: `{binary}` cannot be run (install redis-server to run this test)");
            return None;
        }
        let port = free_port();
        let mut server = Self {
            binary,
            port,
            child: None,
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (its data is gone: persistence is off) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`stop`](Self::stop)), and waits
    /// until it accepts connections. Does nothing while it runs.
    ///
    /// # Panics
    ///
    /// When the server cannot be spawned or does not come up within 10 seconds.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        let port = self.port.to_string();
        let child = Command::new(&self.binary)
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.binary));
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_or_else(|e| panic!("no free loopback port: {e}"), |a| a.port())
}
