//! Proxy workers: threads that each run a single-threaded tokio runtime.
//!
//! The pods' accept loops are spread over the workers. An accepted
//! connection is handed to the least busy worker (fewest live connections
//! and HBONE streams), the accepting worker itself when it is among them
//! (then the socket stays on its thread), and lives there until it closes,
//! together with every task it spawns (HBONE streams, HTTP/2 connection
//! drivers) and the pooled HBONE connections it uses ([`current`] is part
//! of the pool key). A connection's tasks then wake each other on one
//! thread instead of migrating between the threads of a work-stealing
//! runtime, while many connections still spread over all workers. Counting
//! what runs rather than taking turns matters for HBONE: a source node
//! sends a pod all its streams over a few long-lived pooled connections,
//! and in turn two busy ones could land on one worker and leave another
//! idle. The control plane (configuration, certificates, admin) stays on
//! the main runtime.

use std::{
    cell::Cell,
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle, task::JoinHandle};

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker the calling thread is (0 outside workers).
pub fn current() -> usize {
    WORKER.get().unwrap_or(0)
}

pub struct Workers {
    handles: Vec<Handle>,
    /// Turns for accept loops.
    next: AtomicUsize,
    /// Live connections and HBONE streams on each worker.
    load: Arc<[AtomicUsize]>,
}

/// One connection or stream counted on its worker while it lives.
pub struct Counted {
    load: Arc<[AtomicUsize]>,
    index: usize,
}

impl Counted {
    fn new(load: &Arc<[AtomicUsize]>, index: usize) -> Self {
        load[index].fetch_add(1, Ordering::Relaxed);
        Self { load: load.clone(), index }
    }

    /// `task`, counted until it ends or is dropped.
    pub async fn around<F: Future>(self, task: F) -> F::Output {
        let _counted = self;
        task.await
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.load[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `count` worker threads (at least one). They run until the
    /// process exits.
    pub fn start(count: usize) -> io::Result<Self> {
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new().name(format!("ambit-proxy-{index}")).spawn(move || {
                WORKER.set(Some(index));
                runtime.block_on(std::future::pending::<()>());
            })?;
        }
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(Self { handles, next: AtomicUsize::new(0), load })
    }

    /// Connections and HBONE streams running on the workers now.
    pub fn in_flight(&self) -> usize {
        self.load.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task` (an accept loop) on the next worker in turn.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(task)
    }

    /// The least busy worker, looking from the calling worker onwards so
    /// that it wins a tie, with one more connection counted there.
    fn least_busy(&self) -> Counted {
        let count = self.handles.len();
        let here = current() % count;
        let load = |index: usize| self.load[index].load(Ordering::Relaxed);
        let index = (0..count)
            .map(|offset| (here + offset) % count)
            .min_by_key(|&index| load(index))
            .expect("at least one worker");
        Counted::new(&self.load, index)
    }

    /// Counts an HBONE stream on the calling worker while the result lives.
    pub fn count_stream(&self) -> Counted {
        Counted::new(&self.load, current() % self.handles.len())
    }

    /// Runs `handle` with an accepted connection on the least busy worker:
    /// here, if this is one (no system calls to move the socket, no other
    /// thread woken); else the socket moves to that worker.
    pub fn dispatch<F, Fut>(&self, stream: TcpStream, handle: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let counted = self.least_busy();
        let index = counted.index;
        if WORKER.get() == Some(index) {
            tokio::spawn(counted.around(handle(stream)));
            return;
        }
        // The socket leaves this runtime's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return tracing::warn!(%error, "cannot hand a connection to a proxy worker; closed"),
        };
        self.handles[index].spawn(counted.around(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => handle(stream).await,
                Err(error) => tracing::warn!(%error, "a proxy worker cannot take a connection; closed"),
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_staying_here_on_a_tie() {
        let workers = std::sync::Arc::new(Workers::start(2).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // The accept loop takes worker 0. Each connection says where it
        // runs, then lives until its client closes.
        let dispatcher = workers.clone();
        let accept_loop = workers.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (accepted, _) = listener.accept().await.unwrap();
                dispatcher.dispatch(accepted, |mut stream| async move {
                    let name = std::thread::current().name().unwrap_or_default().to_string();
                    let _ = stream.write_all(format!("{}:{name}", current()).as_bytes()).await;
                    let _ = stream.read(&mut [0u8; 1]).await;
                });
            }
        });
        let connect = || async {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut reply = [0u8; "0:ambit-proxy-0".len()];
            client.read_exact(&mut reply).await.unwrap();
            (client, String::from_utf8(reply.to_vec()).unwrap())
        };
        // Open together, they alternate: kept on the accepting worker on a
        // tie, moved when the other has fewer.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(connect().await);
        }
        let seen: Vec<&str> = open.iter().map(|(_, reply)| reply.as_str()).collect();
        assert_eq!(seen, ["0:ambit-proxy-0", "1:ambit-proxy-1", "0:ambit-proxy-0", "1:ambit-proxy-1"]);
        drop(open);
        // Closed connections leave the count; one at a time, each stays where
        // it was accepted.
        for _ in 0..3 {
            all_closed(&workers).await;
            assert_eq!(connect().await.1, "0:ambit-proxy-0");
        }
        // An HBONE stream counts like a connection (this test's thread is no
        // worker, so it counts on worker 0).
        all_closed(&workers).await;
        let stream = workers.count_stream();
        assert_eq!(connect().await.1, "1:ambit-proxy-1");
        drop(stream);
        accept_loop.abort();
    }

    async fn all_closed(workers: &Workers) {
        for _ in 0..200 {
            if workers.load.iter().all(|count| count.load(Ordering::Relaxed) == 0) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("closed connections must leave the count");
    }
}
