//! A loopback UDP proxy that misbehaves on purpose, for network fault tests
//! (this machine has no netem). It sits between an agent and the receiver on
//! 127.0.0.1 and, per datagram and direction, drops, delays (with jitter),
//! duplicates or reorders it, or cuts the link altogether, as told through
//! [`UdpProxy::set`] while traffic flows.
//!
//! Each client address (an agent's QUIC endpoint) gets its own upstream
//! socket, so the receiver sees one peer per client as it would without the
//! proxy. Every thread polls with a short timeout and ends when the proxy is
//! dropped.

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy does to each datagram (both directions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Probability of dropping a datagram.
    pub drop: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Probability of holding a datagram back 5–30 ms so later ones overtake it.
    pub reorder: f64,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more delay, uniformly at random.
    pub jitter: Duration,
    /// Drop everything (the link is cut).
    pub cut: bool,
}

/// Datagram counts since the proxy started.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Datagrams received from either side.
    pub seen: AtomicU64,
    /// Dropped (by `drop` or `cut`).
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Held back to be overtaken.
    pub reordered: AtomicU64,
}

struct Pending {
    due: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // The earliest due first out of the (max-)heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

struct Shared {
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    queue: Mutex<(BinaryHeap<Pending>, u64)>,
    wake: Condvar,
    stop: AtomicBool,
    stats: ProxyStats,
}

impl Shared {
    /// Applies the faults to one datagram and queues what survives.
    fn forward(&self, socket: &Arc<UdpSocket>, to: SocketAddr, data: &[u8]) {
        self.stats.seen.fetch_add(1, Ordering::Relaxed);
        let f = self.faults.lock().expect("faults").clone();
        let mut rng = self.rng.lock().expect("rng");
        if f.cut || rng.random_bool(f.drop.clamp(0.0, 1.0)) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if rng.random_bool(f.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let mut delay = f.delay;
        if !f.jitter.is_zero() {
            delay += f.jitter.mul_f64(rng.random::<f64>());
        }
        if rng.random_bool(f.reorder.clamp(0.0, 1.0)) {
            self.stats.reordered.fetch_add(1, Ordering::Relaxed);
            delay += Duration::from_millis(rng.random_range(5..30));
        }
        drop(rng);
        let now = Instant::now();
        let mut q = self.queue.lock().expect("queue");
        for _ in 0..copies {
            q.1 += 1;
            let seq = q.1;
            q.0.push(Pending {
                due: now + delay,
                seq,
                socket: socket.clone(),
                to,
                data: data.to_vec(),
            });
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Sends queued datagrams when due, until stopped.
    fn run_sender(&self) {
        let mut q = self.queue.lock().expect("queue");
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match q.0.peek() {
                Some(p) if p.due <= now => {
                    let p = q.0.pop().expect("peeked");
                    drop(q);
                    let _ = p.socket.send_to(&p.data, p.to);
                    q = self.queue.lock().expect("queue");
                }
                Some(p) => {
                    let wait = (p.due - now).min(Duration::from_millis(50));
                    q = self.wake.wait_timeout(q, wait).expect("queue").0;
                }
                None => {
                    q = self
                        .wake
                        .wait_timeout(q, Duration::from_millis(50))
                        .expect("queue")
                        .0;
                }
            }
        }
    }
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    /// Where clients send (give this address to the agent).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    clients: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

const POLL: Duration = Duration::from_millis(50);

impl UdpProxy {
    /// Proxies datagrams from a new 127.0.0.1 port to `upstream`, with no
    /// faults until [`UdpProxy::set`]; `seed` makes the faults repeatable.
    pub fn start(upstream: SocketAddr, seed: u64) -> UdpProxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind the proxy"));
        front.set_read_timeout(Some(POLL)).expect("timeout");
        let addr = front.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: ProxyStats::default(),
        });
        let clients: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.run_sender())
        };
        let front_loop = {
            let shared = shared.clone();
            let clients = clients.clone();
            let front = front.clone();
            std::thread::spawn(move || {
                let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut buf = vec![0u8; 65536];
                while !shared.stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let back = upstreams.entry(client).or_insert_with(|| {
                        let back =
                            Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind upstream side"));
                        back.set_read_timeout(Some(POLL)).expect("timeout");
                        let (shared, back2, front) = (shared.clone(), back.clone(), front.clone());
                        let handle = std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while !shared.stop.load(Ordering::Relaxed) {
                                if let Ok((n, _)) = back2.recv_from(&mut buf) {
                                    shared.forward(&front, client, &buf[..n]);
                                }
                            }
                        });
                        clients.lock().expect("clients").push(handle);
                        back
                    });
                    let back = back.clone();
                    shared.forward(&back, upstream, &buf[..n]);
                }
            })
        };
        UdpProxy {
            addr,
            shared,
            threads: vec![sender, front_loop],
            clients,
        }
    }

    /// Replaces the faults (takes effect for the next datagram).
    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock().expect("faults") = faults;
    }

    /// Cuts the link (`true`) or restores it, keeping the other faults.
    pub fn cut(&self, on: bool) {
        self.shared.faults.lock().expect("faults").cut = on;
    }

    /// The counters so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let clients = std::mem::take(&mut *self.clients.lock().expect("clients"));
        for t in clients {
            let _ = t.join();
        }
    }
}
