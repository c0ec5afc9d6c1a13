//! Whether a failed call may have reached the server: what decides if it is safe to repeat.

use std::io;

use tower::BoxError;

use crate::limit::error::{QueueFull, RateLimited, SlotsBusy};

/// What an error says about the request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The request never left: a refused or failed connect, or hyper cancelled it before
    /// writing it. Safe to repeat, even a call that creates a paid job.
    NotSent,
    /// The request may have been read by the server: the connection broke or closed while
    /// the answer was awaited, or a timeout fired. Safe to repeat only when repeating cannot
    /// create a second paid job.
    MaybeSent,
    /// Not a connection failure (this crate's own refusals, a body that failed, a bug in
    /// the caller's request): repeating would not help.
    Final,
}

impl Delivery {
    /// Reads the error chain by its types, never by message text: this crate's limiter
    /// errors, hyper-util's client error, hyper's error, tower's timeout, then `io::Error`.
    /// The first error in the chain that says something decides.
    pub(crate) fn of(error: &BoxError) -> Self {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
        while let Some(error) = next {
            if let Some(delivery) = Self::of_one(error) {
                return delivery;
            }
            next = error.source();
        }
        Delivery::Final
    }

    fn of_one(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        if error.is::<RateLimited>() || error.is::<QueueFull>() || error.is::<SlotsBusy>() {
            return Some(Delivery::Final);
        }
        if let Some(client) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
            // A connect error happened before any byte of the request was written; any other
            // client error says more further down the chain.
            return client.is_connect().then_some(Delivery::NotSent);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return Some(if hyper.is_canceled() {
                // Dropped before it was dispatched to a connection.
                Delivery::NotSent
            } else if hyper.is_user() {
                Delivery::Final
            } else if hyper.is_incomplete_message()
                || hyper.is_closed()
                || hyper.is_timeout()
                || hyper.is_parse()
                || hyper.is_shutdown()
            {
                // "Connection closed before message completed" and its kin: the server may
                // have read the request and dropped it.
                Delivery::MaybeSent
            } else {
                // An I/O error, with the io::Error further down the chain.
                return None;
            });
        }
        if error.is::<tower::timeout::error::Elapsed>() {
            return Some(Delivery::MaybeSent);
        }
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(match io.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => Delivery::NotSent,
                _ => Delivery::MaybeSent,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    fn io(kind: io::ErrorKind) -> BoxError {
        Box::new(io::Error::new(kind, "trouble"))
    }

    #[test]
    fn io_errors_are_judged_by_kind_anywhere_in_the_chain() {
        assert_eq!(
            Delivery::of(&io(io::ErrorKind::ConnectionRefused)),
            Delivery::NotSent
        );
        assert_eq!(
            Delivery::of(&io(io::ErrorKind::ConnectionReset)),
            Delivery::MaybeSent
        );
        let wrapped: BoxError = Box::new(Wrapper(io(io::ErrorKind::ConnectionRefused)));
        assert_eq!(Delivery::of(&wrapped), Delivery::NotSent);
        let timeout: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(Delivery::of(&timeout), Delivery::MaybeSent);
    }

    #[test]
    fn limiter_refusals_and_unknown_errors_are_final() {
        let limited: BoxError = Box::new(RateLimited::new(
            std::time::Duration::from_secs(1),
            crate::classify::EndpointClass::Chat,
        ));
        assert_eq!(Delivery::of(&limited), Delivery::Final);
        let other: BoxError = "the body was not valid".into();
        assert_eq!(Delivery::of(&other), Delivery::Final);
    }
}
