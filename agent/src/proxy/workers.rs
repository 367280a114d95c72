//! Proxy workers: threads that each run a single-threaded tokio runtime.
//!
//! The pods' accept loops are spread over the workers. An accepted
//! connection is handed to one worker (round robin; when that is the
//! accepting worker itself, it stays without changing threads) and lives
//! there until it closes, together with every task it spawns (HBONE
//! streams, HTTP/2 connection drivers) and the pooled HBONE connections it
//! uses ([`current`] is part of the pool key). A connection's tasks then
//! wake each other on one thread instead of migrating between the threads
//! of a work-stealing runtime, while many connections still spread over all
//! workers. The control plane (configuration, certificates, admin) stays on
//! the main runtime.

use std::{
    cell::Cell,
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
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
    next: AtomicUsize,
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
        Ok(Self { handles, next: AtomicUsize::new(0) })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Runs `task` (an accept loop) on the next worker.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[self.next()].spawn(task)
    }

    /// Runs `handle` with an accepted connection on the next worker: here,
    /// if that is the calling worker (no system calls to move the socket,
    /// no other thread woken); else the socket moves to that worker.
    pub fn dispatch<F, Fut>(&self, stream: TcpStream, handle: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next();
        if WORKER.get() == Some(index) {
            tokio::spawn(handle(stream));
            return;
        }
        // The socket leaves this runtime's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return tracing::warn!(%error, "cannot hand a connection to a proxy worker; closed"),
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => handle(stream).await,
                Err(error) => tracing::warn!(%error, "a proxy worker cannot take a connection; closed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_run_on_the_workers_in_turn() {
        let workers = std::sync::Arc::new(Workers::start(2).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // The accept loop takes worker 0; connections then alternate,
        // starting with worker 1 (moved there) and then 0 (kept in place).
        let dispatcher = workers.clone();
        let accept_loop = workers.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (accepted, _) = listener.accept().await.unwrap();
                dispatcher.dispatch(accepted, |mut stream| async move {
                    let name = std::thread::current().name().unwrap_or_default().to_string();
                    let _ = stream.write_all(format!("{}:{name}", current()).as_bytes()).await;
                });
            }
        });
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            seen.push(reply);
        }
        accept_loop.abort();
        assert_eq!(seen, ["1:ambit-proxy-1", "0:ambit-proxy-0", "1:ambit-proxy-1", "0:ambit-proxy-0"]);
    }
}
