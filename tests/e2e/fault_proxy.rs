//! A fault-injecting HTTP proxy between walstream and fake-gcs-server. Each request is read
//! whole, then either forwarded (on a fresh upstream connection, `Connection: close`, so every
//! response ends at EOF and is relayed byte for byte) or answered with a fault. Which requests
//! fail is decided by a seeded RNG, so a failing run replays with the seed it printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy may do to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answer with this status and a JSON error, without forwarding.
    Status(u16),
    /// Forward nothing; close the connection after reading half the request body (an upload
    /// cut mid-way), with a TCP reset.
    ResetRequest,
    /// Forward, then relay only half the response before a reset (a download cut mid-way).
    ResetResponse,
    /// Read the request, forward nothing, answer nothing for this long, then close: a hung
    /// server, which only the client's request timeout ends.
    Stall(Duration),
    /// Hold the request this long, then forward it: a slow network path, during which the
    /// store may change under the client.
    Delay(Duration),
}

pub const ALL_FAULTS: [Fault; 6] = [
    Fault::Status(500),
    Fault::Status(503),
    Fault::Status(429),
    Fault::Status(408),
    Fault::ResetRequest,
    Fault::ResetResponse,
];

struct Plan {
    rng: StdRng,
    /// Chance that a request gets a fault, and which faults to draw from.
    fault_rate: f64,
    faults: Vec<Fault>,
    /// Until then, every connection is accepted and never answered.
    black_hole_until: Option<Instant>,
    /// Faults for chosen requests, ahead of the random ones.
    targeted: Vec<Targeted>,
}

/// A fault for the next `remaining` requests of one operation whose head contains `contains`.
struct Targeted {
    operation: &'static str,
    contains: String,
    fault: Fault,
    remaining: u32,
}

/// A running proxy. Dropping it leaves the listener thread running until the test process
/// ends, which is harmless.
pub struct FaultProxy {
    pub addr: String,
    plan: Arc<Mutex<Plan>>,
    injected: Arc<Mutex<std::collections::HashMap<(Fault, &'static str), u64>>>,
    held: Arc<AtomicU64>,
    large_puts: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    pub fn start(upstream: &str, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let plan = Arc::new(Mutex::new(Plan {
            rng: StdRng::seed_from_u64(seed),
            fault_rate: 0.0,
            faults: Vec::new(),
            black_hole_until: None,
            targeted: Vec::new(),
        }));
        let proxy = FaultProxy {
            addr: addr.clone(),
            plan,
            injected: Default::default(),
            held: Default::default(),
            large_puts: Default::default(),
            log: Default::default(),
        };
        let (plan, injected, upstream) = (proxy.plan.clone(), proxy.injected.clone(), upstream.to_string());
        let counters = Counters {
            held: proxy.held.clone(),
            large_puts: proxy.large_puts.clone(),
            log: proxy.log.clone(),
            started: Instant::now(),
        };
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (plan, injected, counters, upstream, addr) =
                    (plan.clone(), injected.clone(), counters.clone(), upstream.clone(), addr.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, &addr, &plan, &injected, &counters);
                });
            }
        });
        proxy
    }

    /// From now on, each request fails with probability `rate`, with one of `faults`.
    pub fn inject(&self, rate: f64, faults: &[Fault]) {
        let mut plan = self.plan.lock().unwrap();
        plan.fault_rate = rate;
        plan.faults = faults.to_vec();
    }

    /// The next `count` requests of `operation` (`GET`, `LIST`, `PUT`, `DELETE`) whose request
    /// line or headers contain `contains` get `fault`, whatever the random plan says.
    pub fn target(&self, operation: &'static str, contains: &str, fault: Fault, count: u32) {
        self.plan.lock().unwrap().targeted.push(Targeted {
            operation,
            contains: contains.to_string(),
            fault,
            remaining: count,
        });
    }

    /// Every connection in the next `duration` is accepted and left unanswered, as a network
    /// partition looks to a client.
    pub fn black_hole(&self, duration: Duration) {
        self.plan.lock().unwrap().black_hole_until = Some(Instant::now() + duration);
    }

    /// Faults injected, by fault and by the operation of the request that got it.
    pub fn injected(&self) -> std::collections::HashMap<(Fault, &'static str), u64> {
        self.injected.lock().unwrap().clone()
    }

    /// Waits until the proxy has forwarded nothing for `quiet`; returns the count.
    pub fn settled(&self, quiet: std::time::Duration) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let before = self.forwarded();
            std::thread::sleep(quiet);
            let after = self.forwarded();
            if after == before {
                return after;
            }
            assert!(std::time::Instant::now() < deadline, "requests did not pause for {quiet:?} within 30 s");
        }
    }

    pub fn forwarded(&self) -> u64 {
        self.log.lock().unwrap().len() as u64
    }

    /// Connections swallowed by a black hole.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Uploads of more than 1 MiB forwarded (chunks of a resumable snapshot upload).
    pub fn large_puts(&self) -> u64 {
        self.large_puts.load(Ordering::Relaxed)
    }

    /// Every forwarded request from the `from`th on, as `milliseconds-since-start request-line`,
    /// so a test that counts requests can say which ones it got. The stamp is when the request
    /// arrived; the order is the order the responses came back in, which may differ.
    pub fn log_from(&self, from: u64) -> Vec<String> {
        self.log.lock().unwrap().iter().skip(from as usize).cloned().collect()
    }
}

