//! What every distributed binary's `main` does the same way (feature `kafka`): logging to
//! stderr with an `RUST_LOG` override, and the shutdown signal (SIGINT or SIGTERM) that makes a
//! stage finish its current batch and exit.

/// Structured logs to stderr; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM (what Kubernetes and systemd send before stopping a process).
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // Without a SIGTERM handler, SIGINT still stops us gracefully.
        Err(_) => {
            // No handler either: nothing stops us but the process ending, so wait on nothing.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
