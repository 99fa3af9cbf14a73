//! What every distributed binary's `main` and shell do the same way (feature `kafka`): logging to
//! stderr with an `RUST_LOG` override, the shutdown signal (SIGINT or SIGTERM) that makes a stage
//! finish its current batch and exit, and the one classification of errors by what the caller
//! does next.
//!
//! # Error classes
//! | class | meaning | what a shell does |
//! |---|---|---|
//! | [`ErrorClass::Transient`] | the peer is down, slow or busy (connection refused, timeout, 5xx, queue full, a rebalance) | retry with bounded exponential [`Backoff`], consuming nothing meanwhile, and keep watching for shutdown |
//! | [`ErrorClass::Poison`] | this one message or record can never be processed (undecodable, a value that does not fit its column, too large for the broker) | dead-letter it with the reason and move on |
//! | [`ErrorClass::Fatal`] | retrying cannot help (bad credentials, missing grants, a table whose schema does not match, a fenced producer, bad client config) | stop with an error naming what failed and what to do; the supervisor restarts the stage once it is fixed |
//!
//! Each error type says its class (`SinkError::class`, `RaterError::class`, [`kafka_class`]);
//! the shells branch on the class only, so the policy lives here and in those methods.

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// What the caller does about an error (see the table in the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry the same work with back-off; the cause is outside us and goes away.
    Transient,
    /// Dead-letter this message or record and go on with the next.
    Poison,
    /// Stop with a clear error: retrying would repeat the failure forever.
    Fatal,
}

/// Bounded exponential back-off: `first`, doubling each time, never above `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The shells' default: 200 ms doubling to at most 5 s.
    pub fn standard() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// Starts at `first`, capped at `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first.min(max), max }
    }

    /// The delay before the next attempt (and doubles the one after it, up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// The class of a Kafka client error.
///
/// Fatal: configuration and client-creation errors, authentication and authorization failures,
/// a fenced producer or member, librdkafka's fatal errors. Poison: a message the broker will never
/// take (too large, invalid). Everything else (broker down, timeouts, rebalances, a full local
/// queue, an abortable transaction) is transient.
pub fn kafka_class(e: &KafkaError) -> ErrorClass {
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Subscription(_) => ErrorClass::Fatal,
        KafkaError::Nul(_) => ErrorClass::Fatal,
        KafkaError::MessageConsumptionFatal(_) => ErrorClass::Fatal,
        // An abortable or retriable transaction error is redone by aborting; only a fatal one
        // (fenced) cannot be.
        KafkaError::Transaction(t) if t.is_fatal() => ErrorClass::Fatal,
        KafkaError::Transaction(t) => code_class(t.code()),
        other => other.rdkafka_error_code().map_or(ErrorClass::Transient, code_class),
    }
}

fn code_class(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::Fatal
        | C::Fenced
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::FencedInstanceId
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::InvalidArgument => ErrorClass::Fatal,
        C::MessageSizeTooLarge | C::InvalidMessage | C::InvalidMessageSize | C::InvalidRecord => ErrorClass::Poison,
        _ => ErrorClass::Transient,
    }
}

/// Structured logs to stderr; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The signal that asked a stage to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (Kubernetes, systemd).
    Terminate,
}

impl StopSignal {
    /// The shell convention for "ended by this signal": 128 + its number (130, 143).
    pub fn exit_code(self) -> i32 {
        match self {
            StopSignal::Interrupt => 128 + 2,
            StopSignal::Terminate => 128 + 15,
        }
    }
}

/// Resolves on SIGINT or SIGTERM (what Kubernetes and systemd send before stopping a process),
/// saying which.
pub async fn stop_signal() -> StopSignal {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => StopSignal::Interrupt,
                _ = term.recv() => StopSignal::Terminate,
            }
        }
        // Without a SIGTERM handler, SIGINT still stops us gracefully.
        Err(_) => {
            // No handler either: nothing stops us but the process ending, so wait on nothing.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            StopSignal::Interrupt
        }
    }
}

/// [`stop_signal`], for callers that do not need to know which.
pub async fn shutdown_signal() {
    stop_signal().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_and_stays_at_5s() {
        let mut b = Backoff::standard();
        let ms: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn broker_outages_timeouts_and_full_queues_are_transient() {
        for e in [
            KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure),
            KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown),
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut),
            KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress),
            KafkaError::MessageConsumption(RDKafkaErrorCode::NotCoordinator),
            KafkaError::PartitionEOF(3),
            KafkaError::NoMessageReceived,
        ] {
            assert_eq!(kafka_class(&e), ErrorClass::Transient, "{e}");
        }
    }

    #[test]
    fn fenced_producers_bad_credentials_and_bad_config_are_fatal() {
        for e in [
            KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidProducerEpoch),
            KafkaError::MessageConsumption(RDKafkaErrorCode::GroupAuthorizationFailed),
            KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed),
            KafkaError::MessageConsumption(RDKafkaErrorCode::SaslAuthenticationFailed),
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::Fatal),
            KafkaError::ClientCreation("no bootstrap".into()),
            KafkaError::Subscription("bad topic".into()),
        ] {
            assert_eq!(kafka_class(&e), ErrorClass::Fatal, "{e}");
        }
    }

    #[test]
    fn a_message_the_broker_never_takes_is_poison() {
        for e in [
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidMessage),
        ] {
            assert_eq!(kafka_class(&e), ErrorClass::Poison, "{e}");
        }
    }

    #[test]
    fn signals_exit_with_128_plus_their_number() {
        assert_eq!(StopSignal::Terminate.exit_code(), 143);
        assert_eq!(StopSignal::Interrupt.exit_code(), 130);
    }
}