#[derive(Clone)]
struct Counters {
    held: Arc<AtomicU64>,
    large_puts: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

/// The GCS JSON API operation a request head is: `GET`, `LIST`, `PUT` or `DELETE`.
fn operation(head: &str) -> &'static str {
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match method {
        "DELETE" => "DELETE",
        "POST" | "PUT" => "PUT",
        _ if path.ends_with("/o") => "LIST",
        _ => "GET",
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    own_addr: &str,
    plan: &Mutex<Plan>,
    injected: &Mutex<std::collections::HashMap<(Fault, &'static str), u64>>,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    loop {
        let hole = plan.lock().unwrap().black_hole_until.filter(|until| *until > Instant::now());
        if let Some(until) = hole {
            counters.held.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            return Ok(());
        }
        // The request head, then its body by Content-Length.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let head_text = String::from_utf8_lossy(&head).into_owned();
        let length: usize = head_text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let fault = {
            let mut plan = plan.lock().unwrap();
            let Plan { rng, fault_rate, faults, targeted, .. } = &mut *plan;
            let chosen = targeted
                .iter_mut()
                .find(|t| t.remaining > 0 && t.operation == operation(&head_text) && head_text.contains(&t.contains));
            match chosen {
                Some(target) => {
                    target.remaining -= 1;
                    Some(target.fault)
                }
                None => {
                    (!faults.is_empty() && rng.gen_bool(*fault_rate)).then(|| faults[rng.gen_range(0..faults.len())])
                }
            }
        };
        if let Some(fault) = fault {
            *injected.lock().unwrap().entry((fault, operation(&head_text))).or_default() += 1;
        }
        if fault == Some(Fault::ResetRequest) {
            let mut half = vec![0u8; length / 2];
            let _ = reader.read_exact(&mut half);
            return reset(&client);
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        // Stamped on arrival, not once the emulator has answered: a test that checks pacing
        // wants when the client sent, and a loaded emulator's latency would blur that.
        let arrived_ms = counters.started.elapsed().as_millis();
        if let Some(Fault::Stall(duration)) = fault {
            std::thread::sleep(duration);
            return Ok(());
        }
        if let Some(Fault::Delay(duration)) = fault {
            std::thread::sleep(duration);
        }
        if let Some(Fault::Status(code)) = fault {
            let json = format!("{{\"error\":{{\"code\":{code},\"message\":\"injected by the test proxy\"}}}}");
            write!(
                &client,
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                json.len()
            )?;
            continue;
        }
        // Forward on a fresh connection that closes after the response.
        let mut request = String::new();
        for line in head_text.split("\r\n").filter(|l| !l.is_empty()) {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
                continue;
            }
            request.push_str(line);
            request.push_str("\r\n");
        }
        request.push_str("Connection: close\r\n\r\n");
        let mut up = TcpStream::connect(upstream)?;
        up.write_all(request.as_bytes())?;
        up.write_all(&body)?;
        let mut response = Vec::new();
        up.read_to_end(&mut response)?;
        // The log is the count: `forwarded()` is its length.
        let line: String = head_text.lines().next().unwrap_or_default().chars().take(200).collect();
        counters.log.lock().unwrap().push(format!("{arrived_ms} {line}"));
        if operation(&head_text) == "PUT" && length > 1 << 20 {
            counters.large_puts.fetch_add(1, Ordering::Relaxed);
        }
        // A resumable upload's session URL must come back through the proxy too.
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |i| i + 4);
        let head = String::from_utf8_lossy(&response[..split]).replace(upstream, own_addr);
        let mut out = head.into_bytes();
        out.extend_from_slice(&response[split..]);
        if fault == Some(Fault::ResetResponse) {
            (&client).write_all(&out[..out.len() / 2])?;
            return reset(&client);
        }
        (&client).write_all(&out)?;
        // The upstream answered `Connection: close`, so the client will not send another.
        let _ = client.shutdown(Shutdown::Write);
        return Ok(());
    }
}

/// Closes with RST rather than FIN: what a crashed peer or a middlebox cutting in looks like.
fn reset(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a descriptor this function borrows, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    stream.shutdown(Shutdown::Both)
}
